"""Token generation over a decoder-with-past session: a prompt pass, then one token at a time with
the KV cache.

The graph is the usual "decoder with past" layout (Hugging Face optimum, and the demo model):
inputs ``input_ids`` [b, s], ``attention_mask`` [b, past + s], ``position_ids`` [b, s] (optional)
and ``past_key_values.{i}.key|value`` [b, heads, past, head_dim]; outputs ``logits`` [b, s, vocab]
and ``present.{i}.key|value`` [b, heads, past + s, head_dim]. The prompt runs with a past of length
0; each next token runs alone with the previous step's ``present`` as its past.

``Generation`` is an iterator of ``Delta`` (text and token ids, as produced) so that the worker can
stream every chunk; the last delta carries ``finish_reason``:

- ``stop``: an end-of-sequence or stop token was sampled (its text is never shown), or a stop
  string appeared in the text (the text is cut before it);
- ``length``: ``max_tokens`` were produced or the context (prompt + completion) is full;
- ``cancelled``: ``cancelled()`` returned true; it is checked before every model call, so a
  cancellation costs at most the step already running.

Usage counts the prompt's tokens and every sampled token, the stopping one included: each cost a
model step. Sampling is greedy at ``temperature == 0``; otherwise softmax at the temperature, cut to
the smallest set of tokens whose probability reaches ``top_p`` (nucleus), drawn from a
``numpy.random.Generator`` seeded with ``seed`` (the same seed and prompt give the same tokens).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bastion.errors import InvalidArtifact, InvalidInput
from bastion.text.config import GenerationConfig
from bastion.text.tokenizer import TextTokenizer

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
MAX_STOPS = 16
MAX_STOP_CHARS = 1024
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidInput("max_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidInput("temperature must be between 0 and 100")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInput("top_p must be in (0, 1]")
        if len(self.stop) > MAX_STOPS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            raise InvalidInput(f"at most {MAX_STOPS} stop strings, each of 1 to {MAX_STOP_CHARS} characters")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """New text and the tokens that produced it; ``finish_reason`` and ``usage`` are set on the
    last delta only. ``error`` (with a ``finish_reason``): the generation failed, and this says why
    in words fit for the client (an upstream server that could not be reached, say)."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None


class Decoder:
    """A decoder-with-past session, with its cache layout read from the graph's inputs."""

    def __init__(self, session: Any) -> None:
        inputs = {i.name: i for i in session.get_inputs()}
        layers: dict[int, set[str]] = {}
        for name in inputs:
            found = _PAST.match(name)
            if found:
                layers.setdefault(int(found.group(1)), set()).add(found.group(2))
        if not {"input_ids", "attention_mask"} <= set(inputs) or not layers:
            raise InvalidArtifact("a generation model needs input_ids, attention_mask and past_key_values.* inputs")
        if sorted(layers) != list(range(len(layers))) or any(kinds != {"key", "value"} for kinds in layers.values()):
            raise InvalidArtifact("past_key_values.* inputs must be a key and a value for layers 0..n-1")
        first = inputs["past_key_values.0.key"]
        heads, head_dim = first.shape[1], first.shape[3]
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            raise InvalidArtifact("past_key_values.* must have static head and head_dim dimensions")
        if first.type not in _DTYPES:
            raise InvalidArtifact(f"past_key_values.* must be float or float16, not {first.type}")
        outputs = {o.name for o in session.get_outputs()}
        self.present = [f"present.{i}.{kind}" for i in range(len(layers)) for kind in ("key", "value")]
        if not {"logits", *self.present} <= outputs:
            raise InvalidArtifact("a generation model needs logits and present.* outputs")
        self.past = [f"past_key_values.{i}.{kind}" for i in range(len(layers)) for kind in ("key", "value")]
        self.layers, self.heads, self.head_dim = len(layers), heads, head_dim
        self.dtype = _DTYPES[first.type]
        self.takes_positions = "position_ids" in inputs
        self._session = session
        self._outputs = ["logits", *self.present]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.heads, 0, self.head_dim), dtype=self.dtype) for _ in self.past]

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, cache: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of the last position ``[b, vocab]`` (float32) and the new cache (one array per past input)."""
        feed: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.takes_positions:
            feed["position_ids"] = position_ids
        feed.update(zip(self.past, cache, strict=True))
        logits, *present = self._session.run(self._outputs, feed)
        return np.asarray(logits[:, -1, :], dtype=np.float32), [np.asarray(p) for p in present]


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token from a ``[vocab]`` row: greedy at temperature 0, else temperature + nucleus."""
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    ranked = p[order]
    if params.top_p < 1.0:
        before = np.cumsum(ranked) - ranked  # probability of the tokens ranked above each one
        ranked = np.where(before < params.top_p, ranked, 0.0)
    cumulative = np.cumsum(ranked)
    pick = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(order[min(pick, len(order) - 1)])


@dataclass
class TokenStream:
    """One sequence's sampling, stop checks and incremental detokenisation (no model calls): the
    single-sequence loop and the batched engine share it."""

    tokenizer: TextTokenizer
    params: SamplingParams
    stop_ids: frozenset[int]
    prompt_tokens: int
    budget: int  # tokens this sequence may produce: max_tokens, cut by the context left
    rng: np.random.Generator = field(init=False)
    generated: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    text: str = ""  # the decoded completion, up to the last token that ended a whole character
    shown: int = 0  # characters of ``text`` already emitted
    finish_reason: str | None = None
    _prefix: int = 0  # generated[_prefix:_read] is the context ``text`` last grew from
    _read: int = 0

    def __post_init__(self) -> None:
        seed = self.params.seed
        self.rng = np.random.default_rng(None if seed is None else seed % 2**64)  # any int, as OpenAI allows

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens)

    def push(self, logits: np.ndarray) -> tuple[int, Delta]:
        """Sample the next token from ``logits`` and say what text it adds (possibly none)."""
        token = sample(logits, self.params, self.rng)
        self.completion_tokens += 1
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return token, Delta(self._flush(), (token,), "stop", self.usage)
        self.generated.append(token)
        text = self._stable_text()
        cut = _find_stop(text, self.params.stop, self.shown)
        if cut is not None:
            self.finish_reason = "stop"
            delta, self.shown = text[self.shown : cut], cut
            return token, Delta(delta, (token,), "stop", self.usage)
        if self.completion_tokens >= self.budget:
            self.finish_reason = "length"
            return token, Delta(self._flush(), (token,), "length", self.usage)
        visible = len(text) - _held_back(text, self.params.stop)
        delta = text[self.shown : visible] if visible > self.shown else ""
        self.shown = max(self.shown, visible)
        return token, Delta(delta, (token,))

    def cancel(self) -> Delta:
        self.finish_reason = "cancelled"
        return Delta("", (), "cancelled", self.usage)

    def _stable_text(self) -> str:
        """``text`` grown by the new tokens, unless they end inside a UTF-8 character (then they are
        shown with the next token). Only the tokens since the last growth are decoded, with the ones
        before them as context (so that a decoder which strips a leading space strips it from both
        strings alike): linear in the completion's length, not quadratic."""
        before, now = self._window()
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self._prefix, self._read = self._read, len(self.generated)
        return self.text

    def _window(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return decode(self.generated[self._prefix : self._read]), decode(self.generated[self._prefix :])

    def _flush(self) -> str:
        before, now = self._window()
        text = self.text + now[len(before) :] if len(now) > len(before) else self.text
        cut = _find_stop(text, self.params.stop, self.shown)
        end = len(text) if cut is None else cut
        delta = text[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return delta


def _find_stop(text: str, stops: Sequence[str], shown: int) -> int | None:
    """Where the first stop string starts in ``text`` (only a stop that ends past ``shown`` can be new)."""
    found = [i for s in stops if (i := text.find(s, max(0, shown - len(s) + 1))) >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that might be the start of a stop string."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held


def stop_token_ids(tokenizer: TextTokenizer, config: GenerationConfig) -> frozenset[int]:
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    for token in config.stop_tokens:
        found = tokenizer.token_to_id(token)
        if found is None:
            raise InvalidArtifact(f"the tokenizer has no stop token {token!r}")
        ids.add(found)
    return frozenset(ids)


def check_token_ids(ids: Sequence[int], tokenizer: TextTokenizer) -> None:
    """``InvalidInput`` for an id outside the vocabulary (a client may send a prompt as token ids)."""
    if ids and (min(ids) < 0 or max(ids) >= tokenizer.vocab_size):
        raise InvalidInput(f"token ids must be in [0, {tokenizer.vocab_size})")


def check_prompt(
    prompt_ids: Sequence[int], params: SamplingParams, config: GenerationConfig, *, strict: bool = False
) -> int:
    """The tokens the completion may have: ``max_tokens``, cut to the context left. ``InvalidInput``
    when the prompt leaves no room, or (``strict``, for a front door that refuses rather than cuts)
    when the prompt and ``max_tokens`` together do not fit the context."""
    if not prompt_ids:
        raise InvalidInput("the prompt is empty")
    room = config.max_context - len(prompt_ids)
    if room < 1 or (strict and params.max_tokens > room):
        raise InvalidInput(
            f"the prompt has {len(prompt_ids)} tokens and max_tokens is {params.max_tokens}; "
            f"this model's context is {config.max_context} tokens"
        )
    return min(params.max_tokens, room)


class Generation:
    """One completion, stepped as it is iterated: ``for delta in Generation(...)``; afterwards
    ``usage`` and ``finish_reason`` say how it ended."""

    def __init__(
        self,
        decoder: Decoder,
        tokenizer: TextTokenizer,
        config: GenerationConfig,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        budget = check_prompt(prompt_ids, params, config)
        check_token_ids(prompt_ids, tokenizer)
        self._decoder = decoder
        self._prompt = np.asarray([list(prompt_ids)], dtype=np.int64)
        self._cancelled = cancelled or (lambda: False)
        self._stream = TokenStream(tokenizer, params, stop_token_ids(tokenizer, config), len(prompt_ids), budget)

    @property
    def usage(self) -> Usage:
        return self._stream.usage

    @property
    def finish_reason(self) -> str | None:
        return self._stream.finish_reason

    def __iter__(self) -> Iterator[Delta]:
        stream, decoder = self._stream, self._decoder
        ids = self._prompt
        total = ids.shape[1]
        positions = np.arange(total, dtype=np.int64)[None, :]
        cache = decoder.empty_cache(1)
        pending: tuple[int, ...] = ()  # tokens whose text is not shown yet (held back or incomplete)
        while stream.finish_reason is None:
            if self._cancelled():
                yield stream.cancel()
                return
            logits, cache = decoder.forward(ids, np.ones((1, total), dtype=np.int64), positions, cache)
            token, delta = stream.push(logits[0])
            pending += delta.token_ids
            if delta.text or delta.finish_reason:
                yield Delta(delta.text, pending, delta.finish_reason, delta.usage)
                pending = ()
            ids = np.asarray([[token]], dtype=np.int64)
            positions = np.asarray([[total]], dtype=np.int64)
            total += 1
