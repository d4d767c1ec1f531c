"""The slots an open job event stream holds, in Redis: one of its tenant's in-flight cap and one of
its key's stream cap (``stream_slot.lua`` says what the script guarantees; its KEYS and ARGV are
built here and nowhere else).

A stream is counted on its own, next to the job it follows: a queued job already holds a slot of
its tenant's in-flight cap, and a stream on it takes a second one. Sharing the job's slot would let
any number of streams ride on one job (only the per-key cap would bound them, so a tenant's keys
together would not be bounded at all); counting each stream keeps "a tenant holds at most
``max_concurrency`` things in flight" exact. A tenant that follows every job it runs with a stream
therefore needs a cap of twice its concurrent jobs. A stream on a job that has already ended takes
no slot: it answers at once and closes.

Slots are scored by when they lapse (``SLOT_LIFETIME_MS``); the gateway refreshes all its open
streams' slots in one script call every ``REFRESH_S`` (``JobWatch``), which also reads each
stream's job status, so a missed notice is caught there at no per-stream cost.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bastion.constants import inflight_key, job_key, streams_key
from bastion.errors import RateLimited
from bastion.queue.scripts import Lua

STREAM_SLOT = Lua("stream_slot")
HEARTBEAT_S = 15.0  # a comment line on an idle stream, so proxies keep it open
REFRESH_S = 10.0  # how often a gateway refreshes its streams' slots (and re-reads their jobs' status)
SLOT_LIFETIME_MS = int(2 * HEARTBEAT_S * 1000)  # a slot not refreshed for this long lapses
REFRESH_CHUNK = 500  # streams per refresh call (KEYS: three per stream)

Call = tuple[list[str], list[Any]]


@dataclass(frozen=True, slots=True)
class Slot:
    """What one open stream holds: ``member`` in ``streams:{key id}`` and, when ``counted``, in
    ``inflight:{tenant}``."""

    member: str
    tenant: str
    key_id: str
    job_id: str
    counted: bool


def new_member(gateway_id: str) -> str:
    return f"sse:{gateway_id}:{secrets.token_hex(8)}"


def open_call(slot: Slot, tenant_cap: int, key_cap: int) -> Call:
    keys = [inflight_key(slot.tenant), streams_key(slot.key_id)]
    return keys, ["open", SLOT_LIFETIME_MS, slot.member, tenant_cap, key_cap]


def refresh_call(slots: Sequence[Slot]) -> Call:
    keys: list[str] = []
    for s in slots:
        keys += [inflight_key(s.tenant) if s.counted else "", streams_key(s.key_id), job_key(s.job_id)]
    return keys, ["refresh", SLOT_LIFETIME_MS, *(s.member for s in slots)]


def close_call(slot: Slot) -> Call:
    return [inflight_key(slot.tenant) if slot.counted else "", streams_key(slot.key_id)], ["close", 0, slot.member]


async def take(
    redis: Any, gateway_id: str, *, tenant: str, key_id: str, job_id: str, tenant_cap: int, key_cap: int
) -> Slot:
    """Take a stream's slots, or raise ``RateLimited`` naming the cap that is full."""
    slot = Slot(new_member(gateway_id), tenant, key_id, job_id, counted=tenant_cap > 0)
    reply = await STREAM_SLOT.acall(redis, *open_call(slot, tenant_cap, key_cap))
    if int(reply[0]) == 1:
        return Slot(slot.member, tenant, key_id, job_id, counted=int(reply[1]) == 1)
    reason = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
    if reason == "key":
        raise RateLimited(
            f"this key has {int(reply[2])} job event streams open, its limit (max_streams_per_key); "
            "close one before opening another",
            retry_after=1,
        )
    raise RateLimited(
        f"the tenant has {int(reply[2])} jobs and event streams in flight, its in-flight limit; "
        "retry when one finishes",
        retry_after=1,
    )


async def give_back(redis: Any, slot: Slot) -> None:
    await STREAM_SLOT.acall(redis, *close_call(slot))


async def refresh(redis: Any, slots: Sequence[Slot]) -> list[tuple[str, bool]]:
    """Push back every slot's lapse; per slot, its job's status ('' : gone) and whether it still
    held its slots (False: they lapsed, the stream must end)."""
    found: list[tuple[str, bool]] = []
    for start in range(0, len(slots), REFRESH_CHUNK):
        reply = await STREAM_SLOT.acall(redis, *refresh_call(slots[start : start + REFRESH_CHUNK]))
        for i in range(0, len(reply), 2):
            status = reply[i].decode() if isinstance(reply[i], bytes) else str(reply[i])
            found.append((status, int(reply[i + 1]) == 1))
    return found
