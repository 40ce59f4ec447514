"""Text encoders for text-to-image diffusion behind one interface (:class:`TextEncoder`): frozen
CLIP as Stable Diffusion uses it, frozen T5 as Imagen does, and GLIDE's transformer trained from
scratch (:class:`TextTransformer`). :func:`load_text_encoder` recognises which one a directory holds.

**CLIP** (:class:`CLIPTextEncoder`) follows diffusers' ``StableDiffusionPipeline.encode_prompt``
so that a pipeline built on it can reproduce diffusers' images: prompts are padded to
``tokenizer.model_max_length`` (77) and cut there; the ids go to ``CLIPTextModel`` without the
attention mask (the mask is passed only if the model's config sets ``use_attention_mask``, which
no Stable Diffusion text encoder does; CLIP's causal attention keeps the padding out of the real
tokens' states anyway); ``hidden_states`` is the last hidden state, after the final LayerNorm,
for Stable Diffusion 1.x and 2.x alike. (2.x conditions on the penultimate layer of OpenCLIP
ViT-H/14, and its published ``text_encoder`` is that model with the last of its 24 layers left
out, so its last hidden state is that layer's; ``clip_skip = k`` takes the state ``k`` layers
earlier through the final LayerNorm, as diffusers' ``clip_skip``.) The padding is the
tokenizer's pad token (``<|endoftext|>`` for 1.x, ``!`` for 2.x), and the U-Net's
cross-attention sees all 77 positions, padding included: ``TextEmbedding.attention_mask`` is all
True, while the :class:`TokenBatch`'s mask still marks the real tokens. ``pooled`` is CLIP's
``pooler_output``, the state at the end-of-text token.

**T5** (:class:`T5TextEncoder`), as Imagen (Saharia et al. 2022) uses its encoder: the last hidden
state of ``T5EncoderModel`` computed with the attention mask, which is also the cross-attention's.
``pooled`` is the mean of the real tokens' states, for the pooled vector Imagen adds to the time
embedding (imagen-pytorch averages every position after putting a learned null embedding at the
padding, a U-Net's parameter, so the U-Net would do that part). The context is the tokenizer's
``model_max_length`` unless given (512, T5's training length, when the tokenizer sets none);
padding does not change the real tokens' states, so a shorter context only saves work.

Both are frozen: parameters without gradients, always in eval mode (``train()`` leaves them
there; T5's dropout would otherwise be on), ``trainable = False``. transformers is an optional
dependency (``pip install 'ddpm[text]'``), imported only when one of them is loaded.

Safety: weights are read from ``model.safetensors`` only (``use_safetensors=True``); a directory
with only ``pytorch_model.bin``, a pickle, is refused with a :class:`UserError` rather than
unpickled. Models and tokenizers are built by their own transformers classes, which never run code
from the directory (no ``trust_remote_code``), and nothing is downloaded (``local_files_only``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from ddpm.checkpoints import load_json
from ddpm.errors import UserError, is_int
from ddpm.models.io import CONFIG_NAME, read_format
from ddpm.models.text_encoder import Cut, TextEmbedding, TextEncoder, TokenBatch, as_prompts, warn_truncated
from ddpm.models.text_transformer import TextTransformer, TextTransformerConfig
from ddpm.tokenizer import WordTokenizer

__all__ = [
    "CLIPTextEncoder",
    "T5TextEncoder",
    "TextEmbedding",
    "TextEncoder",
    "TextTransformer",
    "TextTransformerConfig",
    "TokenBatch",
    "WordTokenizer",
    "load_text_encoder",
    "masked_mean",
]

# A diffusers pipeline's folders (StableDiffusionPipeline, IFPipeline).
TEXT_ENCODER_FOLDER = "text_encoder"
TOKENIZER_FOLDER = "tokenizer"
PIPELINE_INDEX = "model_index.json"

# config.json's model_type of what each encoder reads: CLIP's text model (or a whole CLIP model,
# whose text half is taken), T5 (an encoder-only or a whole checkpoint).
CLIP_MODEL_TYPES = ("clip_text_model", "clip")
T5_MODEL_TYPES = ("t5",)

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# What each tokenizer needs: any one of the groups, all files of it. A CLIP tokenizer saved by
# transformers 5 is a tokenizer.json alone; Stable Diffusion's repositories have vocab.json and
# merges.txt, which CLIPTokenizer (diffusers' class) reads in every version.
CLIP_BPE_FILES = ("vocab.json", "merges.txt")
TOKENIZER_FILES = {"CLIP": (CLIP_BPE_FILES, ("tokenizer.json",)), "T5": (("tokenizer.json",), ("spiece.model",))}

T5_DEFAULT_CONTEXT = 512  # T5's pre-training input length (Raffel et al. 2020).
_NO_LIMIT = 1_000_000  # transformers' "no maximum length" is int(1e30)


def import_transformers() -> Any:
    """The transformers module; :class:`UserError` with the install command if it is missing."""
    try:
        import transformers
    except ImportError as e:
        raise UserError("CLIP and T5 text encoders need transformers: pip install 'ddpm[text]'") from e
    return transformers


def masked_mean(hidden_states: Tensor, mask: Tensor) -> Tensor:
    """The mean over the positions where ``mask`` ``[B, L]`` is True of ``hidden_states``
    ``[B, L, D]``: ``[B, D]`` (0 for a row without any)."""
    weights = mask.to(hidden_states.dtype)[..., None]
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def one_line(error: Exception) -> str:
    """An exception's message on one line (transformers' messages often span several)."""
    return " ".join(str(error).split())


class PretrainedTextEncoder(TextEncoder):
    """A frozen transformers model with its tokenizer; :class:`CLIPTextEncoder` and
    :class:`T5TextEncoder` say how to call it."""

    trainable: ClassVar[bool] = False

    def __init__(self, model: Any, tokenizer: Any, context_length: int, hidden_size: int) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.hidden_size = self.pooled_size = hidden_size
        #: The directories the model and the tokenizer were read from (:func:`load_text_encoder`), which
        #: ``ddpm export`` copies; None for an encoder built in code.
        self.model_dir: Path | None = None
        self.tokenizer_dir: Path | None = None

    def train(self, mode: bool = True) -> PretrainedTextEncoder:
        """Frozen: stays in eval mode whatever ``mode``."""
        return super().train(False)

    def tokenize(self, prompts: str | Sequence[str]) -> TokenBatch:
        """The tokenizer's ids padded to ``context_length`` and cut there (its end token kept), as
        diffusers' pipelines call it, with one warning naming what was cut."""
        prompts = as_prompts(prompts)
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.context_length, truncation=True,
                               return_tensors="pt")
        # The untruncated ids, as StableDiffusionPipeline finds what it cut: all but the end token
        # from the context's last position on.
        full = self.tokenizer(prompts, verbose=False)["input_ids"]
        cuts = [Cut(i, len(ids), self.tokenizer.decode(ids[self.context_length - 1 : -1]).strip())
                for i, ids in enumerate(full) if len(ids) > self.context_length]
        warn_truncated(cuts, self.context_length)
        return TokenBatch(batch["input_ids"], batch["attention_mask"].bool())


def default_context(tokenizer: Any, fallback: int) -> int:
    """The tokenizer's ``model_max_length``, or ``fallback`` if it sets none."""
    length = tokenizer.model_max_length
    return length if is_int(length) and 0 < length < _NO_LIMIT else fallback


def check_context(context_length: object, limit: int | None, source: str) -> None:
    if not is_int(context_length) or context_length < 2:  # type: ignore[operator]
        raise UserError(f"{source}: context_length must be an integer >= 2, got {context_length!r}")
    if limit is not None and context_length > limit:  # type: ignore[operator]
        raise UserError(f"{source}: context_length {context_length} is more than the model's {limit} positions")


class CLIPTextEncoder(PretrainedTextEncoder):
    """Stable Diffusion's text encoder: a frozen ``CLIPTextModel`` and ``CLIPTokenizer``, called
    as ``StableDiffusionPipeline.encode_prompt`` calls them (see the module's docstring)."""

    masks_padding: ClassVar[bool] = False

    def __init__(self, model: Any, tokenizer: Any, context_length: int | None = None,
                 clip_skip: int | None = None) -> None:
        limit = model.config.max_position_embeddings
        context_length = default_context(tokenizer, limit) if context_length is None else context_length
        check_context(context_length, limit, "CLIP")
        super().__init__(model, tokenizer, context_length, model.config.hidden_size)
        #: Layers to skip from the end (diffusers' ``clip_skip``); None: the last hidden state.
        self.clip_skip = clip_skip

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextEmbedding:
        # As encode_prompt: the mask reaches CLIP only if its config asks for it.
        mask = attention_mask.long() if getattr(self.model.config, "use_attention_mask", False) else None
        with torch.no_grad():
            out = self.model(input_ids, attention_mask=mask, output_hidden_states=self.clip_skip is not None)
            if self.clip_skip is None:
                hidden = out.last_hidden_state
            else:
                # transformers 5 keeps the final LayerNorm on the model itself, 4 on its text_model.
                final_layer_norm = getattr(self.model, "text_model", self.model).final_layer_norm
                hidden = final_layer_norm(out.hidden_states[-(self.clip_skip + 1)])
        # Stable Diffusion's U-Net attends to every position, padding included.
        return TextEmbedding(hidden, torch.ones_like(attention_mask, dtype=torch.bool), out.pooler_output)


class T5TextEncoder(PretrainedTextEncoder):
    """Imagen's text encoder: a frozen ``T5EncoderModel`` and its tokenizer, the attention mask
    used; ``pooled`` is the masked mean (see the module's docstring)."""

    masks_padding: ClassVar[bool] = True

    def __init__(self, model: Any, tokenizer: Any, context_length: int | None = None) -> None:
        context_length = default_context(tokenizer, T5_DEFAULT_CONTEXT) if context_length is None else context_length
        check_context(context_length, None, "T5")
        super().__init__(model, tokenizer, context_length, model.config.d_model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextEmbedding:
        with torch.no_grad():
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask.long()).last_hidden_state
        mask = attention_mask.bool()
        return TextEmbedding(hidden, mask, masked_mean(hidden, mask))


# ---------------------------------------------------------------------------- loading


def load_text_encoder(path: str | Path, device: str | torch.device = "cpu",
                      context_length: int | None = None) -> TextEncoder:
    """The text encoder in the directory ``path``, on ``device``:

    * ours (``config.json`` with format ``ddpm-text-transformer``, ``model.safetensors``,
      ``tokenizer.json``): a :class:`TextTransformer`;
    * a transformers ``CLIPTextModel`` or ``T5EncoderModel`` (``config.json`` with its
      ``model_type``, ``model.safetensors``) with its tokenizer's files beside it: a
      :class:`CLIPTextEncoder` or :class:`T5TextEncoder`;
    * a diffusers pipeline (``text_encoder/`` and ``tokenizer/``), or its ``text_encoder/`` folder
      itself: the same, from those folders.

    ``context_length`` overrides the tokenizer's for CLIP and T5; ours is fixed by its config.
    :class:`UserError` for a missing directory, an unknown layout, a tokenizer missing its files
    (``vocab.json`` and ``merges.txt``, or ``tokenizer.json``, for CLIP; ``tokenizer.json`` or
    ``spiece.model`` for T5),
    weights only as a pickle, or transformers not installed.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory (a text encoder is a directory)")
    found = read_format(directory)
    if found == TextTransformer.FORMAT:
        model = TextTransformer.from_pretrained(directory, device)
        if context_length not in (None, model.context_length):
            raise UserError(f"{directory}: a text transformer's context is its config's ({model.context_length}), "
                            f"not {context_length}")
        return model
    if found is not None:
        raise UserError(f"{directory}: a ddpm {found!r} directory, not a text encoder")
    model_dir, tokenizer_dir = text_folders(directory)
    kind = pretrained_kind(model_dir, directory)
    return load_pretrained(kind, model_dir, tokenizer_dir, context_length).to(device)


def text_folders(directory: Path) -> tuple[Path, Path]:
    """Where the model and the tokenizer of a transformers or diffusers directory are."""
    if (directory / TEXT_ENCODER_FOLDER).is_dir():
        return directory / TEXT_ENCODER_FOLDER, directory / TOKENIZER_FOLDER
    if (directory / PIPELINE_INDEX).is_file():
        raise UserError(f"{directory}: a diffusers pipeline without a {TEXT_ENCODER_FOLDER}/ folder")
    sibling = directory.parent / TOKENIZER_FOLDER
    has_tokenizer = any((directory / name).is_file() for groups in TOKENIZER_FILES.values()
                        for group in groups for name in group)
    if directory.name == TEXT_ENCODER_FOLDER and sibling.is_dir() and not has_tokenizer:
        return directory, sibling  # a pipeline's text_encoder/ folder, its tokenizer beside it
    return directory, directory


def pretrained_kind(model_dir: Path, directory: Path) -> str:
    """``"CLIP"`` or ``"T5"``, from ``model_dir/config.json``'s ``model_type``."""
    config_path = model_dir / CONFIG_NAME
    if not config_path.is_file():
        raise UserError(
            f"{directory}: unknown layout: neither a ddpm text transformer (config.json, model.safetensors, "
            f"tokenizer.json), a transformers CLIP or T5 text model (config.json, model.safetensors and the "
            f"tokenizer's files), nor a diffusers pipeline ({TEXT_ENCODER_FOLDER}/, {TOKENIZER_FOLDER}/)")
    values = load_json(config_path)
    model_type = values.get("model_type") if isinstance(values, dict) else None
    if model_type in CLIP_MODEL_TYPES:
        return "CLIP"
    if model_type in T5_MODEL_TYPES:
        return "T5"
    what = (f"a diffusers {values['_class_name']}" if isinstance(values, dict) and "_class_name" in values
            else f"model_type {model_type!r}")
    raise UserError(f"{config_path}: {what}, not a text encoder ddpm reads (CLIP: model_type "
                    f"{' or '.join(CLIP_MODEL_TYPES)}; T5: {' or '.join(T5_MODEL_TYPES)})")


def check_files(kind: str, model_dir: Path, tokenizer_dir: Path) -> None:
    """:class:`UserError` unless the weights are safetensors and the tokenizer has its files."""
    if not any((model_dir / name).is_file() for name in SAFETENSORS_FILES):
        pickles = [name for name in PICKLE_FILES if (model_dir / name).is_file()]
        if pickles:
            raise UserError(f"{model_dir}: only {pickles[0]}, a pickle, which ddpm does not load (unpickling can run "
                            f"code); convert it to model.safetensors where you trust it (transformers' "
                            f"save_pretrained does)")
        raise UserError(f"{model_dir}: no model.safetensors")
    groups = TOKENIZER_FILES[kind]
    if not any(all((tokenizer_dir / name).is_file() for name in group) for group in groups):
        needs = " or ".join(" and ".join(group) for group in groups)
        raise UserError(f"{tokenizer_dir}: a {kind} tokenizer needs {needs}; not found there")


def load_pretrained(kind: str, model_dir: Path, tokenizer_dir: Path,
                    context_length: int | None) -> PretrainedTextEncoder:
    """A :class:`CLIPTextEncoder` or :class:`T5TextEncoder` from transformers' directories."""
    check_files(kind, model_dir, tokenizer_dir)
    transformers = import_transformers()
    if kind == "CLIP":
        # transformers 4's CLIPTokenizer reads only vocab.json and merges.txt, its fast twin only
        # tokenizer.json; in transformers 5 they are one class.
        bpe = all((tokenizer_dir / name).is_file() for name in CLIP_BPE_FILES)
        model_class, tokenizer_class, encoder_class = (
            transformers.CLIPTextModel, transformers.CLIPTokenizer if bpe else transformers.CLIPTokenizerFast,
            CLIPTextEncoder)
    else:
        model_class, tokenizer_class, encoder_class = (transformers.T5EncoderModel, transformers.T5TokenizerFast,
                                                       T5TextEncoder)
    try:
        tokenizer = tokenizer_class.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError, ImportError) as e:  # missing sentencepiece, unreadable files
        raise UserError(f"{tokenizer_dir}: cannot read the {kind} tokenizer: {one_line(e)}") from e
    try:
        model = model_class.from_pretrained(model_dir, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir}: cannot load the {kind} text model: {one_line(e)}") from e
    encoder = encoder_class(model, tokenizer, context_length)
    encoder.model_dir, encoder.tokenizer_dir = model_dir, tokenizer_dir
    return encoder
