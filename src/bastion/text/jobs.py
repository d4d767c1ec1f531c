"""What a text job carries between gateway and worker: the one wire contract for text models.

Embedding jobs are ordinary prediction jobs: the gateway tokenizes each input string (the
version's tokenizer and ``EmbeddingConfig``) into ``input_ids`` and ``attention_mask``
(int64, ``[rows, longest]``, right-padded with the pad id and mask 0); the worker pools the
encoder's hidden states into ``embedding`` (float32, ``[rows, dim]``). Jobs of different lengths
are batched together by padding them to the longest (``PAD_VALUES``).

Generation jobs carry the prompt's token ids as ``input_ids`` (int64, ``[1, n]``: the gateway
renders the chat template, with the pinned system prompt, and counts the tokens) and their
request in the envelope member ``gen`` (``GenerationRequest``). The worker generates, appending
chunks to the stream ``s:{job id}`` as they are produced (``delta_fields``; the last entry is
``end_fields`` or ``error_fields``), and stores the whole answer as the job's outcome through the
usual completion (``outputs``): text as UTF-8 bytes, usage and finish reason. A gateway that
loses its client sets ``x:{job id}``; the worker checks it between steps and ends the
generation as ``cancelled``, with the tokens produced so far as its usage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bastion.constants import CANCEL_PREFIX, TEXT_STREAM_PREFIX, TOKENIZER_PREFIX
from bastion.errors import InvalidInput

TASK_EMBEDDING = "embedding"
TASK_GENERATION = "generation"
TASKS = (TASK_EMBEDDING, TASK_GENERATION)

# tensor names on the queue
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
EMBEDDING = "embedding"
TEXT = "text"  # uint8 [1, bytes]: the answer's UTF-8
USAGE = "usage"  # int64 [1, 2]: prompt tokens, completion tokens
FINISH = "finish"  # int64 [1]: index into FINISH_REASONS
PAD_VALUES = {INPUT_IDS: None, ATTENTION_MASK: 0}  # None: the version's pad id

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_FILTER = "content_filter"
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_FILTER)


def tokenizer_key(sha256: str) -> str:
    return TOKENIZER_PREFIX + sha256


def stream_key(job_id: str) -> str:
    return TEXT_STREAM_PREFIX + job_id


def cancel_key(job_id: str) -> str:
    return CANCEL_PREFIX + job_id


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """The envelope member ``gen`` of a generation job: what the client asked for, checked.

    ``max_tokens`` is already cut to the context the prompt leaves (the gateway refuses a
    request that does not fit); ``marker`` is the canary the gateway put in the pinned system
    prompt ('' none): its appearance in the output is the canary guard's business at the worker;
    ``schema`` a JSON schema the answer must match (``response_format: json_schema``)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    marker: str = ""
    schema: dict[str, Any] | None = field(default=None, compare=False)

    def to_member(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max": self.max_tokens, "t": self.temperature, "p": self.top_p}
        if self.seed is not None:
            out["seed"] = self.seed
        if self.stop:
            out["stop"] = list(self.stop)
        if self.stream:
            out["stream"] = True
        if self.marker:
            out["marker"] = self.marker
        if self.schema is not None:
            out["schema"] = self.schema
        return out

    @classmethod
    def from_member(cls, found: Mapping[str, Any]) -> GenerationRequest:
        """The request of a job's ``gen`` member; ``InvalidInput`` when it is not one."""
        try:
            seed = found.get("seed")
            schema = found.get("schema")
            return cls(
                max_tokens=int(found["max"]),
                temperature=float(found.get("t", 1.0)),
                top_p=float(found.get("p", 1.0)),
                seed=None if seed is None else int(seed),
                stop=tuple(str(s) for s in found.get("stop") or ()),
                stream=found.get("stream") is True,
                marker=str(found.get("marker") or ""),
                schema=schema if isinstance(schema, dict) else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput("the job's generation request is malformed") from exc


# the per-job stream -----------------------------------------------------------------------
def delta_fields(text: str, completion_tokens: int) -> dict[str, str]:
    """A chunk of new text, and the completion's tokens so far."""
    return {"d": text, "n": str(completion_tokens)}


def end_fields(finish: str, prompt_tokens: int, completion_tokens: int) -> dict[str, str]:
    """The last entry of a finished generation."""
    return {"end": finish, "p": str(prompt_tokens), "c": str(completion_tokens)}


def error_fields(message: str) -> dict[str, str]:
    """The last entry of a generation that failed (the message is for the client: no secrets)."""
    return {"err": message}


@dataclass(frozen=True, slots=True)
class StreamEvent:
    text: str = ""
    completion_tokens: int = 0
    finish: str | None = None  # set on the last entry of a finished generation
    prompt_tokens: int = 0
    error: str | None = None  # set on the last entry of a failed one
    entry_id: str = ""  # the stream entry's id (Redis's time of production), '' when not from the stream

    @property
    def last(self) -> bool:
        return self.finish is not None or self.error is not None


def read_entry(fields: Mapping[bytes, bytes]) -> StreamEvent:
    """One entry of ``s:{job id}`` as the gateway reads it."""
    if b"err" in fields:
        return StreamEvent(error=fields[b"err"].decode("utf-8", "replace"))
    if b"end" in fields:
        return StreamEvent(
            finish=fields[b"end"].decode(),
            prompt_tokens=int(fields.get(b"p", b"0")),
            completion_tokens=int(fields.get(b"c", b"0")),
        )
    return StreamEvent(
        text=fields.get(b"d", b"").decode("utf-8", "replace"), completion_tokens=int(fields.get(b"n", b"0"))
    )


# the job's outcome ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish: str


def outputs(completion: Completion) -> dict[str, np.ndarray]:
    """A generation's outcome as the tensors the completion stores."""
    data = np.frombuffer(completion.text.encode("utf-8"), dtype=np.uint8).reshape(1, -1)
    return {
        TEXT: data,
        USAGE: np.asarray([[completion.prompt_tokens, completion.completion_tokens]], dtype=np.int64),
        FINISH: np.asarray([FINISH_REASONS.index(completion.finish)], dtype=np.int64),
    }


def read_outputs(found: Mapping[str, np.ndarray]) -> Completion:
    """A generation's outcome from its stored tensors."""
    try:
        usage = found[USAGE].reshape(-1)
        finish = int(found[FINISH].reshape(-1)[0])
        return Completion(
            bytes(found[TEXT].astype(np.uint8).reshape(-1)).decode("utf-8", "replace"),
            int(usage[0]),
            int(usage[1]),
            FINISH_REASONS[finish] if 0 <= finish < len(FINISH_REASONS) else FINISH_STOP,
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise InvalidInput("the generation's outcome is malformed") from exc
