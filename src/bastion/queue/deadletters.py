"""Dead letters: list them (without their inputs) and replay async ones (sync client)."""

from __future__ import annotations

from typing import Any

import redis

from bastion.constants import dead_letter_key
from bastion.queue import calls
from bastion.queue.envelope import Job


def listing(client: Any, model: str, count: int) -> list[dict[str, Any]]:
    """The newest ``count`` dead letters of ``model``: ids, job, tenant, version, reason - no inputs."""
    out = []
    for entry_id, fields in client.xrevrange(dead_letter_key(model), count=count):
        job = Job.from_entry("", "", fields)
        out.append(
            {
                "id": entry_id.decode(),
                "job_id": job.job_id,
                "tenant": job.tenant,
                "version": job.version,
                "kind": "sync" if job.reply_to else "async",
                "created_ms": job.created_ms,
                "reason": fields.get(b"reason", b"").decode(),
            }
        )
    return out


def replay(client: Any, model: str, ids: list[str], result_ttl_s: int) -> dict[str, int]:
    """Queue the async dead letters ``ids`` again; sync ones (their callers are gone) and shadow
    copies (they answer nobody) are dropped."""
    counts = {"replayed": 0, "discarded": 0, "not_found": 0}
    for entry_id in ids:
        try:
            done = int(calls.REPLAY.call(client, *calls.replay(model, entry_id, result_ttl_s)))
        except redis.ResponseError:  # not a stream id Redis accepts
            done = 0
        counts[{1: "replayed", 2: "discarded"}.get(done, "not_found")] += 1
    return counts
