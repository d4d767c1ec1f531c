"""What a job looks like on a stream, and the scripts that move it.

A stream entry has two fields (few fields keep packing and parsing cheap on the hot path):

====  =================================================================================
h     ``job id|tenant|model|version|deadline ms|reply gateway|created ms`` - the
      deadline is ms since the epoch (0: none), the worker drops jobs past it; the
      reply gateway is '' for async jobs, whose outcome is only stored. No part can
      hold '|': ids are URL-safe, names match ``[a-z0-9._-]``.
x     input tensors (``bastion.codec`` blob)
p     only on shadow copies: the outputs the client was answered with, to compare against
c     the compute units reserved for the job (set by enqueue.lua)
q     '1' when the job counts against its tenant's in-flight cap (set by enqueue.lua)
n     rows, and ``k`` the API key id: what the worker needs to settle the reserved cost
e     only on evaluation jobs (from the control plane): JSON naming the holdout set's
      digest and how to read the outputs; the result is the JSON evaluation report
====  =================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources


@dataclass(slots=True)
class Job:
    stream: str
    entry_id: str
    job_id: str
    tenant: str
    model: str
    version: int
    deadline_ms: int
    reply_to: str
    created_ms: int
    blob: bytes
    fields: dict[bytes, bytes]
    compare: bytes = b""
    evaluation: bytes = b""
    cost: float = 0.0
    counted: bool = False
    rows: int = 0
    key_id: str = ""

    @classmethod
    def from_entry(cls, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> Job:
        parts = fields.get(b"h", b"").decode().split("|")
        if len(parts) != 7:
            parts = ["", "", "", "0", "0", "", "0"]  # malformed: it fails as an unknown model version
        job_id, tenant, model, version, deadline, reply_to, created = parts
        return cls(
            stream=stream,
            entry_id=entry_id,
            job_id=job_id,
            tenant=tenant,
            model=model,
            version=int(version or 0),
            deadline_ms=int(deadline or 0),
            reply_to=reply_to,
            created_ms=int(created or 0),
            blob=fields.get(b"x", b""),
            fields=fields,
            compare=fields.get(b"p", b""),
            evaluation=fields.get(b"e", b""),
            cost=float(fields.get(b"c", b"0") or 0),
            counted=fields.get(b"q") == b"1",
            rows=int(fields.get(b"n", b"0") or 0),
            key_id=fields.get(b"k", b"").decode(),
        )


def entry_fields(
    job_id: str,
    tenant: str,
    model: str,
    version: int,
    deadline_ms: int,
    reply_to: str,
    created_ms: int,
    blob: bytes,
    compare: bytes = b"",
    evaluation: bytes = b"",
    rows: int = 0,
    key_id: str = "",
) -> list[str | bytes]:
    header = f"{job_id}|{tenant}|{model}|{version}|{deadline_ms}|{reply_to}|{created_ms}"
    fields: list[str | bytes] = ["h", header, "x", blob]
    if rows:
        fields += ["n", str(rows), "k", key_id]
    if compare:
        fields += ["p", compare]
    if evaluation:
        fields += ["e", evaluation]
    return fields


def script(name: str) -> str:
    return resources.files("bastion.queue").joinpath("lua", f"{name}.lua").read_text()
