"""What a model is conditioned on: a training batch, or the prompts of a sampling call, turned into
the network's keyword arguments.

Classifier-free guidance (Ho and Salimans 2022) trains one network for the conditional and the
unconditional model by dropping the condition to a null one at random (a class label to −1, a
caption to the empty one); the drops are drawn from the run's generator of t, so a resumed run
repeats them. Each kind of training condition is one small callable (:func:`training_condition`
picks the run's); :class:`TextPrompts` is the sampling side of text conditioning, the
:class:`ddpm.generate.Conditioning` that :func:`ddpm.generate.generate` takes.

Text reaches the network in one of two forms: token ids, for a :class:`~ddpm.models.text_to_image.
TextToImage` network that trains its own encoder (GLIDE), or a frozen encoder's embeddings, passed
to the :class:`~ddpm.models.ConditionalUNet` directly (Stable Diffusion, Imagen). A training set's
captions are tokenized, or embedded, once (:class:`Captions`), as the latents of latent diffusion
are encoded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.cache import ArrayCache, CacheWriter, fingerprint, module_fingerprint
from ddpm.data import Batch
from ddpm.diffusion import NULL_LABEL
from ddpm.errors import UserError
from ddpm.models import ConditionalUNet, build_network
from ddpm.models.text_encoder import TextEmbedding, TextEncoder
from ddpm.models.text_to_image import TextToImage, check_fit, takes_pooled, unet_kwargs
from ddpm.models.text_transformer import TextTransformer
from ddpm.superres import SuperResolution
from ddpm.text import load_text_encoder
from ddpm.tokenizer import WordTokenizer


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


@dataclass
class TextPrompts:
    """Prompts -> a text-conditional network's keyword arguments: the token ids for a network with
    its own (trainable) encoder, else the frozen ``encoder``'s embeddings for the U-Net, with the
    pooled vector when the U-Net takes it (``pooled``)."""

    encoder: TextEncoder
    pooled: bool = False

    def model_kwargs(self, prompts: Sequence[str], device: torch.device) -> dict[str, Tensor]:
        tokens = self.encoder.tokenize(list(prompts))
        if self.encoder.trainable:
            return {"input_ids": tokens.input_ids.to(device), "attention_mask": tokens.attention_mask.to(device)}
        with torch.no_grad():
            embedding = self.encoder(tokens.input_ids.to(self.encoder.device),
                                     tokens.attention_mask.to(self.encoder.device))
        kwargs = unet_kwargs(embedding, self.pooled, self.encoder.masks_padding)
        return {k: v.to(device) for k, v in kwargs.items()}


class Captions:
    """The batch's captions, each dropped to the empty caption with probability ``dropout``.

    The distinct captions (and the empty one) are tokenized once; for a frozen encoder they are
    also embedded once, in batches, and each step gathers its rows of that cache, as
    :class:`~ddpm.latent.LatentData` holds a training set's latents.
    """

    def __init__(self, captions: Sequence[str], encoder: TextEncoder, dropout: float, pooled: bool = False,
                 batch_size: int = 256, progress: bool = False, cache: str | Path | None = None) -> None:
        distinct = sorted(set(captions) | {""})
        row = {caption: i for i, caption in enumerate(distinct)}
        self.rows = torch.tensor([row[c] for c in captions], dtype=torch.long)
        self.empty, self.dropout, self.pooled = row[""], dropout, pooled
        self.trainable, self.masks_padding = encoder.trainable, encoder.masks_padding
        if cache is not None:  # a streamed set's: written once to disk, memory-mapped (ddpm.cache)
            self._from_cache(ArrayCache(cache, "captions", fingerprint(distinct, _encoder_key(encoder))), distinct,
                             encoder, batch_size, progress)
            return
        tokens = encoder.tokenize(distinct)
        self.input_ids, self.attention_mask = tokens.input_ids, tokens.attention_mask
        if not self.trainable:
            self.embeddings = _embed_all(encoder, tokens.input_ids, tokens.attention_mask, batch_size, progress)

    def _from_cache(self, store: ArrayCache, distinct: list[str], encoder: TextEncoder, batch_size: int,
                    progress: bool) -> None:
        """The tokens (and a frozen encoder's embeddings) of ``distinct`` from ``store``, made first if absent."""
        if not store.exists:
            tokens = encoder.tokenize(distinct)
            with store.writing() as out:
                for name in ("input_ids", "attention_mask"):
                    value = getattr(tokens, name).numpy()
                    out.array(name, value.shape, value.dtype)[:] = value
                if not self.trainable:
                    _embed_all(encoder, tokens.input_ids, tokens.attention_mask, batch_size, progress, out)
        arrays, _ = store.load()
        self.input_ids, self.attention_mask = arrays["input_ids"], arrays["attention_mask"]
        if not self.trainable:
            self.embeddings = (arrays["hidden_states"], arrays["embedding_mask"], arrays["pooled"])

    def __call__(self, batch: Batch, generator: torch.Generator, device: torch.device) -> dict[str, Tensor]:
        rows = self.rows[batch.idx]
        drop = torch.rand(len(rows), generator=generator) < self.dropout
        rows = torch.where(drop, torch.full_like(rows, self.empty), rows)
        if self.trainable:
            return {"input_ids": self.input_ids[rows].to(device),
                    "attention_mask": self.attention_mask[rows].to(device)}
        embedding = TextEmbedding(*(part[rows].to(device) for part in self.embeddings))
        return unet_kwargs(embedding, self.pooled, self.masks_padding)


def _encoder_key(encoder: TextEncoder) -> list[Any]:
    """What a caption cache depends on: a trained-with-the-U-Net encoder's tokenizer (its weights change,
    its tokens do not), a frozen encoder's weights."""
    tokenizer = getattr(encoder, "tokenizer", None)
    if encoder.trainable and tokenizer is not None and hasattr(tokenizer, "tokens"):
        return [type(encoder).__name__, "tokens", tokenizer.tokens, getattr(encoder, "context_length", None)]
    return [type(encoder).__name__, "weights", module_fingerprint(encoder)]


@torch.no_grad()
def _embed_all(encoder: TextEncoder, input_ids: Tensor, attention_mask: Tensor, batch_size: int,
               progress: bool, out: CacheWriter | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """A frozen encoder's hidden states, attention mask and pooled vector for every row, on the CPU; with
    ``out``, written into its arrays ``hidden_states``, ``embedding_mask`` and ``pooled`` instead."""
    hidden, masks, pooled = [], [], []
    arrays = None
    for start in tqdm(range(0, len(input_ids), batch_size), desc="embedding the captions", unit="batch",
                      disable=not progress):
        ids, mask = (x[start:start + batch_size].to(encoder.device) for x in (input_ids, attention_mask))
        embedding = encoder(ids, mask)
        parts = [embedding.hidden_states.float().cpu(), embedding.attention_mask.cpu(), embedding.pooled.float().cpu()]
        if out is None:
            for kept, part in zip((hidden, masks, pooled), parts):
                kept.append(part)
            continue
        if arrays is None:
            arrays = [out.array(name, (len(input_ids), *part.shape[1:]), part.numpy().dtype)
                      for name, part in zip(("hidden_states", "embedding_mask", "pooled"), parts)]
        for array, part in zip(arrays, parts):
            array[start:start + len(part)] = part.numpy()
    return None if out is not None else (torch.cat(hidden), torch.cat(masks), torch.cat(pooled))


def training_condition(config: Any, captions: Captions | None = None) -> TrainingCondition:
    """The condition a run (a :class:`ddpm.config.RunConfig`) trains with: its data's ``captions``
    for a text-conditional run, else the class labels or nothing."""
    if captions is not None:
        return captions
    labels = ClassLabels(config.train.label_dropout) if config.train.class_cond else None
    if getattr(config.model, "low_res_channels", 0):
        return SuperResolution(config.train.low_res_factor, config.train.max_noise_level, labels)
    return labels or unconditional


# ---------------------------------------------------------------------------- a text-to-image run's parts


def run_network(config: Any, tokenizer: WordTokenizer | None = None) -> torch.nn.Module:
    """The network a run (a :class:`ddpm.config.RunConfig`) trains, freshly initialised: a
    :class:`~ddpm.models.text_to_image.TextToImage` (the U-Net with the text transformer of the
    ``text`` section, on ``tokenizer``'s vocabulary) when the run trains its own text encoder, else
    the network of the ``model`` section."""
    if config.text is None:
        return build_network(config.model)
    if tokenizer is None:
        raise ValueError("a run that trains its text encoder needs its tokenizer")
    return TextToImage(ConditionalUNet(config.model), TextTransformer(config.text, tokenizer))


def frozen_text_encoder(config: Any, network: torch.nn.Module, device: torch.device | str) -> TextEncoder:
    """The frozen encoder of a text-to-image run (``data.text_encoder``), checked against its U-Net."""
    encoder = load_text_encoder(config.data.text_encoder, device)
    check_fit(network, encoder, config.data.text_encoder)
    return encoder


def prompts_of(network: torch.nn.Module, frozen: TextEncoder | None) -> TextPrompts:
    """The sampling side of a text-conditional network: its own encoder's token ids, or ``frozen``'s
    embeddings."""
    if isinstance(network, TextToImage):
        return TextPrompts(network.text_encoder)
    if frozen is None:
        raise UserError("a text-conditional U-Net needs its text encoder to turn prompts into embeddings")
    return TextPrompts(frozen, takes_pooled(network))


def network_meta(network: torch.nn.Module) -> dict[str, Any]:
    """What a checkpoint must keep beside the weights to rebuild ``network``: the vocabulary of a
    text transformer trained with the U-Net."""
    if isinstance(network, TextToImage) and isinstance(network.text_encoder, TextTransformer):
        return {"tokenizer": network.text_encoder.tokenizer.tokens}
    return {}
