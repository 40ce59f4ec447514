"""The one interface of a text encoder, as text-to-image training and sampling use it.

A :class:`TextEncoder` turns prompts into what a U-Net is conditioned on: ``tokenize`` gives a
:class:`TokenBatch` (token ids padded to the encoder's context, and which of them are real),
``forward`` a :class:`TextEmbedding` (one vector per position for cross-attention, which positions
the cross-attention may see, and one pooled vector per prompt, which GLIDE adds to the time
embedding), and ``encode`` does both. Its attributes say what a U-Net must match:
``hidden_size`` is the ``cross_attention_dim`` of a cross-attention U-Net, ``pooled_size`` the
width of the pooled vector, ``context_length`` the number of positions.

The encoders are frozen ones from transformers (CLIP as Stable Diffusion uses it, T5 as Imagen
does: :mod:`ddpm.text`) and a small transformer trained with the U-Net, as GLIDE's
(:mod:`ddpm.models.text_transformer`). :func:`ddpm.text.load_text_encoder` reads any of them from
a directory. The empty prompt ``""`` is the unconditional prompt of classifier-free guidance and
encodes like any other. A prompt longer than the context is cut, with one :class:`DataWarning`
per batch that shows what was dropped (:func:`warn_truncated`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ddpm.errors import DataWarning

__all__ = ["Cut", "TextEmbedding", "TextEncoder", "TokenBatch", "as_prompts", "warn_truncated"]


@dataclass(frozen=True)
class TokenBatch:
    """Prompts as token ids, padded to the encoder's context.

    Attributes:
        input_ids: ``[B, L]`` long, the ids (special tokens included), padded on the right.
        attention_mask: ``[B, L]`` bool, True at the tokenizer's real tokens (specials included),
            False at padding.
    """

    input_ids: Tensor
    attention_mask: Tensor

    def to(self, device: str | torch.device) -> TokenBatch:
        """The batch on ``device``."""
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device))


@dataclass(frozen=True)
class TextEmbedding:
    """What a U-Net is conditioned on.

    Attributes:
        hidden_states: ``[B, L, D]``, one vector per position: the keys and values of the U-Net's
            cross-attention (``D`` is the encoder's ``hidden_size``).
        attention_mask: ``[B, L]`` bool, the positions the cross-attention attends to. For an
            encoder that masks its padding (T5, the text transformer) these are the real tokens and
            the states elsewhere carry nothing; for CLIP as Stable Diffusion uses it, every
            position (its U-Net sees all 77, padding included).
        pooled: ``[B, P]``, one vector per prompt (``P`` is the encoder's ``pooled_size``).
    """

    hidden_states: Tensor
    attention_mask: Tensor
    pooled: Tensor


@dataclass(frozen=True)
class Cut:
    """A prompt cut to the context: its index in the batch, its length in tokens (special tokens
    included) before the cut, and the text of the tokens dropped."""

    index: int
    tokens: int
    dropped: str


def as_prompts(prompts: str | Sequence[str]) -> list[str]:
    """``prompts`` as a list of strings (one string is one prompt); a non-string prompt raises
    :class:`TypeError`, it being a caller's bug."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    wrong = [i for i, p in enumerate(items) if not isinstance(p, str)]
    if wrong:
        raise TypeError(f"prompts must be strings; prompt {wrong[0]} is {type(items[wrong[0]]).__name__}")
    return items


def warn_truncated(cuts: Sequence[Cut], context_length: int) -> None:
    """One :class:`DataWarning` for a batch whose prompts in ``cuts`` were cut to ``context_length``
    tokens, naming the first one's dropped words and counting the others; nothing if none was.

    Prompts are numbered from 0, as in the batch: ``prompt 3 is 91 tokens, longer than the
    context of 77: dropped "the words that were cut"``.
    """
    if not cuts:
        return
    first = cuts[0]
    message = (f"prompt {first.index} is {first.tokens} tokens, longer than the context of {context_length}: "
               f'dropped "{first.dropped}"')
    if len(cuts) > 1:
        others = ", ".join(str(c.index) for c in cuts[1:6]) + (", ..." if len(cuts) > 6 else "")
        message += f"; {len(cuts) - 1} more cut too (prompt {others})"
    warnings.warn(message, DataWarning, stacklevel=3)


class TextEncoder(nn.Module):
    """A text encoder: prompts -> :class:`TokenBatch` -> :class:`TextEmbedding`.

    Subclasses implement :meth:`tokenize` and :meth:`forward` and set the attributes below.
    """

    #: Positions per prompt, special tokens included: ``L`` of every batch.
    context_length: int
    #: ``D``, the width of ``hidden_states`` (a cross-attention U-Net's ``cross_attention_dim``).
    hidden_size: int
    #: ``P``, the width of ``pooled``.
    pooled_size: int
    #: Whether the encoder is trained with the U-Net (False: frozen, its parameters need no grad).
    trainable: ClassVar[bool]
    #: Whether ``TextEmbedding.attention_mask`` masks the padding (False: every position is seen).
    masks_padding: ClassVar[bool]

    def tokenize(self, prompts: str | Sequence[str]) -> TokenBatch:
        """The prompts' token ids ``[B, context_length]`` and real-token mask, on the CPU; prompts
        longer than the context are cut, with one :class:`DataWarning` (:func:`warn_truncated`)."""
        raise NotImplementedError

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextEmbedding:
        """The embedding of a :class:`TokenBatch`'s ``input_ids`` ``[B, L]`` and ``attention_mask``
        ``[B, L]`` (on the encoder's device)."""
        raise NotImplementedError

    def encode(self, prompts: str | Sequence[str]) -> TextEmbedding:
        """``forward`` of ``tokenize(prompts)``, on the encoder's device."""
        batch = self.tokenize(prompts).to(self.device)
        return self(batch.input_ids, batch.attention_mask)

    @property
    def device(self) -> torch.device:
        """Where the encoder's parameters are."""
        return next(self.parameters()).device
