"""A text-conditional U-Net and the text encoder it is trained with, as one network (GLIDE).

GLIDE (Nichol et al. 2022, section 2.3) trains a transformer on the captions jointly with the
diffusion model: its token states are the context of the U-Net's attention and its final token's
state (the pooled vector) is added to the time embedding. :class:`TextToImage` is that pair: token
ids in, the U-Net's prediction out, so that the optimizer, the EMA and the checkpoints see one
module. A frozen encoder (CLIP or T5, as Stable Diffusion and Imagen use them) stays outside the
network: its embeddings are computed once and passed to the :class:`ConditionalUNet` directly
(:func:`unet_kwargs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ddpm.errors import UserError
from ddpm.models.io import load_matching_weights
from ddpm.models.text_encoder import TextEmbedding, TextEncoder
from ddpm.models.unet_2d_condition import ConditionalUNet


def takes_pooled(unet: ConditionalUNet) -> bool:
    """Whether the U-Net adds a pooled text vector to its time embedding (``class_embed_type="projection"``)."""
    return unet.config.class_embed_type == "projection"


def check_fit(unet: ConditionalUNet, encoder: TextEncoder, source: str) -> None:
    """:class:`UserError` unless the encoder's widths are what the U-Net attends to and adds."""
    config = unet.config
    if encoder.hidden_size != config.cross_attention_dim:
        raise UserError(f"the text encoder {source} gives {encoder.hidden_size}-wide token states, but the U-Net's "
                        f"cross-attention takes {config.cross_attention_dim}: set --model.cross_attention_dim "
                        f"{encoder.hidden_size}")
    if takes_pooled(unet) and encoder.pooled_size != config.projection_class_embeddings_input_dim:
        raise UserError(f"the text encoder {source} pools to {encoder.pooled_size}, but the U-Net's projection takes "
                        f"{config.projection_class_embeddings_input_dim}: set "
                        f"--model.projection_class_embeddings_input_dim {encoder.pooled_size}")


def unet_kwargs(embedding: TextEmbedding, pooled: bool, masks_padding: bool) -> dict[str, Tensor]:
    """A :class:`ConditionalUNet`'s keyword arguments for a text embedding: the token states, their
    mask when the encoder masks its padding (CLIP's U-Net sees every position, so none is passed,
    as diffusers' pipeline does), and the pooled vector when the U-Net takes it."""
    kwargs = {"encoder_hidden_states": embedding.hidden_states}
    if masks_padding:
        kwargs["encoder_attention_mask"] = embedding.attention_mask
    if pooled:
        kwargs["class_labels"] = embedding.pooled
    return kwargs


class TextToImage(nn.Module):
    """A :class:`ConditionalUNet` with the trainable text encoder it learns with; called as
    ``model(x_t, t, input_ids, attention_mask)`` (a :class:`~ddpm.models.text_encoder.TokenBatch`'s
    tensors). Its state dict holds ``unet.*`` and ``text_encoder.*``."""

    def __init__(self, unet: ConditionalUNet, text_encoder: TextEncoder) -> None:
        super().__init__()
        check_fit(unet, text_encoder, "trained with the U-Net")
        self.unet = unet
        self.text_encoder = text_encoder

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.unet.sample_shape

    @property
    def num_classes(self) -> int:
        return 0

    def forward(self, x_t: Tensor, t: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        embedding = self.text_encoder(input_ids, attention_mask)
        return self.unet(x_t, t, **unet_kwargs(embedding, takes_pooled(self.unet), self.text_encoder.masks_padding))

    def load_weights(self, state_dict: Mapping[str, Tensor], source: str | Path = "weights") -> None:
        """Copy ``state_dict`` in, or :class:`UserError` naming ``source`` and the keys that do not fit."""
        load_matching_weights(self, state_dict, source, "text-to-image model")
