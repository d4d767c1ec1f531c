"""The queue scripts' accounting on a real Redis: prices, in-flight slots, idempotency records,
shadow records and replays, each called through the typed builders of ``bastion.queue.calls``."""

from __future__ import annotations

import time

import redis

from bastion.constants import (
    CONSUMER_GROUP,
    dead_letter_key,
    idempotency_key,
    job_key,
    queue_key,
    shadow_job_key,
    tenant_bucket_key,
)
from bastion.queue import calls, deadletters
from bastion.queue.calls import Admit, Pricing
from bastion.queue.consumer import Consumer, Outcome
from bastion.queue.envelope import Envelope, Job
from bastion.snapshot import Limits

MODEL = "m"
FLOOR = 0.01


def _admit(**overrides: object) -> Admit:
    base: dict[str, object] = {
        "max_queue": 1000,
        "keep_state": False,
        "state_ttl_s": 60,
        "limits": Limits(),
        "pricing": Pricing(default_per_row=1.0, floor_per_row=FLOOR),
        "slot_ms": 60_000,
    }
    return Admit(**{**base, **overrides})  # type: ignore[arg-type]


def _enqueue(client: redis.Redis, env: Envelope, admit: Admit | None = None) -> list[object]:
    env.created_ms = env.created_ms or int(time.time() * 1000)
    reply: list[object] = calls.ENQUEUE.call(client, *calls.enqueue(env, admit or _admit()))
    return reply


def _read(client: redis.Redis, consumer: Consumer, lane: str = "sync") -> Job:
    reply = client.xreadgroup(CONSUMER_GROUP, consumer.name, {queue_key(MODEL, lane): ">"}, count=1)
    (stream, ((entry_id, fields),)) = reply[0]  # type: ignore[index]
    return Job.from_entry(stream.decode(), entry_id.decode(), fields)


def _consumer(client: redis.Redis) -> Consumer:
    consumer = Consumer(client, "w", result_ttl_s=60, sync_result_ttl_s=60, floor_per_row=FLOOR)
    consumer.ensure_groups([MODEL])
    return consumer


def _price(client: redis.Redis, version: int = 1) -> float | None:
    raw = client.hget(f"cost:{MODEL}:{version}", "per_row")
    return float(raw) if raw is not None else None


def test_jobs_that_expired_before_running_teach_the_price_nothing_and_get_their_reservation_back(
    redis_client: redis.Redis,
) -> None:
    """10,000 expired jobs leave the learned price where the jobs that ran put it; their
    reserved units all go back to the bucket."""
    consumer = _consumer(redis_client)
    limits = Limits(tenant_rate=0.0, tenant_burst=1_000_000.0)
    _enqueue(redis_client, Envelope("ran", "acme", MODEL, 1, "sync", rows=4), _admit(limits=limits))
    ran = _read(redis_client, consumer)
    done = Outcome(ran, "succeeded", measured_units=2.0, ran=True, settles=True)  # 0.5 units per row
    consumer.settle([done])
    learned = _price(redis_client)
    assert learned == 0.5
    before = float(redis_client.hget(tenant_bucket_key("acme", MODEL), "tokens") or 0)
    for start in range(0, 10_000, 500):
        pipe = redis_client.pipeline(transaction=False)
        for i in range(start, start + 500):
            calls.ENQUEUE.queue(
                pipe, *calls.enqueue(Envelope(f"late{i}", "acme", MODEL, 1, "sync", rows=1), _admit(limits=limits))
            )
        pipe.execute()
        entries = redis_client.xreadgroup(CONSUMER_GROUP, "w", {queue_key(MODEL, "sync"): ">"}, count=500)
        jobs = [Job.from_entry(s.decode(), e.decode(), f) for s, batch in entries for e, f in batch]  # type: ignore[union-attr]
        consumer.settle([Outcome(j, "expired", measured_units=0.0, settles=True) for j in jobs])
    assert _price(redis_client) == learned, "an expired job moved the price"
    after = float(redis_client.hget(tenant_bucket_key("acme", MODEL), "tokens") or 0)
    assert abs(after - before) < 1e-6, "each expired job's reservation went back"


def test_the_price_is_learned_per_version_and_never_below_the_floor(redis_client: redis.Redis) -> None:
    consumer = _consumer(redis_client)
    _enqueue(redis_client, Envelope("a", "acme", MODEL, 1, "sync", rows=10))
    _enqueue(redis_client, Envelope("b", "acme", MODEL, 2, "sync", rows=10))
    a, b = _read(redis_client, consumer), _read(redis_client, consumer)
    for _ in range(50):  # a version that measures (nearly) nothing
        consumer.settle([Outcome(a, "succeeded", measured_units=0.0, ran=True, settles=True)])
    consumer.settle([Outcome(b, "succeeded", measured_units=30.0, ran=True, settles=True)])
    assert _price(redis_client, 1) == FLOOR
    assert _price(redis_client, 2) == 3.0, "version 2's price is its own"
    cost = float(_enqueue(redis_client, Envelope("c", "acme", MODEL, 1, "sync", rows=100))[2])  # type: ignore[arg-type]
    assert cost == 100 * FLOOR


def test_a_failed_job_does_not_teach_the_price(redis_client: redis.Redis) -> None:
    """An input that makes the model fail fast must not make rows cheap for everyone."""
    consumer = _consumer(redis_client)
    _enqueue(redis_client, Envelope("f", "acme", MODEL, 1, "sync", rows=10))
    job = _read(redis_client, consumer)
    consumer.settle([Outcome(job, "failed", measured_units=0.0, ran=False, settles=True)])
    assert _price(redis_client) is None


def test_a_leaked_in_flight_slot_lapses_instead_of_holding_the_cap_for_ever(redis_client: redis.Redis) -> None:
    """A job whose outcome never comes back (a lost gateway, a bug) holds its tenant's slot only
    for the slot's lifetime, however many jobs the tenant queues meanwhile."""
    capped = _admit(limits=Limits(max_concurrency=1), slot_ms=600)
    assert _enqueue(redis_client, Envelope("leaked", "acme", MODEL, 1, "sync"), capped)[0] == 1
    refused = _enqueue(redis_client, Envelope("next", "acme", MODEL, 1, "sync"), capped)
    assert refused[:2] == [0, b"concurrency"]
    deadline = time.monotonic() + 0.45
    while time.monotonic() < deadline:  # refused, and refusals must not extend the leaked slot
        assert _enqueue(redis_client, Envelope("next", "acme", MODEL, 1, "sync"), capped)[0] == 0
        time.sleep(0.05)
    time.sleep(0.25)
    assert _enqueue(redis_client, Envelope("later", "acme", MODEL, 1, "sync"), capped)[0] == 1
    assert 0 < redis_client.pttl("inflight:acme") <= 600, "the set's key lives as long as its longest slot"


def test_an_outcome_gives_the_slot_back_once(redis_client: redis.Redis) -> None:
    consumer = _consumer(redis_client)
    capped = _admit(limits=Limits(max_concurrency=1))
    _enqueue(redis_client, Envelope("one", "acme", MODEL, 1, "sync", reply_to="gw"), capped)
    job = _read(redis_client, consumer)
    assert job.counted
    calls.ABANDON.call(
        redis_client, *calls.abandon("one", "acme", MODEL, "late", ttl_s=60, finished_ms=1, counted=True)
    )
    assert redis_client.zcard("inflight:acme") == 0
    assert consumer.complete([Outcome(job, "succeeded", result=b"r")]) == ["expired"], "the first outcome wins"


def test_the_worker_keeps_a_sync_outcome_in_its_idempotency_record(redis_client: redis.Redis) -> None:
    """The completion script stores the outcome where the key's retries look, so a retry gets it
    even when the gateway that waited is gone; an expired outcome drops the record instead."""
    consumer = _consumer(redis_client)
    record = idempotency_key("acme", "k1")
    env = Envelope("s1", "acme", MODEL, 1, "sync", reply_to="gw", idempotency=record)
    _enqueue(redis_client, env, _admit(idempotency=(record, "fp")))
    consumer.complete([Outcome(_read(redis_client, consumer), "succeeded", result=b"answer")])
    stored = redis_client.hgetall(record)
    assert stored[b"job"] == b"s1" and stored[b"status"] == b"succeeded" and stored[b"result"] == b"answer"
    assert 0 < redis_client.ttl(record) <= calls.IDEMPOTENCY_TTL_S

    late = idempotency_key("acme", "k2")
    _enqueue(
        redis_client,
        Envelope("s2", "acme", MODEL, 1, "sync", reply_to="gw", idempotency=late),
        _admit(idempotency=(late, "f")),
    )
    consumer.complete([Outcome(_read(redis_client, consumer), "expired", error="deadline")])
    assert not redis_client.exists(late), "an expired outcome is not kept: a retry runs again"

    other = idempotency_key("acme", "k3")
    redis_client.hset(other, mapping={"fp": "x", "job": "someone-else"})
    _enqueue(redis_client, Envelope("s3", "acme", MODEL, 1, "sync", reply_to="gw", idempotency=other))
    consumer.complete([Outcome(_read(redis_client, consumer), "succeeded", result=b"r")])
    assert redis_client.hget(other, "status") is None, "a record of another job is left alone"


def test_a_shadow_copy_leaves_no_tenant_readable_state_and_no_dead_letter(redis_client: redis.Redis) -> None:
    consumer = _consumer(redis_client)
    for job_id in ("sh1", "sh2"):
        env = Envelope(job_id, "acme", MODEL, 2, "shadow", role="shadow", rows=3, compare=b"answer", blob=b"x")
        _enqueue(redis_client, env)
    first, second = _read(redis_client, consumer, "shadow"), _read(redis_client, consumer, "shadow")
    consumer.complete([Outcome(first, "succeeded", result=b"unreleased outputs")])
    consumer.complete([Outcome(second, "dead_lettered", error="x", dead_reason="delivered 3 times")])
    assert not redis_client.exists(job_key("sh1")) and not redis_client.exists(job_key("sh2"))
    record = redis_client.hgetall(shadow_job_key("sh1"))
    assert record[b"status"] == b"succeeded" and record[b"result"] == b"", "no outputs are kept"
    assert 0 < redis_client.ttl(shadow_job_key("sh1")) <= 600
    assert redis_client.xlen(dead_letter_key(MODEL)) == 0, "a shadow's inputs are never kept as a dead letter"
    consumer.settle([Outcome(first, "succeeded", measured_units=5.0, ran=True, settles=True)])
    assert _price(redis_client, 2) is None, "a shadow copy teaches no price"


def test_starting_a_job_never_recreates_a_state_that_expired(redis_client: redis.Redis) -> None:
    """Naming the pid of a child that runs a job must not bring back a job hash without a TTL."""
    consumer = _consumer(redis_client)
    _enqueue(redis_client, Envelope("gone", "acme", MODEL, 1, "batch"), _admit(keep_state=True, state_ttl_s=60))
    job = _read(redis_client, consumer, "batch")
    redis_client.delete(job_key("gone"))  # its state expired while it waited
    consumer.mark_running([job], child_pid=12345)
    assert not redis_client.exists(job_key("gone"))


def test_a_replayed_dead_letter_carries_no_reservation_and_refunds_nothing(redis_client: redis.Redis) -> None:
    consumer = _consumer(redis_client)
    limits = Limits(tenant_rate=0.0, tenant_burst=100.0)
    _enqueue(redis_client, Envelope("dl", "acme", MODEL, 1, "batch", rows=10), _admit(limits=limits, keep_state=True))
    job = _read(redis_client, consumer, "batch")
    assert job.cost == 10.0
    consumer.dead_letter([job], 3)  # it kept failing: its reservation stays spent
    tokens = float(redis_client.hget(tenant_bucket_key("acme", MODEL), "tokens") or 0)
    (entry,) = deadletters.listing(redis_client, MODEL, 10)
    assert deadletters.replay(redis_client, MODEL, [entry["id"]], 60)["replayed"] == 1
    again = _read(redis_client, consumer, "batch")
    assert again.job_id == "dl" and again.cost == 0.0 and not again.counted
    consumer.settle([Outcome(again, "succeeded", measured_units=1.0, ran=True, settles=True)])
    assert float(redis_client.hget(tenant_bucket_key("acme", MODEL), "tokens") or 0) == tokens


def test_an_envelope_of_version_1_is_still_read(redis_client: redis.Redis) -> None:
    """Entries queued by the previous release (a single ``h`` header) keep working after an upgrade."""
    fields = {b"h": b"old|acme|m|3|0||123", b"x": b"blob", b"n": b"2", b"k": b"key1", b"c": b"0.5", b"q": b"1"}
    job = Job.from_entry("q:m:batch", "1-0", fields)
    assert (job.job_id, job.tenant, job.model, job.version, job.lane) == ("old", "acme", "m", 3, "batch")
    assert (job.rows, job.key_id, job.cost, job.counted, job.is_async) == (2, "key1", 0.5, True, True)


def test_a_job_that_ran_twice_after_a_redelivery_is_settled_once(redis_client: redis.Redis) -> None:
    """Only the outcome that was stored settles: a stalled worker finishing after another one
    took its job over refunds nothing a second time and teaches the price nothing."""
    consumer = _consumer(redis_client)
    limits = Limits(tenant_rate=0.0, tenant_burst=100.0)
    _enqueue(redis_client, Envelope("twice", "acme", MODEL, 1, "sync", rows=10), _admit(limits=limits))
    job = _read(redis_client, consumer)
    first = Outcome(job, "succeeded", result=b"r", measured_units=2.0)
    first.ran = True
    again = Outcome(job, "succeeded", result=b"r", measured_units=2.0)
    again.ran = True
    consumer.complete([first])
    consumer.complete([again])
    assert first.stored and first.settles and not again.stored and not again.settles
    consumer.settle([first, again])
    tokens = float(redis_client.hget(tenant_bucket_key("acme", MODEL), "tokens") or 0)
    assert tokens == 100.0 - 2.0, "the reservation (10) was corrected to the measured 2 units once"


def test_a_late_redelivery_never_replaces_or_drops_a_kept_idempotent_answer(redis_client: redis.Redis) -> None:
    """A sync job's state lives minutes, its Idempotency-Key record a day: a delivery finishing
    after the state expired must leave the answer the record keeps."""
    consumer = _consumer(redis_client)
    record = idempotency_key("acme", "late")
    env = Envelope("kept", "acme", MODEL, 1, "sync", reply_to="gw", idempotency=record)
    _enqueue(redis_client, env, _admit(idempotency=(record, "fp")))
    job = _read(redis_client, consumer)
    consumer.complete([Outcome(job, "succeeded", result=b"first answer")])
    redis_client.delete(job_key("kept"))  # the state expired
    consumer.complete([Outcome(job, "expired", error="late")])
    assert redis_client.hget(record, "result") == b"first answer"
    redis_client.delete(job_key("kept"))
    consumer.complete([Outcome(job, "succeeded", result=b"second answer")])
    assert redis_client.hget(record, "result") == b"first answer"


def test_a_job_its_gateway_abandoned_still_gets_its_reservation_back(redis_client: redis.Redis) -> None:
    """The gateway stores 'expired' first (its caller's deadline passed); the worker's later
    outcome is not stored, but it settles: the reservation goes back, once."""
    consumer = _consumer(redis_client)
    limits = Limits(tenant_rate=0.0, tenant_burst=100.0)
    _enqueue(redis_client, Envelope("gave-up", "acme", MODEL, 1, "sync", reply_to="gw", rows=10), _admit(limits=limits))
    job = _read(redis_client, consumer)
    calls.ABANDON.call(redis_client, *calls.abandon("gave-up", "acme", MODEL, "late", ttl_s=60, finished_ms=1))
    late = Outcome(job, "expired", measured_units=0.0)
    consumer.complete([late])
    assert not late.stored and late.settles
    consumer.settle([late])
    assert float(redis_client.hget(tenant_bucket_key("acme", MODEL), "tokens") or 0) == 100.0
    assert 0 < redis_client.ttl(job_key("gave-up")) <= 60


def test_replay_discards_evaluations_and_malformed_dead_letters(redis_client: redis.Redis) -> None:
    """Only a well-formed async job is queued again; an evaluation (its report was closed when it
    died), a shadow copy and an entry without a usable version are removed, never half-replayed."""
    entries = [
        {b"v": b"2", b"m": b'{"id":"ev","tenant":"_control","model":"m","version":1,"reply":"","role":"evaluation"}'},
        {b"v": b"2", b"m": b'{"id":"sh","tenant":"acme","model":"m","version":1,"reply":"","role":"shadow"}'},
        {b"v": b"2", b"m": b'{"id":"nov","tenant":"acme","model":"m","reply":""}'},
        {b"v": b"2", b"m": b'{"id":"obj","tenant":"acme","model":"m","version":{"a":1},"reply":""}'},
        {b"v": b"2", b"m": b"not json"},
    ]
    ids = [redis_client.xadd(dead_letter_key(MODEL), {**e, b"reason": b"test"}).decode() for e in entries]  # type: ignore[union-attr, dict-item]
    assert deadletters.replay(redis_client, MODEL, ids, 60) == {
        "replayed": 0,
        "discarded": 5,
        "not_replayable": 0,
        "not_found": 0,
    }
    assert redis_client.xlen(dead_letter_key(MODEL)) == 0
    assert not redis_client.exists(queue_key(MODEL, "batch"))
    assert not any(redis_client.exists(job_key(j)) for j in ("ev", "sh", "nov", "obj"))
