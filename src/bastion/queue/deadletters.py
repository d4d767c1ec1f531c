"""Dead letters: list them (without their inputs) and replay async ones (sync client).

A letter is bounded when it is written (complete.lua, calls.letter_fields): an input over
``dead_letter_max_input_bytes`` is not copied - the letter keeps its size and SHA-256 and is
marked not replayable - and the stream keeps at most ``max_dead_letters`` letters, none older
than ``dead_letter_max_age_s``. Letters written before that mark existed are replayable as before.
"""

from __future__ import annotations

from typing import Any

import redis

from bastion.constants import dead_letter_key
from bastion.queue import calls
from bastion.queue.envelope import Job

REPLAYED, DISCARDED, NOT_REPLAYABLE = 1, 2, 3  # replay.lua's answers (0: not found)


def replayable(fields: dict[bytes, bytes]) -> bool:
    return fields.get(calls.LETTER_REPLAYABLE) != b"0"


def _input_bytes(fields: dict[bytes, bytes]) -> int:
    if replayable(fields):
        return len(fields.get(b"x", b""))
    try:
        return int(fields.get(calls.LETTER_INPUT_BYTES) or 0)
    except ValueError:
        return 0


def listing(client: Any, model: str, count: int) -> list[dict[str, Any]]:
    """The newest ``count`` dead letters of ``model``: ids, job, tenant, version, reason, the
    input's size and whether it can be replayed - never the input."""
    out = []
    for entry_id, fields in client.xrevrange(dead_letter_key(model), count=count):
        job = Job.from_entry("", "", fields)
        letter: dict[str, Any] = {
            "id": entry_id.decode(),
            "job_id": job.job_id,
            "tenant": job.tenant,
            "version": job.version,
            "kind": "sync" if job.reply_to else "async",
            "created_ms": job.created_ms,
            "reason": fields.get(b"reason", b"").decode(),
            "input_bytes": _input_bytes(fields),
            "replayable": replayable(fields),
        }
        if not letter["replayable"]:
            letter["input_sha256"] = fields.get(calls.LETTER_INPUT_SHA256, b"").decode()
        out.append(letter)
    return out


def not_replayable(client: Any, model: str, ids: list[str]) -> list[str]:
    """Those of ``ids`` that are letters which kept no copy of their input (cannot run again)."""
    found = []
    pipe = client.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xrange(dead_letter_key(model), entry_id, entry_id)
    for entry_id, entries in zip(ids, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(entries, list) and entries and not replayable(entries[0][1]):
            found.append(entry_id)
    return found


def replay(client: Any, model: str, ids: list[str], result_ttl_s: int) -> dict[str, int]:
    """Queue the async dead letters ``ids`` again; sync ones (their callers are gone) and shadow
    copies (they answer nobody) are dropped; letters without their input are left in place."""
    counts = {"replayed": 0, "discarded": 0, "not_replayable": 0, "not_found": 0}
    names = {REPLAYED: "replayed", DISCARDED: "discarded", NOT_REPLAYABLE: "not_replayable"}
    for entry_id in ids:
        try:
            done = int(calls.REPLAY.call(client, *calls.replay(model, entry_id, result_ttl_s)))
        except redis.ResponseError:  # not a stream id Redis accepts
            done = 0
        counts[names.get(done, "not_found")] += 1
    return counts
