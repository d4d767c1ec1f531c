"""Decision-log events on a real Redis: written by the script that makes a decision final,
exactly once per decision, never for what is not one (``bastion.queue.decisions``)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import orjson
import redis

from bastion import codec
from bastion.constants import AUDIT_STREAM, CONSUMER_GROUP, queue_key
from bastion.queue import calls, decisions
from bastion.queue.calls import Admit, Pricing
from bastion.queue.consumer import Consumer, Outcome
from bastion.queue.envelope import ROLE_FALLBACK, ROLE_SHADOW, Envelope, Job
from bastion.snapshot import Limits

MODEL = "m"
SHA = "ab" * 32


def _admit() -> Admit:
    return Admit(
        max_queue=1000,
        keep_state=False,
        state_ttl_s=60,
        limits=Limits(),
        pricing=Pricing(default_per_row=1.0, floor_per_row=0.01),
        slot_ms=60_000,
    )


def _consumer(client: redis.Redis, logging: bool = True) -> Consumer:
    consumer = Consumer(
        client, "w", result_ttl_s=60, sync_result_ttl_s=60, artifact_of=(lambda m, v: SHA) if logging else None
    )
    consumer.ensure_groups([MODEL])
    return consumer


def _queue(client: redis.Redis, env: Envelope) -> Job:
    env.created_ms = env.created_ms or int(time.time() * 1000)
    calls.ENQUEUE.call(client, *calls.enqueue(env, _admit()))
    reply: Any = client.xreadgroup(CONSUMER_GROUP, "w", {queue_key(MODEL, env.lane): ">"}, count=1)
    (stream, ((entry_id, fields),)) = reply[0]
    return Job.from_entry(stream.decode(), entry_id.decode(), fields)


def _events(client: redis.Redis) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in client.xrange(AUDIT_STREAM)]  # type: ignore[union-attr]


def _env(job_id: str, lane: str = "sync", **extra: Any) -> Envelope:
    blob = codec.encode({"x": np.ones((2, 3), dtype=np.float32)})
    return Envelope(job_id, "acme", MODEL, 1, lane, rows=2, key_id="k1", blob=blob, **extra)


def test_an_answered_job_writes_one_event_with_its_outcome_and_a_redelivery_writes_none(
    redis_client: redis.Redis,
) -> None:
    consumer = _consumer(redis_client)
    job = _queue(redis_client, _env("j1", subject="d" * 32, rule="eu-only", jurisdiction="eu", consents=("ads",)))
    consumer.complete([Outcome(job, "succeeded", result=b"OUT")])
    consumer.complete([Outcome(job, "succeeded", result=b"OTHER")])  # it ran again after a redelivery
    (entry,) = _events(redis_client)
    doc = orjson.loads(entry[b"e"])
    assert entry[b"o"] == b"OUT" and b"i" not in entry
    assert doc["id"] == "j1" and doc["kind"] == decisions.KIND_DECISION and doc["artifact"] == SHA
    assert doc["tenant"] == "acme" and doc["key"] == "k1" and doc["subj"] == "d" * 32
    assert doc["rule"] == "eu-only" and doc["jurisdiction"] == "eu" and doc["consents"] == ["ads"]
    assert doc["cache"] is False and doc["role"] == "primary" and doc["rows"] == 2
    assert len(doc["input_sha256"]) == 64 and doc["latency_ms"] >= 0


def test_a_tenant_that_keeps_payloads_gets_its_inputs_in_the_event(redis_client: redis.Redis) -> None:
    consumer = _consumer(redis_client)
    env = _env("kept", retain=True, role=ROLE_FALLBACK)
    job = _queue(redis_client, env)
    consumer.complete([Outcome(job, "succeeded", result=b"OUT")])
    (entry,) = _events(redis_client)
    assert entry[b"i"] == env.blob
    assert orjson.loads(entry[b"e"])["role"] == ROLE_FALLBACK


def test_failures_abandoned_jobs_and_shadow_copies_are_no_decisions(redis_client: redis.Redis) -> None:
    consumer = _consumer(redis_client)
    failed = _queue(redis_client, _env("failed"))
    consumer.complete([Outcome(failed, "failed", error="bad input")])
    abandoned = _queue(redis_client, _env("abandoned"))
    calls.ABANDON.call(redis_client, *calls.abandon("abandoned", "acme", MODEL, "gave up", ttl_s=60, finished_ms=1))
    consumer.complete([Outcome(abandoned, "succeeded", result=b"LATE")])  # the 504 stands: no decision
    shadow = _queue(redis_client, _env("shadow", role=ROLE_SHADOW, lane="shadow"))
    consumer.complete([Outcome(shadow, "succeeded", result=b"COPY")])
    assert _events(redis_client) == []


def test_with_the_decision_log_off_nothing_is_written(redis_client: redis.Redis) -> None:
    consumer = _consumer(redis_client, logging=False)
    job = _queue(redis_client, _env("off"))
    consumer.complete([Outcome(job, "succeeded", result=b"OUT")])
    assert _events(redis_client) == []


def test_a_cache_hit_writes_its_event_in_the_same_call_and_a_miss_writes_nothing(redis_client: redis.Redis) -> None:
    env = _env("hit1", retain=True)
    doc = decisions.event(env, SHA, int(time.time() * 1000), cache=True, latency_ms=0.0)
    assert calls.CACHED.call(redis_client, *calls.cached("rc:test", env, doc)) is None
    assert _events(redis_client) == []
    redis_client.set("rc:test", b"CACHED", ex=60)
    assert calls.CACHED.call(redis_client, *calls.cached("rc:test", env, doc)) == b"CACHED"
    (entry,) = _events(redis_client)
    assert entry[b"o"] == b"CACHED" and entry[b"i"] == env.blob
    assert orjson.loads(entry[b"e"])["cache"] is True
    assert calls.CACHED.call(redis_client, *calls.cached("rc:test", env, b"")) == b"CACHED"  # log off
    assert len(_events(redis_client)) == 1
