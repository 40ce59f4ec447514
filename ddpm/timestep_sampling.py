"""How training draws its timesteps: uniformly, or by Improved DDPM's loss-aware importance sampling.

A sampler returns 0-based timesteps t [B] and weights w [B] such that E[w · L_t] over its draws
equals the mean of L_t over a uniform t: multiply the per-example loss by w before averaging.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddpm.errors import UserError

TIMESTEP_SAMPLERS = ("uniform", "loss-aware")


class UniformSampler:
    """t ~ U{0, ..., T−1} with weight 1, [DDPM] Algorithm 1."""

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps

    def probabilities(self) -> Tensor:
        """p_t for t = 0..T−1, float64 [T]."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Timesteps [B] (int64) and importance weights 1 / (T p_t) [B] (float32) on ``device``."""
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record the losses seen at timesteps ``t`` (nothing to learn for the uniform sampler)."""

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


class LossAwareSampler(UniformSampler):
    """Importance sampling of t for L_vlb, [IDDPM] section 3.3 (eq. 18).

    p_t ∝ √E[L_t²], the expectation estimated from the last ``history`` losses seen at each t.
    Until every t has that many, t is drawn uniformly. A small ``uniform_prob`` is mixed in so
    that no step is starved. Under DDP, call :meth:`update` with the losses of all ranks
    (gather them first) so that every rank keeps the same history and draws alike.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_prob = uniform_prob
        self.loss_history = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.long)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history).all())

    def probabilities(self) -> Tensor:
        if not self.warmed_up():
            return super().probabilities()
        p = (self.loss_history**2).mean(dim=1).sqrt()
        p = p / p.sum()
        return p * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: Tensor, losses: Tensor) -> None:
        for ti, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            n = int(self.loss_counts[ti])
            if n == self.history:
                # Keep the newest `history` losses: shift out the oldest.
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:].clone()
                self.loss_history[ti, -1] = loss
            else:
                self.loss_history[ti, n] = loss
                self.loss_counts[ti] += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.loss_history.copy_(state["loss_history"])
        self.loss_counts.copy_(state["loss_counts"])


def make_timestep_sampler(name: str, num_timesteps: int) -> UniformSampler:
    """A timestep sampler by name: ``"uniform"`` or ``"loss-aware"``."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-aware":
        return LossAwareSampler(num_timesteps)
    raise UserError(f"unknown timestep sampler {name!r}; choose one of {', '.join(TIMESTEP_SAMPLERS)}")
