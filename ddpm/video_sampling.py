"""Drawing videos from a space-time model: unconditional, conditioned on given frames, and longer than trained.

Conditioning follows Video Diffusion Models (Ho et al. 2022, section 3.1). Split a clip into frames
``a`` that are given (``x^a``) and frames ``b`` to draw. Both methods below wrap the network
(:class:`FrameConditioned`), so every sampler of :mod:`ddpm.samplers`, which only does arithmetic on
``[B, ...]`` tensors, samples videos and conditioned videos alike:

* **replacement**: every evaluation at timestep t sees the given frames noised to that level,
  ``z_t^a = α_t x^a + σ_t ε`` with fresh ε (a draw of q(z_t^a | x^a)), in place of the chain's own
  ``a`` frames; the ``b`` frames are the chain's. Its x̂^b is E[x^b | z_t] at that z_t, which is not
  E[x^b | z_t^b, x^a]: the given frames inform ``b`` only through one noisy draw, hence VDM's finding
  that replacement's continuations lose coherence.
* **reconstruction guidance** (VDM eq. 7): as replacement, and in addition
  ``x̃^b = x̂^b − (w_r α_t / 2) ∇_{z_t^b} ‖x^a − x̂^a(z_t)‖²``, the gradient (through the network) of
  how badly the model's denoising of ``z_t`` reconstructs the given frames. With w_r = 1 this is the
  correction E[x^b | z_t, x^a] = E[x^b | z_t] + (σ_t²/α_t) ∇_{z_t^b} log q(x^a | z_t) under VDM's
  approximation q(x^a | z_t) ≈ N(x̂^a(z_t), (σ_t²/α_t²) I); VDM found w_r > 1 better. Here
  α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t); the network's output is re-expressed from x̃ (as ε, x_0 or v).

Autoregressive extension (VDM section 3.1, their 64-frame results): a clip longer than the model's
training length is drawn window by window, each window conditioned on the last ``context`` frames
drawn so far. Sample i's every random draw comes from its own generator seeded by (seed, i), as in
:func:`ddpm.generate.generate`, so a seed gives the same clips in any batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from ddpm.checkpoints import atomic_write
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.generate import SamplerSettings, class_labels, image_generators
from ddpm.images import save_gif, save_image, save_mp4, to_uint8, video_frame_grid, video_frames
from ddpm.runtime import autocast, resolve_bf16
from ddpm.samplers import Generators, randn
from ddpm.video_data import fit_frame, read_video, video_array
from ddpm.viz import reverse_process_gif, reverse_process_grid

CONDITIONING_METHODS = ("reconstruction", "replacement")
#: VDM's reconstruction guidance weight w_r when none is given (they report w_r > 1 better than 1).
DEFAULT_GUIDANCE_WEIGHT = 2.0


class FrameConditioned(nn.Module):
    """``model`` conditioned on given frames by replacement or reconstruction guidance (module docstring).

    Args:
        model: the video network, called as ``model(z_t, t, **kwargs)`` on ``[B, C, T, H, W]``.
        diffusion: the process whose original timesteps the model is called at (not a respaced one:
            the wrapper is called with original timesteps, as every model is).
        frames: the given frames ``x^a`` ``[B, C, K, H, W]`` in [-1, 1].
        known: the K frame indices of the clip they occupy.
        method: ``"replacement"`` or ``"reconstruction"``.
        weight: w_r of reconstruction guidance.
        generator: where the noise of ``z_t^a`` comes from (one generator, or one per sample).
    """

    def __init__(self, model: nn.Module, diffusion: GaussianDiffusion, frames: Tensor, known: Sequence[int],
                 method: str = "reconstruction", weight: float = DEFAULT_GUIDANCE_WEIGHT,
                 generator: Generators = None) -> None:
        super().__init__()
        if method not in CONDITIONING_METHODS:
            raise UserError(f"unknown conditioning {method!r}; choose {' or '.join(CONDITIONING_METHODS)}")
        if frames.shape[2] != len(known):
            raise ValueError(f"{frames.shape[2]} given frames for {len(known)} known positions")
        self.model, self.diffusion, self.method, self.weight = model, diffusion, method, float(weight)
        self.frames, self.known, self.generator = frames, list(known), generator
        self.calls = 0

    def forward(self, x_t: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        self.calls += 1
        if x_t.shape[0] != self.frames.shape[0]:
            raise UserError("conditioning on given frames takes no classifier-free guidance (a doubled batch)")
        known, unknown = self.known, [f for f in range(x_t.shape[2]) if f not in self.known]
        x_a = self.frames.to(x_t.device, x_t.dtype)
        z_a = self.diffusion.q_sample(x_a, t, noise=randn(x_a.shape, self.generator, x_t.device, x_t.dtype))
        if self.method == "replacement":
            return self.model(_placed(x_t, z_a, known, unknown, x_t[:, :, unknown]), t, **kwargs)
        with torch.enable_grad():
            z_b = x_t[:, :, unknown].detach().requires_grad_(True)
            z = _placed(x_t, z_a, known, unknown, z_b)
            out = self.model(z, t, **kwargs)
            channels = x_t.shape[1]
            x0 = self.diffusion.predict_x0(z, t, out[:, :channels].float())
            error = (x_a.float() - x0[:, :, known]).pow(2).sum()
            (grad,) = torch.autograd.grad(error, z_b)
        alpha = self.diffusion.coef("sqrt_alphas_cumprod", t, x0)
        x0 = x0.detach()
        x0[:, :, unknown] = x0[:, :, unknown] - self.weight * alpha / 2 * grad.float()
        return torch.cat([self._as_output(z.detach(), t, x0).to(out.dtype), out[:, channels:].detach()], dim=1)

    def _as_output(self, z: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """The mean prediction (ε, x_0 or v, by the process's ``mean_type``) that gives ``x0`` at ``z``."""
        d = self.diffusion
        if d.mean_type == "x0":
            return x0
        eps = d.predict_eps_from_x0(z.float(), t, x0)
        return eps if d.mean_type == "eps" else d.get_v(x0, eps, t)


def _placed(x_t: Tensor, z_a: Tensor, known: list[int], unknown: list[int], z_b: Tensor) -> Tensor:
    """The clip with ``z_a`` at the known frames and ``z_b`` at the others (differentiable in both)."""
    parts = [None] * x_t.shape[2]
    for i, f in enumerate(known):
        parts[f] = z_a[:, :, i]
    for i, f in enumerate(unknown):
        parts[f] = z_b[:, :, i]
    return torch.stack(parts, dim=2)


@dataclass
class VideoSamples:
    """What :func:`generate_video` drew: ``videos`` float32 ``[N, C, T, H, W]`` in [-1, 1] on the CPU, the
    class ``labels`` [N] (-1: unconditional), network evaluations per clip ``nfe`` (all windows), and with
    ``trajectory_every`` the first batch's first window's chain (:func:`ddpm.samplers.sample`)."""

    videos: Tensor
    labels: Tensor
    nfe: float
    trajectory: dict[str, Tensor] | None = None

    def uint8(self) -> Tensor:
        return to_uint8(self.videos)


@dataclass(frozen=True)
class FramePlan:
    """How a clip of ``frames`` frames is drawn: windows of at most ``window`` frames, each after the first
    conditioned on the last ``context`` frames drawn; ``given`` frames come first and condition the first."""

    frames: int
    window: int
    context: int
    given: int = 0

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise UserError(f"--frames must be at least 1, got {self.frames}")
        if self.given >= min(self.frames, self.window):
            raise UserError(f"{self.given} given first frame(s) leave nothing to draw in a window of "
                            f"{min(self.frames, self.window)} frames; give fewer or ask for more --frames")
        if self.frames > self.window and not 0 < self.context < self.window:
            raise UserError(f"extending to {self.frames} frames with windows of {self.window} (the frames the model "
                            f"was trained on) needs --context between 1 and {self.window - 1}, got {self.context}")

    def windows(self) -> list[tuple[int, int]]:
        """(first frame, frame count) of each window, in order; windows after the first overlap the
        previous frames by ``context``."""
        size = min(self.frames, self.window)
        out, end = [(0, size)], size
        while end < self.frames:
            start = end - self.context
            out.append((start, min(self.window, self.frames - start)))
            end = start + out[-1][1]
        return out


def generate_video(model: nn.Module, diffusion: GaussianDiffusion, num_videos: int,
                   settings: SamplerSettings | None = None, *, seed: int = 0, frames: int | None = None,
                   first_frames: Tensor | None = None, method: str = "reconstruction",
                   guidance_weight: float = DEFAULT_GUIDANCE_WEIGHT, context: int | None = None,
                   label: int | None = None, batch_size: int = 16, device: str | torch.device = "cpu",
                   bf16: bool | None = None, progress: bool = True, trajectory_every: int = 0) -> VideoSamples:
    """Draw ``num_videos`` clips of ``frames`` frames (default: the model's training length) from a video
    network (``sample_shape`` ``(C, T, H, W)``).

    ``first_frames`` ``[M, C, K, H, W]`` in [-1, 1] are given (M = 1 for all, or at least ``num_videos``: clip i
    starts with ``first_frames[i]``) and the rest is drawn conditioned on them by ``method`` (``"reconstruction"``
    guidance with weight ``guidance_weight``, or ``"replacement"``). More frames than the model was trained
    on are drawn by autoregressive extension (:class:`FramePlan`), each window conditioned on the last
    ``context`` frames (default half a window) by the same method. A class-conditional model gets
    ``label`` or the classes in turn.
    """
    settings = settings or SamplerSettings()
    channels, window, height, width = model.sample_shape
    plan = FramePlan(window if frames is None else frames, window, window // 2 if context is None else context,
                     0 if first_frames is None else first_frames.shape[2])
    first_frames = _check_first_frames(first_frames, num_videos, (channels, height, width))
    if num_videos < 1 or batch_size < 1:
        raise UserError("--num-images and --batch-size must be at least 1")
    if label is not None and not 0 <= label < max(model.num_classes, 1):
        raise UserError(f"--label {label} needs a class-conditional model with that class")
    settings.check(diffusion.num_timesteps)
    device = torch.device(device)
    use_bf16, was_training = resolve_bf16(bf16, device), model.training
    model.eval()
    videos, labels, trajectory, calls = [], [], None, 0
    try:
        with tqdm(total=num_videos, desc="sampling videos", unit="clip", disable=not progress) as bar:
            for first in range(0, num_videos, batch_size):
                n = min(batch_size, num_videos - first)
                y = class_labels(first, n, model.num_classes, label) if model.num_classes else torch.full((n,), -1)
                given = None if first_frames is None else first_frames[first:first + n]
                clip, batch_calls, traj = _draw_clips(
                    model, diffusion, plan, settings, given, method, guidance_weight,
                    image_generators(seed, first, n, device), {"y": y.to(device)} if model.num_classes else {},
                    (n, channels, height, width), device, use_bf16, trajectory_every if first == 0 else 0)
                trajectory = trajectory if traj is None else traj
                videos.append(clip.float().clamp(-1, 1).cpu())
                labels.append(y)
                calls += batch_calls
                bar.update(n)
    finally:
        model.train(was_training)
    batches = len(videos)
    return VideoSamples(torch.cat(videos), torch.cat(labels), calls / batches, trajectory)


def _draw_clips(model: nn.Module, diffusion: GaussianDiffusion, plan: FramePlan, settings: SamplerSettings,
                given: Tensor | None, method: str, weight: float, generators: list[torch.Generator],
                kwargs: dict[str, Tensor], shape: tuple[int, int, int, int], device: torch.device, bf16: bool,
                trajectory_every: int) -> tuple[Tensor, int, dict[str, Tensor] | None]:
    """One batch of clips window by window (:meth:`FramePlan.windows`); the network calls it took and,
    if asked, the first window's trajectory."""
    n, channels, height, width = shape
    clip = torch.zeros(n, channels, plan.frames, height, width, device=device)
    done = 0 if given is None else given.shape[2]
    if given is not None:
        clip[:, :, :done] = given.to(device)
    calls, trajectory = 0, None
    for k, (start, size) in enumerate(plan.windows()):
        known = list(range(min(done - start, size)))  # frames of this window already drawn or given
        net: nn.Module = model
        if known:
            net = FrameConditioned(model, diffusion, clip[:, :, start:start + len(known)].clone(), known, method,
                                   weight, generators)
        counted = _Counted(net)
        record = trajectory_every > 0 and k == 0
        with autocast(device, bf16):
            out = diffusion.sample(counted, (n, channels, size, height, width), generator=generators, device=device,
                                   model_kwargs=kwargs, return_trajectory=record,
                                   **({"trajectory_every": trajectory_every} if record else {}),
                                   **settings.sample_kwargs())
        if record:
            out, trajectory = out
        # The given and earlier frames stay exactly as they were; the window adds the rest.
        clip[:, :, start + len(known):start + size] = out[:, :, len(known):].to(clip.dtype)
        done, calls = start + size, calls + counted.calls
    return clip, calls, trajectory


class _Counted(nn.Module):
    """A network, counting its calls (one call is one network evaluation of the batch)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        return self.model(*args, **kwargs)


def _check_first_frames(frames: Tensor | None, n: int, shape: tuple[int, int, int]) -> Tensor | None:
    """The given frames ``[n, C, K, H, W]`` (one clip's repeated for all), or a :class:`UserError`."""
    if frames is None:
        return None
    channels, height, width = shape
    if frames.ndim != 5 or frames.shape[1] != channels or frames.shape[3:] != (height, width):
        raise UserError(f"the first frames are {list(frames.shape)} ([N, C, K, H, W]); this model makes "
                        f"{channels}-channel frames of {height}x{width}")
    if 1 < frames.shape[0] < n:
        raise UserError(f"{frames.shape[0]} clips of first frames for {n} videos: give one, or one per video")
    return frames[:n].expand(n, -1, -1, -1, -1)


# ------------------------------------------------------------------------------------------- files


def read_first_frames(path: str | Path, count: int | None, channels: int, size: tuple[int, int]) -> Tensor:
    """The first ``count`` frames (None: all) of a GIF/MP4, a still image (one frame), or the clips of an
    ``.npy``/``.npz`` (``x_test``, else ``x_train``), as float ``[N, C, K, H, W]`` in [-1, 1] for a model of
    ``channels`` and ``size``. Frames of another size are refused, not resized: the continuation of a
    resized clip is not the continuation of the clip."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--first-frames {path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        try:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.ndarray):  # an .npy: the array itself
                arrays = {"x": loaded}
            else:
                with loaded:
                    arrays = {k: loaded[k] for k in ("x_test", "x_train") if k in loaded}
        except (OSError, ValueError) as error:
            raise UserError(f"--first-frames {path}: cannot read it ({error})") from error
        if not arrays:
            raise UserError(f"--first-frames {path}: no x_test or x_train array")
        clips = video_array(next(iter(arrays.values())), f"--first-frames {path}")
    elif suffix in (".gif", ".webp", ".mp4", ".mov", ".webm", ".avi", ".mkv", ".m4v"):
        try:
            clips = read_video(path)[None]
        except UserError as error:
            if "still image" not in str(error):
                raise
            clips = _still(path)
    else:
        clips = _still(path)
    clips = clips[:, :count]
    if clips.shape[2:4] != tuple(size):
        raise UserError(f"--first-frames {path}: frames of {clips.shape[3]}x{clips.shape[2]}, the model's are "
                        f"{size[1]}x{size[0]}")
    fitted = np.stack([[fit_frame(f, size) for f in clip] for clip in clips])  # [N, K, H, W, 1 or 3]
    if channels == 1 and fitted.shape[-1] == 3:
        fitted = np.rint(fitted @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
    elif channels == 3 and fitted.shape[-1] == 1:
        fitted = np.repeat(fitted, 3, axis=-1)
    return torch.from_numpy(fitted).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def _still(path: Path) -> np.ndarray:
    """A still image as one clip of one frame ``[1, 1, H, W, C]``."""
    try:
        with Image.open(path) as img:
            frame = np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as error:
        raise UserError(f"--first-frames {path}: not a video, an image or an .npy/.npz ({error})") from error
    return frame[None, None]


def write_videos(samples: VideoSamples, out_dir: str | Path, gif: bool = True, mp4: bool = False, grid: bool = True,
                 npz: bool = False, fps: float = 8, max_clips: int = 64) -> list[Path]:
    """Write ``grid.png`` (a row per clip, a column per frame), ``samples.gif`` and ``samples.mp4`` (frame t
    shows every clip's frame t), of the first ``max_clips`` clips, and ``samples.npz`` (uint8 ``arr_0``
    [N, T, H, W, C], ``arr_1`` the labels when conditional) of all; returns the paths."""
    out_dir = Path(out_dir)
    clips = samples.uint8()
    shown = clips[:max_clips]
    written: list[Path] = []
    if grid:
        written.append(save_image(video_frame_grid(shown), out_dir / "grid.png"))
    frames = video_frames(shown) if gif or mp4 else []
    if gif:
        written.append(save_gif(frames, out_dir / "samples.gif", duration_ms=round(1000 / fps)))
    if mp4:
        written.append(save_mp4(frames, out_dir / "samples.mp4", fps=fps))
    if npz:
        arrays = {"arr_0": clips.permute(0, 2, 3, 4, 1).numpy()}
        if (samples.labels >= 0).any():
            arrays["arr_1"] = samples.labels.numpy()
        path = out_dir / "samples.npz"
        with atomic_write(path, durable=False) as f:
            np.savez(f, **arrays)
        written.append(path)
    return written


def video_reverse_pictures(model: nn.Module, diffusion: GaussianDiffusion, out_dir: str | Path,
                           settings: SamplerSettings | None = None, num_videos: int = 2, seed: int = 0,
                           device: str | torch.device = "cpu", bf16: bool | None = None,
                           progress: bool = False) -> list[Path]:
    """The reverse process of a video model: ``reverse.png`` (for the first clip, per frame a row of x_t and
    a row of x̂_0 over the steps: :func:`ddpm.viz.reverse_process_grid` with the frames as its images) and
    ``reverse.gif`` (the chain of ``num_videos`` clips, one clip a row, frame by frame across)."""
    settings = settings or SamplerSettings()
    total = settings.steps or diffusion.num_timesteps
    samples = generate_video(model, diffusion, num_videos, settings, seed=seed, batch_size=num_videos, device=device,
                             bf16=bf16, progress=progress, trajectory_every=max(1, total // 50))
    trajectory = samples.trajectory
    steps, clips, channels, frames, height, width = trajectory["x_t"].shape

    def as_images(key: str, clip: slice) -> Tensor:
        """[n, B, C, T, H, W] -> [n, B*T, C, H, W]: the frames of the clips as a batch of images."""
        return trajectory[key][:, clip].transpose(2, 3).reshape(steps, -1, channels, height, width)

    first = {"timesteps": trajectory["timesteps"], "x_t": as_images("x_t", slice(0, 1)),
             "pred_x0": as_images("pred_x0", slice(0, 1))}
    every = {**first, "x_t": as_images("x_t", slice(None)), "pred_x0": as_images("pred_x0", slice(None))}
    out_dir = Path(out_dir)
    grid = reverse_process_grid(first, num_images=frames)
    return [save_image(grid, out_dir / "reverse.png"),
            reverse_process_gif(every, out_dir / "reverse.gif", num_images=clips * frames, nrow=frames)]
