"""Embeddings: an encoder session over a batch of texts, pooled over the mask, L2-normalised.

The worker batches across requests; ``Encoder.embed`` takes the texts of one batch and returns one
row per text, the same (within float rounding) as embedding each text alone: padding is masked out
of the attention by the graph and out of the pooling here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bastion.errors import InvalidArtifact
from bastion.text.config import EmbeddingConfig
from bastion.text.tokenizer import Batch, TextTokenizer


def pool(hidden: np.ndarray, mask: np.ndarray, *, pooling: str = "mean", normalize: bool = True) -> np.ndarray:
    """``[n, s, h]`` hidden states and ``[n, s]`` mask → ``[n, h]`` float32 vectors."""
    if pooling == "cls":
        vectors = np.array(hidden[:, 0, :], dtype=np.float32)
    else:
        weights = mask.astype(np.float32)
        vectors = np.matmul(weights[:, None, :], hidden.astype(np.float32, copy=False))[:, 0, :]
        vectors /= np.maximum(weights.sum(axis=1, keepdims=True), 1.0)
    if normalize:
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


class Encoder:
    """An embedding model: tokenizer + encoder session + pooling config."""

    def __init__(self, session: Any, tokenizer: TextTokenizer, config: EmbeddingConfig) -> None:
        names = {i.name for i in session.get_inputs()}
        if not {"input_ids", "attention_mask"} <= names:
            raise InvalidArtifact("an embedding model needs input_ids and attention_mask inputs")
        if config.output not in {o.name for o in session.get_outputs()}:
            raise InvalidArtifact(f"the embedding model has no output {config.output!r}")
        self._session = session
        self._token_types = "token_type_ids" in names  # BERT exports often take them (all zeros)
        self.tokenizer = tokenizer
        self.config = config
        shape = next(o.shape for o in session.get_outputs() if o.name == config.output)
        self.dimensions: int | None = shape[-1] if shape and isinstance(shape[-1], int) else None

    def tokenize(self, texts: Sequence[str]) -> Batch:
        return self.tokenizer.encode_batch(
            texts, max_length=self.config.max_length, add_special_tokens=self.config.add_special_tokens
        )

    def embed_batch(self, batch: Batch) -> np.ndarray:
        return self.embed_ids(batch.input_ids, batch.attention_mask)

    def embed_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, run_options: Any = None) -> np.ndarray:
        """Pooled vectors of token ids already padded (``[n, s]`` int64 each); ``run_options`` an
        ``onnxruntime.RunOptions`` (its ``terminate`` flag stops the call)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._token_types:
            inputs["token_type_ids"] = np.zeros_like(input_ids)
        (hidden,) = self._session.run([self.config.output], inputs, run_options)
        return pool(np.asarray(hidden), attention_mask, pooling=self.config.pooling, normalize=self.config.normalize)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), dimensions]`` float32; each text truncated to ``config.max_length`` tokens."""
        if not texts:
            return np.zeros((0, self.dimensions or 0), dtype=np.float32)
        return self.embed_batch(self.tokenize(texts))

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text costs (after truncation): the usage an embeddings answer reports."""
        return self.tokenize(texts).lengths if texts else []
