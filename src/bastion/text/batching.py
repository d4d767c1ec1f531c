"""Continuous batching: several generations stepped together, one decoder call per token.

A generation joins with ``add``; at the next ``step`` its prompt runs alone (prompts differ in
length), and from then on its next token is computed in the same batched call as every other
running generation's. A finished or cancelled generation leaves the batch at once, and a new one
can join at any step, so the batch never waits for its slowest member.

The batch's KV cache is left-padded: row ``i`` holds its ``lengths[i]`` cached positions at the
right end of the cache's time axis and zeros (masked out by ``attention_mask``) before them;
``position_ids`` are per row. Masked keys get a weight of exactly 0 after the softmax, so a
generation's tokens do not depend on its neighbours (greedy output equals running it alone).

``step()`` returns the ``(key, Delta)`` pairs it produced, in the order of the rows; every
generation's last delta has its ``finish_reason`` and ``usage``. Sampling, stops and usage are ``TokenStream``'s,
the same code as the single-sequence loop.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from bastion.text.config import GenerationConfig
from bastion.text.generation import (
    Decoder,
    Delta,
    SamplingParams,
    TokenStream,
    check_prompt,
    check_token_ids,
    stop_token_ids,
)
from bastion.text.tokenizer import TextTokenizer


@dataclass
class _Member:
    key: Hashable
    stream: TokenStream
    cancelled: Callable[[], bool]
    prompt: list[int]
    last: int = -1  # the token to feed next
    pending: tuple[int, ...] = ()


class BatchedGeneration:
    def __init__(
        self, decoder: Decoder, tokenizer: TextTokenizer, config: GenerationConfig, *, max_batch: int = 16
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._decoder, self._tokenizer, self._config = decoder, tokenizer, config
        self._stop_ids = stop_token_ids(tokenizer, config)
        self.max_batch = max_batch
        self._waiting: list[_Member] = []
        self._running: list[_Member] = []
        self._lengths: list[int] = []  # cached positions per running row
        self._cache: list[np.ndarray] = decoder.empty_cache(0)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return bool(self._running or self._waiting)

    def add(
        self,
        key: Hashable,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        """Queue a generation; ``InvalidInput`` at once when the prompt leaves no room."""
        if any(m.key == key for m in (*self._waiting, *self._running)):
            raise ValueError(f"a generation with key {key!r} is already in the batch")
        budget = check_prompt(prompt_ids, params, self._config)
        check_token_ids(prompt_ids, self._tokenizer)
        stream = TokenStream(self._tokenizer, params, self._stop_ids, len(prompt_ids), budget)
        self._waiting.append(_Member(key, stream, cancelled or (lambda: False), list(prompt_ids)))

    def step(self) -> list[tuple[Hashable, Delta]]:
        """Admit waiting generations (a prompt pass each), then one batched step for the others."""
        out: list[tuple[Hashable, Delta]] = []
        if self._running:
            self._cancel_rows(out)
        if self._running:
            self._decode(out)
        while self._waiting and len(self._running) < self.max_batch:
            self._admit(self._waiting.pop(0), out)
        return out

    def _emit(self, member: _Member, token: int, delta: Delta, out: list[tuple[Hashable, Delta]]) -> None:
        member.last = token
        member.pending += delta.token_ids
        if delta.text or delta.finish_reason:
            out.append((member.key, Delta(delta.text, member.pending, delta.finish_reason, delta.usage)))
            member.pending = ()

    def _admit(self, member: _Member, out: list[tuple[Hashable, Delta]]) -> None:
        if member.cancelled():
            out.append((member.key, member.stream.cancel()))
            return
        n = len(member.prompt)
        logits, cache = self._decoder.forward(
            np.asarray([member.prompt], dtype=np.int64),
            np.ones((1, n), dtype=np.int64),
            np.arange(n, dtype=np.int64)[None, :],
            self._decoder.empty_cache(1),
        )
        token, delta = member.stream.push(logits[0])
        self._emit(member, token, delta, out)
        if member.stream.finish_reason is not None:
            return
        width = max(self._width, n)
        self._cache = [
            np.concatenate([_left_pad(old, width), _left_pad(new, width)], axis=0)
            for old, new in zip(self._cache, cache, strict=True)
        ]
        self._running.append(member)
        self._lengths.append(n)

    @property
    def _width(self) -> int:
        return int(self._cache[0].shape[2]) if self._cache else 0

    def _decode(self, out: list[tuple[Hashable, Delta]]) -> None:
        width = self._width
        lengths = np.asarray(self._lengths, dtype=np.int64)
        mask = (np.arange(width + 1)[None, :] >= (width - lengths)[:, None]).astype(np.int64)
        ids = np.asarray([[m.last] for m in self._running], dtype=np.int64)
        logits, self._cache = self._decoder.forward(ids, mask, lengths[:, None], self._cache)
        self._lengths = [n + 1 for n in self._lengths]
        for member, row in zip(self._running, logits, strict=True):
            token, delta = member.stream.push(row)
            self._emit(member, token, delta, out)
        self._keep([m.stream.finish_reason is None for m in self._running])

    def _cancel_rows(self, out: list[tuple[Hashable, Delta]]) -> None:
        keep = []
        for member in self._running:
            if member.cancelled():
                out.append((member.key, member.stream.cancel()))
                keep.append(False)
            else:
                keep.append(True)
        self._keep(keep)

    def _keep(self, keep: list[bool]) -> None:
        if all(keep):
            return
        rows = [i for i, k in enumerate(keep) if k]
        self._running = [self._running[i] for i in rows]
        self._lengths = [self._lengths[i] for i in rows]
        width = max(self._lengths, default=0)  # drop the columns that are padding in every row left
        self._cache = [c[rows][:, :, c.shape[2] - width :, :] for c in self._cache]


def _left_pad(cache: np.ndarray, width: int) -> np.ndarray:
    missing = width - cache.shape[2]
    if missing <= 0:
        return cache
    return np.pad(cache, ((0, 0), (0, 0), (missing, 0), (0, 0)))
