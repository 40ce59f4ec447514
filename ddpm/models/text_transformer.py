"""GLIDE's text transformer (Nichol et al. 2022, section 2.3), trained from scratch with the U-Net,
on a word-level tokenizer built from the training captions (:mod:`ddpm.tokenizer`).

GLIDE encodes a caption as ``K`` tokens, each a token embedding plus a learned positional
embedding, and runs them through a transformer: residual blocks of pre-LayerNorm multi-head
self-attention and a 4x-wide GELU MLP (``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``), with
full, not causal, attention (``causal=True`` masks it as CLIP's does, an option, not GLIDE's),
followed by a final LayerNorm. Its output conditions the U-Net twice:
the sequence is projected into every attention layer's context (our ``hidden_states``), and "the
final token embedding is used in place of a class embedding" (our ``pooled``), added to the time
embedding after a linear map that belongs to the U-Net. The paper's model has 24 blocks of width
2048 (about 1.2 billion parameters); the released small one, 16 of width 512 with 8 heads and a
context of 128 tokens (:data:`PRESETS`).

Two choices differ from GLIDE's code (openai/glide-text2im), which replaces the padding's inputs
by a learned per-position embedding, lets every position attend to it, and pools at the last
position, padding or not. Here the padding is masked out of the attention's keys, its output is
zero, and the pooled vector is the state at the last real token (``<end>``, which every prompt
has, as CLIP pools at its end token): a prompt's states and pooled vector then do not depend on
how much padding follows it. The parameter names and the fused query-key-value layout (per head:
query, key, value) are GLIDE's.

Initialisation: GLIDE's code, adapted from CLIP's, publishes no training code, so CLIP's
``initialize_parameters`` (Radford et al. 2021) is used: token embeddings N(0, 0.02^2), positional
N(0, 0.01^2), the query-key-value map N(0, 1/width), the MLP's first layer N(0, 1/(2 width)), and
both output maps of every block N(0, 1/(2 width layers)), which keeps the residual stream's
variance from growing with depth; biases 0, LayerNorms (1, 0).

A model directory holds ``config.json`` (format ``ddpm-text-transformer``), ``model.safetensors``
and ``tokenizer.json``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.errors import UserError, is_int
from ddpm.models.io import ModelConfig, SavedModel
from ddpm.models.text_encoder import TextEmbedding, TextEncoder, TokenBatch
from ddpm.tokenizer import WordTokenizer

TOKENIZER_NAME = "tokenizer.json"


@dataclass(frozen=True)
class TextTransformerConfig(ModelConfig):
    """The shape of a :class:`TextTransformer` (the vocabulary is the tokenizer's). The defaults
    are the small GLIDE released (openai/glide-text2im: ``xf_width``, ``xf_layers``, ``xf_heads``,
    ``text_ctx``); :data:`PRESETS` names the others.

    Attributes:
        width: the token embeddings' width, ``hidden_size`` and ``pooled_size``.
        layers: residual blocks.
        heads: attention heads; must divide ``width``.
        context_length: tokens per prompt, ``<start>`` and ``<end>`` included.
        causal: attend only to the tokens before (CLIP's mask) instead of all of them (GLIDE's):
            a later word cannot change an earlier word's state, so the order of the words is in
            the states from the first block on (see ``bench/RESULTS.md`` for what it does on
            MNIST-pairs captions).
    """

    KIND: ClassVar[str] = "text transformer"

    width: int = 512
    layers: int = 16
    heads: int = 8
    context_length: int = 128
    causal: bool = False

    def __post_init__(self) -> None:
        for name in ("width", "layers", "heads", "context_length"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise UserError(f"TextTransformerConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.causal, bool):
            raise UserError(f"TextTransformerConfig.causal must be true or false, got {self.causal!r}")
        if self.width % self.heads:
            raise UserError(f"TextTransformerConfig.heads {self.heads} does not divide width {self.width}")
        if self.context_length < 2:
            raise UserError(f"TextTransformerConfig.context_length must be >= 2 (<start> and <end>), "
                            f"got {self.context_length}")





PRESETS: dict[str, TextTransformerConfig] = {
    # The paper's (section 2.3: "24 residual blocks of width 2048, resulting in roughly 1.2
    # billion parameters"; 1,208,598,528 in the blocks, tested). Heads and context are the released
    # code's: 64 channels per head, 128 tokens.
    "glide": TextTransformerConfig(width=2048, layers=24, heads=32, context_length=128),
    # The small model openai/glide-text2im released (model_and_diffusion_defaults).
    "glide-filtered": TextTransformerConfig(),
    # Sized for 2 CPU cores and MNIST-pairs captions ("a four on the left and a two on the right":
    # 11 words, 13 tokens), a vocabulary of a few dozen words: 2 blocks of width 64, 4 heads of 16
    # channels, 32 tokens. Causal: with GLIDE's full attention its states after 30 CPU minutes held
    # what the captions' word counts hold and nothing of their order (linear probes, bench/RESULTS.md),
    # so it drew the asked digits on either side; with CLIP's mask the first digit's state cannot see
    # the second and the order is in the states from the start, and the same recipe went from 0.309 /
    # 0.256 to 0.904 / 0.846 of seen / held-out pairs right at guidance 1.
    "mnist-pairs": TextTransformerConfig(width=64, layers=2, heads=4, context_length=32, causal=True),
    # For tests.
    "tiny": TextTransformerConfig(width=32, layers=2, heads=2, context_length=16),
}
TextTransformerConfig.PRESETS = PRESETS


class MultiheadAttention(nn.Module):
    """Self-attention: ``[B, L, width]`` and a boolean mask of what each position may attend to
    (``[B, 1, 1, L]`` or ``[B, 1, L, L]``, True = attend) -> ``[B, L, width]``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, attend: Tensor) -> Tensor:
        b, length, width = x.shape
        # GLIDE's layout: the fused output is, per head, that head's query, key and value.
        qkv = self.c_qkv(x).view(b, length, self.heads, 3 * width // self.heads).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)  # [B, heads, L, width / heads] each
        # softmax(q k^T / sqrt(d)) v over the keys ``attend`` allows.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        return self.c_proj(y.transpose(1, 2).reshape(b, length, width))


class MLP(nn.Module):
    """``c_proj(gelu(c_fc(x)))``, 4x wide in the middle."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """``x + attn(ln_1(x))``, then ``+ mlp(ln_2(x))``: a pre-LayerNorm transformer block."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, x: Tensor, attend: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x), attend)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """``layers`` :class:`ResidualAttentionBlock` in a row (GLIDE's ``transformer.resblocks``)."""

    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: Tensor, attend: Tensor) -> Tensor:
        for block in self.resblocks:
            x = block(x, attend)
        return x


class TextTransformer(SavedModel, TextEncoder):
    """GLIDE's text transformer with its word tokenizer: a trainable :class:`TextEncoder`.

    ``hidden_states`` ``[B, L, width]`` are the final LayerNorm's output at the real tokens and 0 at
    the padding; ``attention_mask`` is the real tokens; ``pooled`` ``[B, width]`` is the state at
    each prompt's last real token (``<end>``).
    """

    CONFIG = TextTransformerConfig
    FORMAT = "ddpm-text-transformer"
    WHAT = "text transformer"
    LAYOUT = None  # diffusers has no such model
    trainable: ClassVar[bool] = True
    masks_padding: ClassVar[bool] = True

    def __init__(self, config: TextTransformerConfig, tokenizer: WordTokenizer) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        width = config.width
        self.token_embedding = nn.Embedding(len(tokenizer), width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.transformer = Transformer(width, config.layers, config.heads)
        self.final_ln = nn.LayerNorm(width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CLIP's initialisation (see the module's docstring)."""
        width, layers = self.config.width, self.config.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        out_std = (2 * width * layers) ** -0.5
        for block in self.transformer.resblocks:
            for linear, std in ((block.attn.c_qkv, width ** -0.5), (block.attn.c_proj, out_std),
                                (block.mlp.c_fc, (2 * width) ** -0.5), (block.mlp.c_proj, out_std)):
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
            for norm in (block.ln_1, block.ln_2):
                norm.reset_parameters()
        self.final_ln.reset_parameters()

    @property
    def context_length(self) -> int:  # type: ignore[override]
        return self.config.context_length

    @property
    def hidden_size(self) -> int:  # type: ignore[override]
        return self.config.width

    @property
    def pooled_size(self) -> int:  # type: ignore[override]
        return self.config.width

    def tokenize(self, prompts: str | Sequence[str]) -> TokenBatch:
        return self.tokenizer.tokenize(prompts, self.config.context_length)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextEmbedding:
        """The embedding of ``input_ids`` ``[B, L]`` (``L <= context_length``, right-padded, each
        row with at least one real token, as :meth:`tokenize` makes them) and their mask."""
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be [B, L], got {tuple(input_ids.shape)} and "
                             f"{tuple(attention_mask.shape)}")
        if input_ids.shape[1] > self.context_length:
            raise ValueError(f"{input_ids.shape[1]} tokens, more than the context of {self.context_length}")
        mask = attention_mask.bool()
        length = input_ids.shape[1]
        attend = mask[:, None, None, :]  # the padding's keys are left out
        if self.config.causal:  # and, with CLIP's mask, the keys after each query
            attend = attend & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]
        x = self.final_ln(self.transformer(x, attend)) * mask[..., None]
        # The last real token: cumsum stops growing there, and argmax takes the first maximum.
        last = mask.long().cumsum(dim=1).argmax(dim=1)
        pooled = x[torch.arange(x.shape[0], device=x.device), last]
        return TextEmbedding(x, mask, pooled)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``tokenizer.json``, ``model.safetensors`` and ``config.json`` (last: it says the
        directory is complete)."""
        self.tokenizer.save(Path(directory) / TOKENIZER_NAME)
        super().save_pretrained(directory)

    @classmethod
    def build_saved(cls, config: TextTransformerConfig, directory: Path) -> TextTransformer:
        return cls(config, WordTokenizer.load(directory / TOKENIZER_NAME))

    def load_weights(self, state_dict: Mapping[str, Tensor], source: str | Path = "weights") -> None:
        """As :meth:`SavedModel.load_weights`, with a clear message when the weights are for
        another vocabulary than the tokenizer's."""
        embedding = state_dict.get("token_embedding.weight")
        if embedding is not None and embedding.ndim == 2 and embedding.shape[0] != len(self.tokenizer):
            raise UserError(f"{source}: weights for a vocabulary of {embedding.shape[0]} tokens, but the tokenizer "
                            f"has {len(self.tokenizer)}")
        super().load_weights(state_dict, source)
