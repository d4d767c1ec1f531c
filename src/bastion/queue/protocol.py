"""What a job looks like on a stream, and the scripts that move it.

Stream entry fields (short names keep entries small):

====  =================================================================
j     job id (random, unguessable)
t     tenant
m     model    v  version
d     deadline, ms since epoch (0: none) - the worker drops jobs past it
r     reply gateway id ('' for async jobs: the outcome is only stored)
c     created, ms since epoch
x     input tensors (``bastion.codec`` blob)
====  =================================================================
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

    @classmethod
    def from_entry(cls, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> Job:
        return cls(
            stream=stream,
            entry_id=entry_id,
            job_id=fields.get(b"j", b"").decode(),
            tenant=fields.get(b"t", b"").decode(),
            model=fields.get(b"m", b"").decode(),
            version=int(fields.get(b"v", b"0") or 0),
            deadline_ms=int(fields.get(b"d", b"0") or 0),
            reply_to=fields.get(b"r", b"").decode(),
            created_ms=int(fields.get(b"c", b"0") or 0),
            blob=fields.get(b"x", b""),
            fields=fields,
        )


def entry_fields(
    job_id: str, tenant: str, model: str, version: int, deadline_ms: int, reply_to: str, created_ms: int, blob: bytes
) -> list[str | bytes]:
    return [
        "j",
        job_id,
        "t",
        tenant,
        "m",
        model,
        "v",
        str(version),
        "d",
        str(deadline_ms),
        "r",
        reply_to,
        "c",
        str(created_ms),
        "x",
        blob,
    ]


def script(name: str) -> str:
    return resources.files("bastion.queue").joinpath("lua", f"{name}.lua").read_text()
