"""A Hugging Face ``tokenizers`` JSON, loaded safely: data only, size-limited, parse-checked.

A tokenizer JSON is data (a vocabulary, merges, normaliser and pre-tokeniser settings), never code;
``load_tokenizer`` still refuses anything that is not one before the Rust parser sees it: too many
bytes, not a JSON object, no known ``model.type``, or a vocabulary past ``max_vocab``.

Two views of the same tokenizer are kept. ``encode(text)`` treats the text as *untrusted*: special
tokens written in it (``<|assistant|>``, ``[SEP]``) are encoded as plain text, so a client cannot
forge a role marker or an end of sequence. ``encode(text, split_special=True)`` matches them, for
templates that come from the model's own configuration.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tokenizers

from bastion.errors import InvalidArtifact

MAX_TOKENIZER_BYTES = 64 * 1024 * 1024
MAX_VOCAB = 1 << 18
MODEL_TYPES = frozenset({"BPE", "WordPiece", "WordLevel", "Unigram"})


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens a version's config names (each must be in the vocabulary)."""

    bos: str | None = None
    eos: str | None = None
    pad: str | None = None


@dataclass(frozen=True)
class Batch:
    """Token ids padded to one length: ``input_ids`` and ``attention_mask``, both ``[n, s]`` int64."""

    input_ids: np.ndarray
    attention_mask: np.ndarray

    @property
    def lengths(self) -> list[int]:
        return [int(n) for n in self.attention_mask.sum(axis=1)]


class TextTokenizer:
    def __init__(self, data: str, special: SpecialTokens) -> None:
        self._data = data
        self._truncating: dict[int, tokenizers.Tokenizer] = {}  # by max_length
        self._plain = _parse(data)  # special tokens in the text are plain text
        self._plain.encode_special_tokens = True
        self._trusted = _parse(data)  # special tokens in the text are matched
        for inner in (self._plain, self._trusted):
            inner.no_padding()
            inner.no_truncation()
        self.special = special
        self._added = frozenset(int(i) for i in self._trusted.get_added_tokens_decoder())
        self.bos_id = self._special_id(special.bos, "bos")
        self.eos_id = self._special_id(special.eos, "eos")
        self.pad_id = self._special_id(special.pad, "pad")

    def _special_id(self, token: str | None, role: str) -> int | None:
        if token is None:
            return None
        found = self._trusted.token_to_id(token)
        if found is None:
            raise InvalidArtifact(f"the tokenizer has no {role} token {token!r}")
        return int(found)

    @property
    def vocab_size(self) -> int:
        return int(self._trusted.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        found = self._trusted.token_to_id(token)
        return None if found is None else int(found)

    def id_to_token(self, token_id: int) -> str | None:
        found = self._trusted.id_to_token(token_id)
        return None if found is None else str(found)

    def encode(self, text: str, *, split_special: bool = False, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` runs the tokenizer's post-processor
        (``[CLS] … [SEP]`` for BERT-style tokenizers)."""
        inner = self._trusted if split_special else self._plain
        return list(inner.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return str(self._trusted.decode(list(ids), skip_special_tokens=skip_special))

    def markers_survive_as_text(self, ids: Sequence[int]) -> bool:
        """Whether ``ids``, sent as text (decoded with their special tokens) to a server that
        matches special tokens when it tokenizes (vLLM, llama.cpp, Hugging Face), comes back
        with the same added tokens, no more: False when a client's text would turn into role
        markers or an end of sequence there (an upstream version must refuse such a prompt)."""
        added = self._added
        text = self.decode(ids, skip_special=False)
        sent = Counter(i for i in self._trusted.encode(text, add_special_tokens=False).ids if i in added)
        return sent == Counter(i for i in ids if i in added)

    def encode_batch(
        self, texts: Sequence[str], *, max_length: int, add_special_tokens: bool = True, pad_left: bool = False
    ) -> Batch:
        """Encode untrusted texts, truncate each to ``max_length`` ids (keeping the start; the
        tokenizer's own truncation, so a post-processor's ``[SEP]`` stays) and pad to the longest
        with the pad token (or 0 when none is configured, masked out either way)."""
        if max_length < 1:
            raise ValueError("max_length must be at least 1")
        encodings = self._truncator(max_length).encode_batch(list(texts), add_special_tokens=add_special_tokens)
        rows = [list(e.ids)[:max_length] for e in encodings]
        return pad_rows(rows, pad_id=self.pad_id or 0, pad_left=pad_left)

    def _truncator(self, max_length: int) -> tokenizers.Tokenizer:
        found = self._truncating.get(max_length)
        if found is None:
            if len(self._truncating) >= 8:  # a model uses one or two lengths; never grow without bound
                self._truncating.clear()
            found = _parse(self._data)
            found.encode_special_tokens = True
            found.no_padding()
            found.enable_truncation(max_length)
            self._truncating[max_length] = found
        return found


def pad_rows(rows: Sequence[Sequence[int]], *, pad_id: int, pad_left: bool = False) -> Batch:
    width = max((len(r) for r in rows), default=1) or 1  # an all-empty batch still has one (masked) column
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        if not row:
            continue
        cols = slice(width - len(row), width) if pad_left else slice(0, len(row))
        ids[i, cols] = row
        mask[i, cols] = 1
    return Batch(input_ids=ids, attention_mask=mask)


def load_tokenizer(
    data: bytes,
    special: SpecialTokens | None = None,
    *,
    max_bytes: int = MAX_TOKENIZER_BYTES,
    max_vocab: int = MAX_VOCAB,
) -> TextTokenizer:
    """Check ``data`` is a ``tokenizers`` JSON within the limits, then load it.

    Raises ``InvalidArtifact`` (with a reason a user can act on) for anything else.
    """
    text = check_tokenizer_json(data, max_bytes=max_bytes, max_vocab=max_vocab)
    return TextTokenizer(text, special or SpecialTokens())


def check_tokenizer_json(data: bytes, *, max_bytes: int = MAX_TOKENIZER_BYTES, max_vocab: int = MAX_VOCAB) -> str:
    """The registry's check: returns the JSON text when it is a loadable ``tokenizers`` JSON."""
    if len(data) > max_bytes:
        raise InvalidArtifact(f"the tokenizer is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        text = data.decode("utf-8")
        document = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidArtifact(f"the tokenizer is not UTF-8 JSON: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise InvalidArtifact("the tokenizer is not a Hugging Face tokenizers JSON (no model object)")
    kind = document["model"].get("type")
    if kind not in MODEL_TYPES:
        raise InvalidArtifact(f"the tokenizer model type {kind!r} is not one of {sorted(MODEL_TYPES)}")
    vocab = document["model"].get("vocab")
    added = document.get("added_tokens") or []
    if not isinstance(vocab, dict | list) or not isinstance(added, list):
        raise InvalidArtifact("the tokenizer has no vocabulary")
    size = len(vocab) + len(added)
    if size > max_vocab:
        raise InvalidArtifact(f"the tokenizer's vocabulary has {size} entries, over the limit of {max_vocab}")
    inner = _parse(text)
    if inner.get_vocab_size(with_added_tokens=True) < 1:
        raise InvalidArtifact("the tokenizer's vocabulary is empty")
    return text


def _parse(text: str) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_str(text)
    except BaseException as exc:  # the Rust side raises a pyo3 PanicException (a BaseException) on odd input
        if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        raise InvalidArtifact(f"the tokenizer JSON does not load: {exc}") from None
