"""Text versions as the worker holds them: an embedding model, or a generation model.

A text version is three things, each verified against its sha256 in the artifact store before it
is loaded: the ONNX graph, the tokenizer JSON (``TextInfo.tokenizer``) and the task's config (in
the snapshot). ``load`` returns:

- ``EmbeddingModel`` for ``embedding``: a ``LoadedModel`` whose ``run`` takes ``input_ids`` and
  ``attention_mask`` (int64, ``[rows, width]``) and returns ``embedding`` (float32, ``[rows, dim]``),
  pooled per the version's ``EmbeddingConfig``. Its ``pad_values`` say how ``run_batch`` pads the
  jobs of one batch to the widest (``bastion.text.jobs.PAD_VALUES``, the pad id filled in);
- ``GenerationModel`` for ``generation``: the decoder, tokenizer and config a
  ``bastion.text.batching.BatchedGeneration`` steps; jobs of such a version never go through
  ``run_batch`` (``run`` refuses);
- ``UpstreamModel`` for a ``generation`` version whose config names an ``upstream`` server
  (``bastion.text.upstream``): the tokenizer and config a ``bastion.runtime.upstream
  .UpstreamGeneration`` forwards with. No ONNX graph is read or run for it: its artifact is its
  descriptor, verified by sha256 like a graph, and the server forwarded to is the descriptor's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import orjson

from bastion.errors import InvalidArtifact, InvalidInput, JobFailed
from bastion.snapshot import TextInfo
from bastion.text.config import EmbeddingConfig, GenerationConfig
from bastion.text.embedding import Encoder
from bastion.text.generation import Decoder
from bastion.text.jobs import ATTENTION_MASK, EMBEDDING, INPUT_IDS, PAD_VALUES, TASK_EMBEDDING, TASK_GENERATION
from bastion.text.session import open_session
from bastion.text.tokenizer import TextTokenizer, load_tokenizer
from bastion.text.upstream import UpstreamConfig


class EmbeddingModel:
    """An encoder with its pooling: a ``LoadedModel`` over token ids, batchable by padding."""

    task = TASK_EMBEDDING

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        pad = encoder.tokenizer.pad_id or 0
        self.pad_values: dict[str, int] = {
            name: (pad if value is None else value) for name, value in PAD_VALUES.items()
        }
        self._vocab = encoder.tokenizer.vocab_size
        self._options = ort.RunOptions()  # one caller at a time: the worker loop

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, mask = inputs.get(INPUT_IDS), inputs.get(ATTENTION_MASK)
        if ids is None or mask is None:
            raise InvalidInput(f"an embedding job carries {INPUT_IDS!r} and {ATTENTION_MASK!r}")
        if ids.ndim != 2 or ids.shape != mask.shape or ids.dtype.kind not in "iu" or mask.dtype.kind not in "iu":
            raise InvalidInput(f"{INPUT_IDS!r} and {ATTENTION_MASK!r} must be integer tensors of one [rows, width]")
        if ids.shape[1] > self.encoder.config.max_length:
            raise InvalidInput(f"at most {self.encoder.config.max_length} tokens per input")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self._vocab):
            raise InvalidInput(f"token ids must be in [0, {self._vocab})")
        if mask.size and (int(mask.min()) < 0 or int(mask.max()) > 1):
            raise InvalidInput(f"{ATTENTION_MASK!r} must be 0 or 1")
        self._options.terminate = False
        vectors = self.encoder.embed_ids(ids.astype(np.int64), mask.astype(np.int64), run_options=self._options)
        return {EMBEDDING: vectors}

    def terminate(self) -> None:
        """onnxruntime checks the flag between operators and fails the run."""
        self._options.terminate = True

    def warm_up(self) -> None:
        one = np.ones((1, 1), dtype=np.int64)
        self.run({INPUT_IDS: one * (self.pad_values[INPUT_IDS]), ATTENTION_MASK: one})


class GenerationModel:
    """A decoder-with-past, its tokenizer and config: what the worker's generation engine steps."""

    task = TASK_GENERATION

    def __init__(self, decoder: Decoder, tokenizer: TextTokenizer, config: GenerationConfig) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.config = config

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise JobFailed("a generation version answers generation jobs only")

    def terminate(self) -> None:  # a decode step is one short call: nothing to stop
        return None

    def warm_up(self) -> None:
        token = self.tokenizer.eos_id or 0
        n = 1
        self.decoder.forward(
            np.asarray([[token]], dtype=np.int64),
            np.ones((1, n), dtype=np.int64),
            np.zeros((1, n), dtype=np.int64),
            self.decoder.empty_cache(1),
        )


class UpstreamModel:
    """A generation version answered by an OpenAI-compatible server: its tokenizer and config."""

    task = TASK_GENERATION

    def __init__(self, tokenizer: TextTokenizer, config: GenerationConfig, upstream: UpstreamConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.upstream = upstream

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise JobFailed("a generation version answers generation jobs only")

    def terminate(self) -> None:
        return None

    def warm_up(self) -> None:  # nothing is loaded; the server is reached when a job comes
        return None


TextModel = EmbeddingModel | GenerationModel | UpstreamModel


def load(
    info: TextInfo, graph: bytes | None, tokenizer: bytes, *, intra_threads: int = 1, inter_threads: int = 1
) -> TextModel:
    """The text model of one version; ``InvalidArtifact`` when its parts do not fit together
    (``graph`` may be None for an upstream version only)."""
    if info.task == TASK_EMBEDDING:
        try:
            embedding = EmbeddingConfig.from_dict(info.config)
        except ValueError as exc:
            raise InvalidArtifact(f"the embedding config is invalid: {exc}") from None
        words = load_tokenizer(tokenizer, embedding.special)
        session = _session(_graph(graph), intra_threads, inter_threads)
        return EmbeddingModel(Encoder(session, words, embedding))
    if info.task == TASK_GENERATION:
        try:
            generation = GenerationConfig.from_dict(info.config)
        except ValueError as exc:
            raise InvalidArtifact(f"the generation config is invalid: {exc}") from None
        words = load_tokenizer(tokenizer, generation.special)
        if generation.upstream is not None:
            return UpstreamModel(words, generation, _verified_upstream(generation.upstream, _graph(graph)))
        return GenerationModel(Decoder(_session(_graph(graph), intra_threads, inter_threads)), words, generation)
    raise InvalidArtifact(f"unknown text task {info.task!r}")


def _verified_upstream(named: UpstreamConfig, descriptor: bytes) -> UpstreamConfig:
    """The upstream of the version's artifact (its descriptor, verified by sha256 at load), which
    the snapshot's config must name too: the server answers come from is the one the registry
    recorded, whatever a snapshot says."""
    try:
        found = orjson.loads(descriptor)
        upstream = UpstreamConfig.from_dict(found) if isinstance(found, dict) else None
    except (orjson.JSONDecodeError, ValueError):
        upstream = None
    if upstream is None or upstream != named:
        raise InvalidArtifact("the version's config names another upstream than its verified descriptor")
    return upstream


def _graph(graph: bytes | None) -> bytes:
    if graph is None:
        raise InvalidArtifact("the version has no graph")
    return graph


def _session(graph: bytes, intra_threads: int, inter_threads: int) -> Any:
    return open_session(graph, intra_threads=intra_threads, inter_threads=inter_threads)
