"""A word-level tokenizer built from a data set's captions, for the text transformer trained from
scratch (:mod:`ddpm.models.text_transformer`).

A caption is lower-cased and split into words (runs of letters, digits and underscores) and
punctuation marks (every other non-space character, one at a time): ``"7 and 3."`` is ``7``,
``and``, ``3``, ``.``. The vocabulary is the four special tokens, then every word of the captions
in sorted (code-point) order, so that the same captions give the same ids whatever their order:

====  ===========  ===========================================================
id    token        meaning
====  ===========  ===========================================================
0     ``<pad>``    padding after the end (masked)
1     ``<start>``  first token of every prompt
2     ``<end>``    last token of every prompt; the text transformer pools here
3     ``<unk>``    a word not in the vocabulary
====  ===========  ===========================================================

A prompt becomes ``<start> words... <end> <pad>...``, ``context_length`` ids in all; the empty
prompt (classifier-free guidance's unconditional one) is ``<start> <end> <pad>...``. A prompt with
more than ``context_length - 2`` words keeps its first ones and its ``<end>``, with one
:class:`~ddpm.errors.DataWarning` per batch naming what was dropped.

Saved as ``tokenizer.json``: ``{"format": "ddpm-word-tokenizer", "format_version": 1, "tokens":
[...]}``, the tokens in id order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ddpm.checkpoints import load_json, save_json
from ddpm.errors import UserError
from ddpm.models.text_encoder import Cut, TokenBatch, as_prompts, warn_truncated

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)

FORMAT = "ddpm-word-tokenizer"
FORMAT_VERSION = 1

# \w is Unicode-aware: letters of any script, digits and "_"; every other visible character is a
# token of its own.
_WORD = re.compile(r"\w+|[^\w\s]")


def split_words(text: str) -> list[str]:
    """The lower-cased words and punctuation marks of ``text``, in order."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Lower-cased words and punctuation to ids and back; see the module's docstring."""

    def __init__(self, tokens: Sequence[str]) -> None:
        """``tokens``: the vocabulary in id order, starting with :data:`SPECIAL_TOKENS`.
        :class:`ValueError` if it does not (:meth:`load` turns that into a :class:`UserError`)."""
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"the vocabulary must start with {', '.join(SPECIAL_TOKENS)}")
        if not all(isinstance(t, str) and t for t in tokens):
            raise ValueError("every token must be a non-empty string")
        if len(set(tokens)) != len(tokens):
            raise ValueError("the vocabulary has a token twice")
        self.tokens = tokens
        self.ids = {token: i for i, token in enumerate(tokens)}

    @classmethod
    def from_captions(cls, captions: Iterable[str]) -> WordTokenizer:
        """The vocabulary of every word in ``captions``, sorted, after the special tokens."""
        words = {word for caption in captions for word in split_words(caption)}
        return cls([*SPECIAL_TOKENS, *sorted(words)])  # no word has '<' or '>': none is special

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordTokenizer) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"WordTokenizer({len(self)} tokens)"

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``'s words (``<unk>`` for unknown ones), without special tokens."""
        return [self.ids.get(word, UNK_ID) for word in split_words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """The words of ``ids`` joined by spaces, special tokens other than ``<unk>`` left out."""
        return " ".join(self.tokens[i] for i in ids if i >= UNK_ID)

    def tokenize(self, prompts: str | Sequence[str], context_length: int) -> TokenBatch:
        """``<start> words <end> <pad>...``, ``[B, context_length]``, and the real-token mask;
        prompts with more than ``context_length - 2`` words are cut, with one warning."""
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (<start> and <end>), got {context_length}")
        prompts = as_prompts(prompts)
        input_ids = torch.full((len(prompts), context_length), PAD_ID, dtype=torch.long)
        cuts = []
        for i, prompt in enumerate(prompts):
            words = self.encode(prompt)
            keep = context_length - 2
            if len(words) > keep:
                cuts.append(Cut(i, len(words) + 2, self.decode(words[keep:])))
                words = words[:keep]
            row = [START_ID, *words, END_ID]
            input_ids[i, : len(row)] = torch.tensor(row)
        warn_truncated(cuts, context_length)
        return TokenBatch(input_ids, input_ids != PAD_ID)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` (atomically)."""
        save_json(path, {"format": FORMAT, "format_version": FORMAT_VERSION, "tokens": self.tokens})

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        """Read a file written by :meth:`save`; :class:`UserError` naming it if it is missing, not
        JSON, of another format or version, or not a valid vocabulary."""
        values = load_json(path)
        if not isinstance(values, dict) or values.get("format") != FORMAT:
            raise UserError(f"{path}: not a ddpm word tokenizer (no format {FORMAT!r})")
        if values.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path}: format_version {values.get('format_version')!r}, this ddpm reads "
                            f"{FORMAT_VERSION}")
        tokens = values.get("tokens")
        if not isinstance(tokens, list):
            raise UserError(f"{path}: 'tokens' must be a list of strings")
        try:
            return cls(tokens)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
