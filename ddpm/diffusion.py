"""The Gaussian diffusion process of Ho et al. (2020) and its parameterisations.

Notation follows the paper. Timesteps are 0-based tensors throughout: index ``i`` is the paper's
``t = i + 1``, so ``t = 0`` below is the last reverse step, whose output is x_0, and
``num_timesteps - 1`` is the paper's T. Every per-step quantity is a float64 buffer of length T.

References (cited by equation number in the docstrings):

- [DDPM] Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020.
- [IDDPM] Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. ICML 2021.
- [DDIM] Song, Meng, Ermon. Denoising Diffusion Implicit Models. ICLR 2021.
- [PD] Salimans, Ho. Progressive Distillation for Fast Sampling of Diffusion Models. ICLR 2022
  (the v-parameterisation, appendix D).
- [CFG] Ho, Salimans. Classifier-Free Diffusion Guidance. 2022.
- [SDE] Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative Modeling through
  Stochastic Differential Equations. ICLR 2021.
- [Imagen] Saharia et al. Photorealistic Text-to-Image Diffusion Models with Deep Language
  Understanding. NeurIPS 2022 (dynamic thresholding, section 2.3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ddpm import losses, samplers
from ddpm.errors import UserError
from ddpm.samplers import DYNAMIC_THRESHOLD
from ddpm.schedules import respace_betas

MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")

#: The label a class-conditional model reads as "no label" (the null class of [CFG]).
NULL_LABEL = -1

Model = Callable[..., Tensor]

def dynamic_thresholding(x0: Tensor, p: float = DYNAMIC_THRESHOLD) -> Tensor:
    """Imagen's dynamic thresholding of x̂_0 ([Imagen] section 2.3), per sample of ``x0`` [B, ...].

    s = max(1, quantile_p(|x̂_0|)) over each sample's values, and x̂_0 ← clip(x̂_0, −s, s) / s: a
    prediction inside [−1, 1] is left alone, one that saturates is pulled inwards instead of being
    clipped flat. The quantile interpolates linearly between order statistics (NumPy's percentile).
    """
    flat = x0.abs().flatten(1)
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # quantile needs a float type
    s = torch.quantile(flat, p, dim=1).clamp(min=1.0).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


class GaussianDiffusion:
    """Forward process q, posterior q(x_{t-1} | x_t, x_0) and reverse process p_θ over T steps.

    Args:
        betas: β_1..β_T, any sequence in (0, 1); stored as float64.
        mean_type: what the model predicts: ``"eps"`` (ε, [DDPM] eq. 11), ``"x0"`` (x_0) or
            ``"v"`` (v = √ᾱ_t ε − √(1−ᾱ_t) x_0, [PD]).
        var_type: the reverse variance Σ_θ: ``"fixed_small"`` (σ² = β̃_t, [DDPM] section 3.2),
            ``"fixed_large"`` (σ² = β_t) or ``"learned_range"`` ([IDDPM] eq. 15: the model also
            outputs v and log σ² = ((v+1)/2) log β_t + ((1−v)/2) log β̃_t; v = ±1 gives β and β̃,
            and, as in [IDDPM], v is not constrained to [-1, 1]).
        timestep_map: for a respaced process, the timestep of the original process that each of
            these steps stands for; the model is always called with original timesteps.

    The model is any callable ``model(x_t, t, **model_kwargs) -> Tensor`` with ``t`` an int64
    tensor [B] of 0-based original timesteps. With ``learned_range`` it returns twice the
    channels of x_t: the mean prediction, then v.
    """

    def __init__(
        self,
        betas: Sequence[float] | Tensor,
        mean_type: str = "eps",
        var_type: str = "fixed_small",
        timestep_map: Sequence[int] | Tensor | None = None,
    ) -> None:
        if mean_type not in MEAN_TYPES:
            raise UserError(f"unknown mean_type {mean_type!r}; choose one of {', '.join(MEAN_TYPES)}")
        if var_type not in VAR_TYPES:
            raise UserError(f"unknown var_type {var_type!r}; choose one of {', '.join(VAR_TYPES)}")
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten().clone()
        if len(betas) == 0:
            raise UserError("a diffusion needs at least one step (T >= 1)")
        if not (torch.isfinite(betas).all() and (betas > 0).all() and (betas < 1).all()):
            raise UserError("every beta must lie strictly between 0 and 1")
        self.mean_type = mean_type
        self.var_type = var_type
        self.num_timesteps = T = len(betas)
        if timestep_map is None:
            timestep_map = torch.arange(T)
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.long).clone()
        if self.timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have length {T}")

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.log_one_minus_alphas_cumprod = self.one_minus_alphas_cumprod.log()
        self.sqrt_one_minus_alphas_cumprod = self.one_minus_alphas_cumprod.sqrt()
        self.sqrt_recip_alphas_cumprod = self.alphas_cumprod.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        # [DDPM] eq. 7: β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t. It is 0 at the first step (t = 1).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The log is clipped because β̃ is 0 at the start of the chain: the first entry borrows
        # the second, as improved-diffusion does (DDPM's own code floors it at 1e-20 instead;
        # with T = 1 there is no second entry, so β_1 stands in).
        first = self.posterior_variance[1:2] if T > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.cat([first, self.posterior_variance[1:]]).log()
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )
        self.log_betas = betas.log()
        # σ² = β_t, except at t = 1 where β̃_2 gives a better decoder likelihood (as in [IDDPM]).
        self.fixed_large_log_variance = torch.cat([first, betas[1:]]).log()

        self._device_cache: dict[tuple[str, torch.device], Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(T={self.num_timesteps}, mean_type={self.mean_type!r}, "
            f"var_type={self.var_type!r})"
        )

    # ------------------------------------------------------------------ helpers

    def _buffer(self, name: str, device: torch.device) -> Tensor:
        """A buffer on ``device``, copied there once (MPS has no float64, so float32 there)."""
        key = (name, device)
        buf = self._device_cache.get(key)
        if buf is None:
            buf = getattr(self, name)
            if buf.is_floating_point() and device.type == "mps":
                buf = buf.float()
            buf = self._device_cache[key] = buf.to(device)
        return buf

    def coef(self, name: str, t: Tensor, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The float64 buffer ``name`` gathered at timesteps ``t`` [B] and shaped [B, 1, ...] to
        broadcast against ``x``, in ``dtype`` (default: x's, but at least float32)."""
        if dtype is None:
            dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        c = self._buffer(name, x.device)[t.to(x.device)].to(dtype)
        return c.reshape(-1, *([1] * (x.ndim - 1)))

    def original_timesteps(self, t: Tensor) -> Tensor:
        """The original process's timesteps for steps ``t`` of this (maybe respaced) process."""
        return self._buffer("timestep_map", t.device)[t]

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), [DDPM] eq. 4."""
        mean = self.coef("sqrt_alphas_cumprod", t, x0) * x0
        variance = self.coef("one_minus_alphas_cumprod", t, x0).expand_as(x0)
        log_variance = self.coef("log_one_minus_alphas_cumprod", t, x0).expand_as(x0)
        return mean, variance, log_variance

    def q_sample(
        self, x0: Tensor, t: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """A draw of x_t ~ q(x_t | x_0): x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, [DDPM] eq. 4 (and eq. 14's input)."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return (
            self.coef("sqrt_alphas_cumprod", t, x0) * x0
            + self.coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x_0), [DDPM] eqs. 6–7.

        μ̃_t = √ᾱ_{t−1} β_t / (1 − ᾱ_t) · x_0 + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · x_t and
        β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t. Shapes: all as x_t.
        """
        mean = self.coef("posterior_mean_coef1", t, x_t) * x0 + self.coef("posterior_mean_coef2", t, x_t) * x_t
        variance = self.coef("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self.coef("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ parameterisations

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t, [DDPM] eq. 4 solved for x_0 (the x̂_0 of eq. 15)."""
        return (
            self.coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self.coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """ε = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t), [DDPM] eq. 4 solved for ε ([DDIM] eq. 12's ε)."""
        return (self.coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self.coef(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v, [PD] appendix D."""
        return (
            self.coef("sqrt_alphas_cumprod", t, x_t) * x_t
            - self.coef("sqrt_one_minus_alphas_cumprod", t, x_t) * v
        )

    def get_v(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The velocity v = √ᾱ_t ε − √(1 − ᾱ_t) x_0, [PD] appendix D."""
        return (
            self.coef("sqrt_alphas_cumprod", t, x0) * eps
            - self.coef("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        )

    def training_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the model is trained to output for this ``mean_type``: ε, x_0 or v."""
        if self.mean_type == "eps":
            return eps
        if self.mean_type == "x0":
            return x0
        return self.get_v(x0, eps, t)

    def predict_x0(self, x_t: Tensor, t: Tensor, prediction: Tensor) -> Tensor:
        """x̂_0 from the model's mean prediction (ε, x_0 or v, by ``mean_type``)."""
        if self.mean_type == "eps":
            return self.predict_x0_from_eps(x_t, t, prediction)
        if self.mean_type == "x0":
            return prediction
        return self.predict_x0_from_v(x_t, t, prediction)

    # ------------------------------------------------------------------ reverse process

    def model_output(self, model: Model, x_t: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None = None) -> Tensor:
        """Call the model at the original timesteps of ``t``, with classifier-free guidance.

        ``model_kwargs`` is passed to the model. If it holds ``guidance_scale`` w ≠ 1, the model is
        run on the batch twice over, once with the condition and once without, and the mean
        prediction becomes ``uncond + w · (cond − uncond)`` ([CFG] eq. 6 with w = 1 + their w);
        the learned-variance channels, if any, come from the conditional half. The unconditional
        half's keyword arguments are ``uncond`` (e.g. the empty or negative prompt's
        ``encoder_hidden_states``), or for class labels ``y`` the null label −1; other per-example
        tensors are repeated. Since ε, x_0 and v are affine in one another at a fixed x_t, guiding
        any of them is the same guidance.
        """
        kwargs = dict(model_kwargs or {})
        scale, uncond = kwargs.pop("guidance_scale", None), kwargs.pop("uncond", None)
        t_model = self.original_timesteps(t)
        if scale is None or float(scale) == 1.0:
            return model(x_t, t_model, **kwargs)
        if uncond is None:
            if kwargs.get("y") is None:
                raise UserError("classifier-free guidance needs a condition: class labels y, or uncond")
            uncond = {"y": torch.full_like(kwargs["y"], NULL_LABEL)}
        B = x_t.shape[0]
        both = {k: torch.cat([v, uncond[k] if k in uncond else v])
                if isinstance(v, Tensor) and v.ndim and v.shape[0] == B else v for k, v in kwargs.items()}
        out = model(torch.cat([x_t, x_t]), torch.cat([t_model, t_model]), **both)
        cond, unconditional = out.chunk(2)
        C = x_t.shape[1]
        guided = unconditional[:, :C] + float(scale) * (cond[:, :C] - unconditional[:, :C])
        return torch.cat([guided, cond[:, C:]], dim=1)

    def p_mean_variance(
        self,
        model: Model,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        dynamic_threshold: float | None = None,
    ) -> dict[str, Tensor]:
        """Mean and variance of p_θ(x_{t−1} | x_t), [DDPM] eq. 1 with μ_θ from eq. 11 / x̂_0.

        Returns a dict of tensors shaped like x_t: ``mean``, ``variance``, ``log_variance``,
        ``pred_x0`` (x̂_0, clipped to [-1, 1] when ``clip_denoised``, or dynamically thresholded at
        the percentile ``dynamic_threshold``, which takes the place of the clip: :func:`dynamic_thresholding`)
        and ``eps`` (the ε consistent with that x̂_0), plus ``model_output`` (the raw output).
        """
        out = self.model_output(model, x_t, t, model_kwargs)
        return {**self.p_mean_variance_from_output(out, x_t, t, clip_denoised, dynamic_threshold), "model_output": out}

    def p_mean_variance_from_output(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = True,
        dynamic_threshold: float | None = None,
    ) -> dict[str, Tensor]:
        """:meth:`p_mean_variance` for an already computed model output.

        The mean is the posterior mean at x̂_0, μ_θ = μ̃_t(x_t, x̂_0) ([DDPM] eqs. 7 and 15;
        for ε-prediction without clipping this is eq. 11). The variance is fixed or learned
        ([IDDPM] eq. 15), by ``var_type``.
        """
        C = x_t.shape[1]
        if self.var_type == "learned_range":
            if model_output.shape[1] != 2 * C:
                raise ValueError(
                    f"learned_range needs a model with {2 * C} output channels, got {model_output.shape[1]}"
                )
            prediction, v = model_output[:, :C], model_output[:, C:]
            min_log = self.coef("posterior_log_variance_clipped", t, x_t)
            max_log = self.coef("log_betas", t, x_t)
            frac = (v + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        else:
            if model_output.shape[1] != C:
                raise ValueError(f"the model must output {C} channels, got {model_output.shape[1]}")
            prediction = model_output
            name = "posterior_log_variance_clipped" if self.var_type == "fixed_small" else "fixed_large_log_variance"
            log_variance = self.coef(name, t, x_t).expand_as(x_t)
        pred_x0 = self.predict_x0(x_t, t, prediction)
        if dynamic_threshold is not None:
            pred_x0 = dynamic_thresholding(pred_x0, dynamic_threshold)
        elif clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return {
            "mean": mean,
            "variance": log_variance.exp(),
            "log_variance": log_variance,
            "pred_x0": pred_x0,
            "eps": self.predict_eps_from_x0(x_t, t, pred_x0),
        }

    def score(self, model: Model, x_t: Tensor, t: Tensor, model_kwargs: dict[str, Any] | None = None) -> Tensor:
        """The model's score ∇_x log q_t(x_t) ≈ −ε̂(x_t, t) / √(1 − ᾱ_t) (the score behind [SDE] eq. 7).

        Since x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, the score of q(x_t | x_0) is −ε/√(1 − ᾱ_t), and the
        minimum-MSE ε̂ = E[ε | x_t] turns it into the score of the marginal q_t (Vincent 2011).
        ε̂ comes from the mean prediction (ε, x_0 or v, unclipped, with guidance if asked). Shape of x_t.
        """
        out = self.model_output(model, x_t, t, model_kwargs)
        prediction = out[:, : x_t.shape[1]]  # the mean channels (a learned variance follows them)
        if self.mean_type == "eps":
            eps = prediction
        else:
            eps = self.predict_eps_from_x0(x_t, t, self.predict_x0(x_t, t, prediction))
        return -eps / self.coef("sqrt_one_minus_alphas_cumprod", t, x_t)

    # ------------------------------------------------------------------ respacing

    def respace(self, use_timesteps: Sequence[int]) -> GaussianDiffusion:
        """The process restricted to the kept steps ``use_timesteps`` (0-based, of this process).

        Its betas are recomputed from ᾱ at the kept steps so that q(x_t | x_0) is unchanged there
        (see :func:`ddpm.schedules.respace_betas`); the model is still called with the original
        timesteps. Keeping every step gives back this process.
        """
        kept = sorted(set(int(t) for t in use_timesteps))
        betas = respace_betas(self.alphas_cumprod, kept)
        return GaussianDiffusion(betas, self.mean_type, self.var_type, timestep_map=self.timestep_map[kept])

    # ------------------------------------------------------------------ losses, bound, sampling

    def training_losses(
        self,
        model: Model,
        x0: Tensor,
        t: Tensor,
        loss_type: str = "simple",
        noise: Tensor | None = None,
        model_kwargs: dict[str, Any] | None = None,
        snr_gamma: float = 0.0,
    ) -> dict[str, Tensor]:
        """Per-example training losses at timesteps ``t``; see :func:`ddpm.losses.training_losses`."""
        return losses.training_losses(self, model, x0, t, loss_type, noise, model_kwargs, snr_gamma)

    def bits_per_dim(
        self,
        model: Model,
        x0: Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        max_batch: int = 256,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> dict[str, Tensor]:
        """The full variational bound in bits per dimension; see :func:`ddpm.losses.bits_per_dim`."""
        return losses.bits_per_dim(
            self, model, x0, clip_denoised, model_kwargs, max_batch, generator, progress
        )

    def sample(
        self,
        model: Model,
        shape: Sequence[int],
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        progress: bool = False,
        return_trajectory: bool = False,
        spacing: str | None = None,
        **kwargs: Any,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Draw samples from p_θ; see :func:`ddpm.samplers.sample` for the options (``sampler``, by
        default the one for the NFE asked, :func:`ddpm.samplers.default_sampler`, at 20 NFE
        :data:`ddpm.samplers.DEFAULT_SAMPLER`; ``steps`` = NFE; ``eta``; ``spacing``; per-sample generators, ...)."""
        return samplers.sample(
            self, model, shape, sampler=sampler, steps=steps, eta=eta, spacing=spacing, generator=generator,
            progress=progress, return_trajectory=return_trajectory, **kwargs,
        )
