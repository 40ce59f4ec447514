"""What a model is conditioned on during training: a training batch turned into the network's keyword
arguments.

Classifier-free guidance (Ho and Salimans 2022) trains one network for the conditional and the
unconditional model by dropping the condition to a null one at random (a class label to −1, a
caption to the empty one); the drops are drawn from the run's generator of t, so a resumed run
repeats them. Each kind of condition is one small callable; :func:`training_condition` picks the
run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ddpm.data import Batch
from ddpm.diffusion import NULL_LABEL


class TrainingCondition(Protocol):
    """A training batch -> the network's keyword arguments, with the dropped conditions drawn from
    ``generator`` (a CPU generator)."""

    def __call__(self, batch: Batch, generator: torch.Generator, device: torch.device) -> dict[str, Tensor]: ...


def unconditional(batch: Batch, generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
    """No condition: the network sees x_t and t only."""
    return {}


@dataclass(frozen=True)
class ClassLabels:
    """The batch's class labels, each dropped to the null label −1 with probability ``dropout``."""

    dropout: float

    def __call__(self, batch: Batch, generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
        drop = torch.rand(len(batch.y), generator=generator) < self.dropout
        return {"y": torch.where(drop, torch.full_like(batch.y, NULL_LABEL), batch.y).to(device)}


def training_condition(config: Any) -> TrainingCondition:
    """The condition a run (a :class:`ddpm.config.RunConfig`) trains with."""
    return ClassLabels(config.train.label_dropout) if config.train.class_cond else unconditional
