"""The job envelope: everything a job carries from the gateway to a worker, as one versioned map.

A job is one stream entry of a few fields: ``v`` names the envelope version, ``m`` is the
envelope itself - a JSON object of the fields below - and the payloads travel as raw bytes
beside it (``x`` the input tensors; ``p`` only on shadow copies, ``e`` only on evaluations). A
reader ignores members of ``m`` it does not know and treats a missing one as empty, so a member
can be added without a flag day. (One JSON member instead of one stream field per member keeps
the enqueue call small: the gateway packs two arguments, not thirty.)

=========  ====================================================================================
member     meaning
=========  ====================================================================================
id         job id (URL-safe)
tenant     the caller's tenant (``_control`` for evaluation jobs)
model      model name
version    model version
lane       ``sync``, ``batch`` or ``shadow`` (the stream the job is on)
role       why this version runs it: ``primary``, ``canary``, ``fallback``, ``shadow``, ``evaluation``
deadline   ms since the epoch after which the job is dropped (0: none)
reply      the gateway waiting for the reply (sync jobs), '' otherwise
created    ms since the epoch
rid        request id (the client's ``X-Request-ID`` or the gateway's)
tp         W3C ``traceparent`` of the request ('' none): with tracing on, the gateway's request span
           (``bastion.tracing``), which the worker's job span continues; off, the client's header
subj       pseudonym of the routing subject ('' none) - never the subject itself
rule       the policy rule that applied to the caller ('' none)
idem       the Idempotency-Key record of a sync job ('' none): the worker's completion stores the
           outcome there, so a retry gets it even when the gateway that waited has died
key        API key id (or token id) that asked for the job
rows       input rows
jur        the caller's tenant's jurisdiction ('' none), for the decision log
cons       the tenant's consent flags when it asked, for the decision log
ret        true when the tenant's decision log keeps inputs and outputs (encrypted)
grd        the gateway's input guard results (``GuardResult.to_dict()`` each: guard, decision,
           latency, counts, rule ids; never text), for the decision log; absent: none ran
gen        a generation job's request (``bastion.text.jobs.GenerationRequest.to_member``:
           max_tokens, sampling, stops, stream, canary marker); absent for every other job
=========  ====================================================================================

Fields that enqueue.lua adds to the entry: ``c``, the compute units reserved for the job
(absent: none reserved), ``q``, '1' when the job holds a slot of its tenant's in-flight cap, and
``t``, the text tokens reserved (a text model's job: prompt tokens + ``max_tokens``; absent: none).
Version 1 was a single ``h`` header (``id|tenant|model|version|deadline|reply|created``) and
``n``/``k`` fields; entries of it are still read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

VERSION = b"2"

ROLE_PRIMARY = "primary"
ROLE_CANARY = "canary"
ROLE_FALLBACK = "fallback"
ROLE_SHADOW = "shadow"
ROLE_EVALUATION = "evaluation"


@dataclass(slots=True)
class Envelope:
    """What the gateway (or the control plane, for evaluations) puts on a stream."""

    job_id: str
    tenant: str
    model: str
    version: int
    lane: str
    role: str = ROLE_PRIMARY
    deadline_ms: int = 0
    reply_to: str = ""
    created_ms: int = 0
    request_id: str = ""
    traceparent: str = ""
    subject: str = ""
    rule: str = ""
    idempotency: str = ""
    key_id: str = ""
    rows: int = 0
    jurisdiction: str = ""
    consents: tuple[str, ...] = ()
    retain: bool = False
    generation: dict[str, Any] = field(default_factory=dict)
    guards: list[dict[str, Any]] = field(default_factory=list)
    blob: bytes = b""
    compare: bytes = b""
    evaluation: bytes = b""

    def fields(self) -> list[str | bytes]:
        """The entry's field/value pairs, flat (as XADD and the scripts take them)."""
        meta = {
            "id": self.job_id,
            "tenant": self.tenant,
            "model": self.model,
            "version": self.version,
            "lane": self.lane,
            "role": self.role,
            "deadline": self.deadline_ms,
            "reply": self.reply_to,
            "created": self.created_ms,
            "rid": self.request_id,
            "tp": self.traceparent,
            "subj": self.subject,
            "rule": self.rule,
            "idem": self.idempotency,
            "key": self.key_id,
            "rows": self.rows,
        }
        if self.jurisdiction:
            meta["jur"] = self.jurisdiction
        if self.consents:
            meta["cons"] = self.consents
        if self.retain:
            meta["ret"] = True
        if self.generation:
            meta["gen"] = self.generation
        if self.guards:
            meta["grd"] = self.guards
        found: list[str | bytes] = ["v", VERSION, "m", orjson.dumps(meta), "x", self.blob]
        if self.compare:
            found += ["p", self.compare]
        if self.evaluation:
            found += ["e", self.evaluation]
        return found


@dataclass(slots=True)
class Job(Envelope):
    """An envelope as a worker read it: where it is (stream, entry id), what admission added
    (the reserved cost, the in-flight slot), and the raw fields (copied to a dead letter)."""

    stream: str = ""
    entry_id: str = ""
    cost: float = 0.0
    counted: bool = False
    tokens: int = 0  # text tokens reserved by admission (settled with the real usage)
    raw: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def is_shadow(self) -> bool:
        return self.role == ROLE_SHADOW

    @property
    def is_async(self) -> bool:
        return not self.reply_to

    @classmethod
    def from_entry(cls, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> Job:
        """Read an entry of any envelope version; a malformed one fails as an unknown model version."""
        if b"v" not in fields and b"h" in fields:
            return cls._from_v1(stream, entry_id, fields)
        try:
            meta: dict[str, Any] = orjson.loads(fields.get(b"m") or b"{}")
        except orjson.JSONDecodeError:
            meta = {}
        if not isinstance(meta, dict):
            meta = {}
        get = meta.get
        return cls(
            job_id=_str(get("id")),
            tenant=_str(get("tenant")),
            model=_str(get("model")),
            version=_int(get("version")),
            lane=_str(get("lane")),
            role=_str(get("role")) or ROLE_PRIMARY,
            deadline_ms=_int(get("deadline")),
            reply_to=_str(get("reply")),
            created_ms=_int(get("created")),
            request_id=_str(get("rid")),
            traceparent=_str(get("tp")),
            subject=_str(get("subj")),
            rule=_str(get("rule")),
            idempotency=_str(get("idem")),
            key_id=_str(get("key")),
            rows=_int(get("rows")),
            jurisdiction=_str(get("jur")),
            consents=_strs(get("cons")),
            retain=get("ret") is True,
            generation=_dict(get("gen")),
            guards=_dicts(get("grd")),
            blob=fields.get(b"x", b""),
            compare=fields.get(b"p", b""),
            evaluation=fields.get(b"e", b""),
            stream=stream,
            entry_id=entry_id,
            cost=_float(fields.get(b"c")),
            counted=fields.get(b"q") == b"1",
            tokens=_int(fields.get(b"t")),
            raw=fields,
        )

    @classmethod
    def _from_v1(cls, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> Job:
        """Version 1: ``h`` = ``id|tenant|model|version|deadline|reply|created``, then x, p, e, c, q, n, k."""
        parts = _text(fields[b"h"]).split("|")
        if len(parts) != 7:
            parts = ["", "", "", "0", "0", "", "0"]
        job_id, tenant, model, version, deadline, reply_to, created = parts
        evaluation = fields.get(b"e", b"")
        lane = stream.rsplit(":", 1)[-1] if stream else ""
        return cls(
            job_id=job_id,
            tenant=tenant,
            model=model,
            version=_int(version),
            lane=lane,
            role=ROLE_EVALUATION if evaluation else ROLE_SHADOW if fields.get(b"p") else ROLE_PRIMARY,
            deadline_ms=_int(deadline),
            reply_to=reply_to,
            created_ms=_int(created),
            key_id=_text(fields.get(b"k")),
            rows=_int(fields.get(b"n")),
            blob=fields.get(b"x", b""),
            compare=fields.get(b"p", b""),
            evaluation=evaluation,
            stream=stream,
            entry_id=entry_id,
            cost=_float(fields.get(b"c")),
            counted=fields.get(b"q") == b"1",
            tokens=_int(fields.get(b"t")),
            raw=fields,
        )


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _strs(value: Any) -> tuple[str, ...]:
    return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _float(value: bytes | None) -> float:
    try:
        found = float(value or 0)
    except ValueError:
        return 0.0
    return found if found == found and found not in (float("inf"), float("-inf")) else 0.0


def _text(value: bytes | None) -> str:
    return value.decode(errors="replace") if value else ""


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError, OverflowError):
        return 0
