"""Storage bounds (issue 11, finding 4): a tenant's stored async results are capped by count and
bytes (429 naming which), a stored result is charged by its size, dead letters are capped by
count, age and input size, a full Redis is a 503 that loses no accepted job, and an async job's
status changes are announced on ``jobs:events`` (sync jobs never are).

The scripts are checked on a real Redis through the typed builders (``bastion.queue.calls``);
the HTTP answers on a real stack with small limits."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from bastion import demo
from bastion.constants import (
    CONSUMER_GROUP,
    JOB_EVENTS_CHANNEL,
    dead_letter_key,
    job_key,
    queue_key,
    stored_keys,
    tenant_bucket_key,
)
from bastion.errors import RateLimited
from bastion.queue import calls, deadletters
from bastion.queue.calls import Admit, DeadLetters, Pricing, Storage
from bastion.queue.consumer import Consumer, Outcome
from bastion.queue.envelope import Envelope, Job
from bastion.queue.producer import admitted
from bastion.snapshot import Limits
from tests.support import Stack, running, wait_until

MODEL = "m"
ROW = [1.0] * 30
JOBS = f"/v1/models/{demo.MODEL_NAME}/jobs"
PREDICT = f"/v1/models/{demo.MODEL_NAME}/predict"


# scripts ----------------------------------------------------------------------------------
CAP3 = Storage(3, 1 << 20)


def _admit(storage: Storage | None = CAP3, ttl_s: int = 60, **overrides: Any) -> Admit:
    base: dict[str, Any] = {
        "max_queue": 1000,
        "keep_state": True,
        "state_ttl_s": ttl_s,
        "limits": Limits(),
        "pricing": Pricing(default_per_row=1.0, floor_per_row=0.01),
        "slot_ms": 60_000,
        "storage": storage,
    }
    return Admit(**{**base, **overrides})


def _submit(client: redis.Redis, job_id: str, tenant: str = "acme", admit: Admit | None = None, **env: Any) -> Any:
    envelope = Envelope(job_id, tenant, MODEL, 1, env.pop("lane", "batch"), created_ms=int(time.time() * 1000), **env)
    return calls.ENQUEUE.call(client, *calls.enqueue(envelope, admit or _admit()))


def _consumer(client: redis.Redis, **kwargs: Any) -> Consumer:
    consumer = Consumer(client, "w", result_ttl_s=60, sync_result_ttl_s=60, **kwargs)
    consumer.ensure_groups([MODEL])
    return consumer


def _read(client: redis.Redis, lane: str = "batch", count: int = 1) -> list[Job]:
    reply: Any = client.xreadgroup(CONSUMER_GROUP, "w", {queue_key(MODEL, lane): ">"}, count=count)
    return [Job.from_entry(s.decode(), e.decode(), f) for s, entries in reply or [] for e, f in entries]


def test_a_tenant_at_its_stored_result_count_is_refused_with_the_count_and_the_wait(
    redis_client: redis.Redis,
) -> None:
    """Queued async jobs count: the fourth of a tenant capped at 3 is refused (429 naming the
    stored-results count, Retry-After until the oldest expires); another tenant is not."""
    for i in range(3):
        assert _submit(redis_client, f"a{i}")[0] == 1
    refused = _submit(redis_client, "a3")
    assert refused[:4] == [0, b"stored", 3, 3]
    with pytest.raises(RateLimited) as caught:
        admitted(refused, MODEL, "batch")
    assert caught.value.detail.startswith("stored results: 3 of 3")
    assert 1 <= caught.value.retry_after <= 60
    assert _submit(redis_client, "g0", tenant="globex")[0] == 1, "another tenant has its own ledger"
    ledger, _ = stored_keys("acme")
    assert 0 < redis_client.pttl(ledger) <= 60_000, "the ledger lives as long as its longest entry"


def test_a_job_that_never_got_an_outcome_leaves_the_ledger_with_its_state(redis_client: redis.Redis) -> None:
    short = _admit(Storage(2, 1 << 20), ttl_s=1)
    assert _submit(redis_client, "x0", admit=short)[0] == 1
    assert _submit(redis_client, "x1", admit=short)[0] == 1
    assert _submit(redis_client, "x2", admit=short)[:2] == [0, b"stored"]
    time.sleep(1.2)  # both states (never run) expired
    assert not redis_client.exists(job_key("x0"))
    assert _submit(redis_client, "x3", admit=short)[0] == 1
    ledger, _ = stored_keys("acme")
    assert redis_client.zrange(ledger, 0, -1) == [b"x3"], "the expired entries were pruned"


def test_stored_result_bytes_are_counted_and_refused_naming_bytes(redis_client: redis.Redis) -> None:
    consumer = _consumer(redis_client)
    capped = _admit(Storage(100, 4096))
    assert _submit(redis_client, "big", admit=capped, rows=1)[0] == 1
    (job,) = _read(redis_client)
    consumer.complete([Outcome(job, "succeeded", result=b"r" * 5000)])
    ledger, sizes = stored_keys("acme")
    assert redis_client.hget(sizes, "big") == b"5000" and redis_client.hget(sizes, "total") == b"5000"
    assert 0 < redis_client.pttl(sizes) <= 60_000 and 0 < redis_client.pttl(ledger) <= 60_000
    refused = _submit(redis_client, "next", admit=capped)
    assert refused[:4] == [0, b"stored_bytes", b"5000", b"4096"]
    with pytest.raises(RateLimited) as caught:
        admitted(refused, MODEL, "batch")
    assert caught.value.detail.startswith("stored result bytes: 5000 of 4096")


def test_a_result_that_would_pass_the_tenants_stored_bytes_is_not_kept_and_the_job_fails(
    redis_client: redis.Redis,
) -> None:
    """Admission sees only the bytes already held; the worker's completion holds the bound for
    the result being added: a tenant's queued jobs cannot take it past its bound when they end."""
    consumer = _consumer(redis_client, max_stored_result_bytes=8000, result_cost_per_kib=1.0)
    capped = _admit(Storage(100, 8000))
    for i in range(3):  # all three are admitted while the tenant holds 0 bytes
        assert _submit(redis_client, f"q{i}", admit=capped, rows=1)[0] == 1
    jobs = _read(redis_client, count=3)
    outcomes = [Outcome(job, "succeeded", result=b"r" * 3000) for job in jobs]
    assert consumer.complete(outcomes) == ["succeeded", "succeeded", "failed"]
    _, sizes = stored_keys("acme")
    assert redis_client.hget(sizes, "total") == b"6000", "the third result was not kept"
    third = redis_client.hgetall(job_key(jobs[2].job_id))
    assert third[b"status"] == b"failed" and not third.get(b"result")
    assert b"max_stored_result_bytes" in third[b"error"]
    assert consumer.storage_units(outcomes[2]) == 0.0, "a result not kept is not charged"
    assert consumer.storage_units(outcomes[0]) > 0


def test_queued_jobs_are_expected_to_keep_results_of_the_average_size(redis_client: redis.Redis) -> None:
    """One kept result of 3,000 bytes and two queued jobs: 9,000 bytes expected, past a bound of
    8,000 (while the 3,000 kept alone would not refuse anything)."""
    consumer = _consumer(redis_client)
    capped = _admit(Storage(100, 8000))
    assert _submit(redis_client, "k0", admit=capped)[0] == 1
    consumer.complete([Outcome(_read(redis_client)[0], "succeeded", result=b"r" * 3000)])
    assert _submit(redis_client, "k1", admit=capped)[0] == 1
    assert _submit(redis_client, "k2", admit=capped)[0] == 1
    refused = _submit(redis_client, "k3", admit=capped)
    assert refused[:4] == [0, b"stored_bytes", b"9000", b"8000"]
    with pytest.raises(RateLimited) as caught:
        admitted(refused, MODEL, "batch")
    assert caught.value.detail.startswith("stored result bytes: 9000 of 8000")


def test_expired_results_give_their_bytes_back(redis_client: redis.Redis) -> None:
    consumer = Consumer(redis_client, "w", result_ttl_s=1, sync_result_ttl_s=60)
    consumer.ensure_groups([MODEL])
    capped = _admit(Storage(100, 4096))
    assert _submit(redis_client, "big", admit=capped)[0] == 1
    consumer.complete([Outcome(_read(redis_client)[0], "succeeded", result=b"r" * 5000)])
    assert _submit(redis_client, "next", admit=capped)[1] == b"stored_bytes"
    time.sleep(1.2)
    assert _submit(redis_client, "next", admit=capped)[0] == 1
    assert redis_client.hget(stored_keys("acme")[1], "total") in (None, b"0"), "pruned, or the hash expired"


def test_sync_jobs_take_no_ledger_entry(redis_client: redis.Redis) -> None:
    """The sync path carries no ledger (its results live until their caller has them)."""
    assert _submit(redis_client, "s", lane="sync", reply_to="gw", admit=_admit(None, keep_state=False))[0] == 1
    consumer = _consumer(redis_client)
    consumer.complete([Outcome(_read(redis_client, "sync")[0], "succeeded", result=b"r" * 5000)])
    assert not redis_client.exists(*stored_keys("acme"))


def test_a_stored_async_result_is_charged_by_its_size_and_a_sync_one_is_not(redis_client: redis.Redis) -> None:
    consumer = _consumer(redis_client, result_cost_per_kib=2.0)
    limits = Limits(tenant_rate=0.0, tenant_burst=10_000.0)
    bucket = tenant_bucket_key("acme", MODEL)

    def spent(lane: str, result: bytes) -> float:
        before = float(redis_client.hget(bucket, "tokens") or 10_000.0)
        keep = lane == "batch"
        reply_to = "" if keep else "gw"
        admit = _admit(None if not keep else Storage(100, 1 << 30), limits=limits, keep_state=keep)
        _submit(redis_client, f"{lane}{len(result)}", admit=admit, lane=lane, rows=10, reply_to=reply_to)
        (job,) = _read(redis_client, lane)
        done = Outcome(job, "succeeded", result=result, measured_units=3.0, ran=True)
        consumer.complete([done])
        consumer.settle([done])
        return before - float(redis_client.hget(bucket, "tokens") or 0)

    assert spent("batch", b"r" * 1024) == pytest.approx(3.0 + 2.0)
    assert spent("batch", b"r" * 102_400) == pytest.approx(3.0 + 200.0), "2 units per KiB kept"
    assert spent("sync", b"r" * 102_400) == pytest.approx(3.0), "a sync result is not charged"


def test_dead_letters_are_capped_by_count_and_age(redis_client: redis.Redis) -> None:
    consumer = _consumer(redis_client, dead_letters=DeadLetters(max_count=3, max_age_s=3600))
    stream = dead_letter_key(MODEL)
    old_ms = int(time.time() * 1000) - 7200_000
    redis_client.xadd(stream, {"reason": "older than the age cap"}, id=f"{old_ms}-0")
    for i in range(5):
        _submit(redis_client, f"d{i}", admit=_admit(None), blob=b"x")
    consumer.dead_letter(_read(redis_client, count=5), 3)
    letters = deadletters.listing(redis_client, MODEL, 100)
    assert [d["job_id"] for d in letters] == ["d4", "d3", "d2"], "the newest 3 are kept, the old one is gone"
    assert 0 < redis_client.pttl(stream) <= 3600_000, "the stream expires once its newest letter is too old"


def test_a_large_input_is_not_copied_into_its_dead_letter_and_cannot_be_replayed(redis_client: redis.Redis) -> None:
    consumer = _consumer(redis_client, dead_letters=DeadLetters(max_input_bytes=100))
    blob = b"i" * 101
    _submit(redis_client, "large", admit=_admit(None), blob=blob)
    _submit(redis_client, "small", admit=_admit(None), blob=b"i" * 100)
    consumer.dead_letter(_read(redis_client, count=2), 3)
    written: Any = redis_client.xrange(dead_letter_key(MODEL))
    assert all(b"x" not in f for _, f in written if f.get(b"replayable") == b"0"), "no input copied"
    letters = {d["job_id"]: d for d in deadletters.listing(redis_client, MODEL, 10)}
    large, small = letters["large"], letters["small"]
    assert (large["replayable"], large["input_bytes"]) == (False, 101)
    assert large["input_sha256"] == hashlib.sha256(blob).hexdigest()
    assert (small["replayable"], small["input_bytes"]) == (True, 100)
    assert deadletters.not_replayable(redis_client, MODEL, [large["id"], small["id"]]) == [large["id"]]
    counts = deadletters.replay(redis_client, MODEL, [large["id"], small["id"]], 60)
    assert counts == {"replayed": 1, "discarded": 0, "not_replayable": 1, "not_found": 0}
    assert [d["job_id"] for d in deadletters.listing(redis_client, MODEL, 10)] == ["large"], "it stays listed"


def test_a_dead_letter_written_before_the_mark_is_still_replayable(redis_client: redis.Redis) -> None:
    fields = Envelope("old", "acme", MODEL, 1, "batch", blob=b"i" * 100_000).fields()
    pairs = dict(zip(fields[::2], fields[1::2], strict=True))
    entry = redis_client.xadd(dead_letter_key(MODEL), {**pairs, "reason": "older release"})  # type: ignore[dict-item]
    assert deadletters.listing(redis_client, MODEL, 10)[0]["replayable"] is True
    assert deadletters.replay(redis_client, MODEL, [entry.decode()], 60)["replayed"] == 1  # type: ignore[union-attr]


@contextlib.contextmanager
def _events(client: redis.Redis) -> Iterator[list[str]]:
    """Collect what is published on ``jobs:events`` while the block runs (and a moment after)."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    pubsub.subscribe(JOB_EVENTS_CHANNEL)
    seen: list[str] = []
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.05)
            if message is not None:
                seen.append(message["data"].decode())

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    try:
        yield seen
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
        pubsub.close()


def test_an_async_job_is_announced_when_it_starts_and_ends_and_a_sync_job_never(redis_client: redis.Redis) -> None:
    consumer = _consumer(redis_client)
    with _events(redis_client) as seen:
        _submit(redis_client, "async1")
        _submit(redis_client, "sync1", lane="sync", reply_to="gw", admit=_admit(None, keep_state=False))
        (a,) = _read(redis_client)
        (s,) = _read(redis_client, "sync")
        consumer.mark_running([a, s])
        consumer.mark_running([a], child_pid=4242)  # only the pid changes: no status change
        consumer.complete([Outcome(a, "succeeded", result=b"r"), Outcome(s, "succeeded", result=b"r")])
        consumer.complete([Outcome(a, "succeeded", result=b"r")])  # a repeat stores nothing new
    assert seen == ["async1", "async1"]


def test_an_outcome_refused_for_want_of_memory_leaves_the_job_pending(redis_client: redis.Redis) -> None:
    consumer = _consumer(redis_client)
    _submit(redis_client, "kept")
    (job,) = _read(redis_client)
    redis_client.config_set("maxmemory", 1)
    try:
        outcome = Outcome(job, "succeeded", result=b"r")
        assert consumer.complete([outcome]) == [""] and outcome.refused and not outcome.settles
        pending: Any = redis_client.xpending(queue_key(MODEL, "batch"), CONSUMER_GROUP)
        assert pending["pending"] == 1, "not acknowledged without its outcome"
    finally:
        redis_client.config_set("maxmemory", 0)
    assert consumer.complete([outcome]) == ["succeeded"] and outcome.stored and not outcome.refused


# a stack ----------------------------------------------------------------------------------
SMALL: dict[str, Any] = {
    "workers": 1,
    "max_stored_results": 5,
    "max_stored_result_bytes": 24_000,
    "result_ttl_s": 4,
    "result_cost_per_kib": 100.0,
    "dead_letter_max_input_bytes": 100,
}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("storage"), **SMALL) as s:
        yield s


def _client(stack: Stack, tenant: str) -> httpx.Client:
    if tenant not in stack.keys:
        stack.keys[tenant] = stack.admin.create_key(tenant, "storage")["key"]
        wait_until(
            lambda: (
                httpx.get(
                    f"{stack.gateway}/v1/jobs/none", headers={"Authorization": f"Bearer {stack.keys[tenant]}"}
                ).status_code
                == 404
            ),
            10,
            "the gateway to know the new key",
        )
    return stack.client(tenant)


def _status(http: httpx.Client, job_id: str) -> str:
    status: str = http.get(f"/v1/jobs/{job_id}").json().get("status", "")
    return status


def test_a_tenant_over_its_stored_results_gets_429_naming_the_count_until_they_expire(small: Stack) -> None:
    with _client(small, "counted") as http, _client(small, "neighbour") as other:
        ids = []
        for _ in range(5):
            answer = http.post(JOBS, json={"inputs": [ROW]})
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["id"])
        refused = http.post(JOBS, json={"inputs": [ROW]})
        assert refused.status_code == 429
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["detail"].startswith("stored results: 5 of 5")
        assert 1 <= int(refused.headers["Retry-After"]) <= SMALL["result_ttl_s"]
        assert other.post(JOBS, json={"inputs": [ROW]}).status_code == 202, "another tenant is unaffected"
        wait_until(lambda: all(_status(http, j) == "succeeded" for j in ids), 30, "the jobs to finish")
        wait_until(lambda: http.post(JOBS, json={"inputs": [ROW]}).status_code == 202, 30, "the results to expire")


def test_a_tenant_never_holds_more_result_bytes_than_its_bound(small: Stack) -> None:
    """With 24,000 bytes allowed, a ~16 KB result is kept; the next one, admitted while the tenant
    held less than its bound, fails naming the bound when it ends and keeps nothing."""
    with _client(small, "bulky") as http:
        first = http.post(JOBS, json={"inputs": [ROW] * 1000}).json()["id"]  # a result of ~16 KB
        wait_until(lambda: _status(http, first) == "succeeded", 30, "the large job")
        second = http.post(JOBS, json={"inputs": [ROW] * 1000})
        assert second.status_code == 202
        wait_until(lambda: _status(http, second.json()["id"]) == "failed", 30, "the second large job")
        failed = http.get(f"/v1/jobs/{second.json()['id']}").json()
        assert "max_stored_result_bytes" in failed["error"] and "outputs" not in failed
    client = small.redis_client()
    try:
        assert int(client.hget(stored_keys("bulky")[1], "total") or 0) <= 24_000
    finally:
        client.close()


def test_the_budget_is_charged_by_the_size_of_the_stored_result(small: Stack) -> None:
    """result_cost_per_kib (100) per KiB kept, on top of the run: a 16 KB result spends its
    tenant's budget however cheap its rows were measured."""
    small.admin.set_tenant("payer", None, limits={"burst": 100_000, "units_per_s": 0})
    client = small.redis_client()
    bucket = tenant_bucket_key("payer", demo.MODEL_NAME)
    try:
        with _client(small, "payer") as http:
            job = http.post(JOBS, json={"inputs": [ROW] * 1000}).json()["id"]
            wait_until(lambda: _status(http, job) == "succeeded", 30, "the large job")
            size = int(client.hstrlen(job_key(job), "result"))
            charge = 100.0 * size / 1024

            def settled() -> bool:
                return 100_000 - float(client.hget(bucket, "tokens") or 100_000) >= charge

            wait_until(settled, 10, "the job to be settled")
            spent = 100_000 - float(client.hget(bucket, "tokens") or 0)
            assert charge <= spent < charge + 1000, f"spent {spent} units for a {size}-byte result"
    finally:
        client.close()


def test_a_large_inputs_dead_letter_keeps_no_input_and_its_replay_is_409(small: Stack) -> None:
    client = small.redis_client()
    try:
        with _client(small, "dead") as http:
            small.signal("worker-0", signal.SIGSTOP)  # the ghost below takes the job, not the worker
            try:
                job = http.post(JOBS, json={"inputs": [ROW] * 4}).json()["id"]
                ghost = Consumer(
                    client,
                    "ghost",
                    result_ttl_s=60,
                    sync_result_ttl_s=60,
                    dead_letters=DeadLetters(max_input_bytes=SMALL["dead_letter_max_input_bytes"]),
                )
                # The job is either still in the stream or was handed to the frozen worker's
                # blocked read: the ghost reads, then claims whatever is pending, past 1 delivery.
                ghost.read([demo.MODEL_NAME], 10, None)
                time.sleep(0.01)
                _, dead = ghost.reclaim([demo.MODEL_NAME], min_idle_ms=0, max_deliveries=1)
                assert [j.job_id for j in dead] == [job]
                ghost.dead_letter(dead, 1)
            finally:
                small.signal("worker-0", signal.SIGCONT)
            (letter,) = [d for d in small.admin.dead_letters(demo.MODEL_NAME) if d["job_id"] == job]
            assert letter["replayable"] is False and letter["input_bytes"] > 100 and letter["input_sha256"]
            answer = httpx.post(
                f"{small.control_url}/admin/v1/models/{demo.MODEL_NAME}/dead-letters/replay",
                json={"ids": [letter["id"]]},
                headers={"Authorization": f"Bearer {small.admin_key}"},
            )
            assert answer.status_code == 409, answer.text
            assert answer.headers["content-type"].startswith("application/problem+json")
            assert "cannot be replayed" in answer.json()["detail"]
            assert small.admin.replay(demo.MODEL_NAME)["replayed"] == 0, "replay-all skips it"
            assert any(d["id"] == letter["id"] for d in small.admin.dead_letters(demo.MODEL_NAME)), "still listed"
    finally:
        client.close()


def test_the_worker_announces_async_jobs_and_never_sync_ones(small: Stack) -> None:
    client = small.redis_client()
    try:
        with _client(small, "events") as http, _events(client) as seen:
            job = http.post(JOBS, json={"inputs": [ROW]}).json()["id"]
            sync = http.post(PREDICT, json={"inputs": [ROW]})
            assert sync.status_code == 200
            wait_until(lambda: _status(http, job) == "succeeded", 30, "the async job")
        assert seen.count(job) == 2, "running, then its outcome"
        assert sync.json()["id"] not in seen
    finally:
        client.close()


def test_a_full_redis_is_a_503_and_loses_no_accepted_job(small: Stack) -> None:
    """With Redis at maxmemory (noeviction), submissions and predictions are 503 problems with
    Retry-After, never 500; a job accepted before it filled, whose completion is refused, stays
    pending and finishes once there is room again."""
    client = small.redis_client()
    before = str(client.config_get("maxmemory")["maxmemory"])
    try:
        with _client(small, "oom") as http:
            small.signal("worker-0", signal.SIGSTOP)
            try:
                ids = [http.post(JOBS, json={"inputs": [ROW]}).json()["id"] for _ in range(3)]
                client.config_set("maxmemory", 1)
            finally:
                small.signal("worker-0", signal.SIGCONT)
            for path in (JOBS, PREDICT):
                full = http.post(path, json={"inputs": [ROW]})
                assert full.status_code == 503, full.text
                assert full.headers["content-type"].startswith("application/problem+json")
                assert full.json()["detail"] == "the job store is full; retry later"
                assert int(full.headers["Retry-After"]) >= 1

            def held() -> bool:  # read by the worker, run, refused: still pending, no outcome
                pending: Any = client.xpending(queue_key(demo.MODEL_NAME, "batch"), CONSUMER_GROUP)
                return int(pending["pending"]) == 3

            wait_until(held, 20, "the worker to hold the jobs")
            time.sleep(1.0)
            assert all(_status(http, j) in ("queued", "running") for j in ids), "no outcome was stored"
            client.config_set("maxmemory", before)
            wait_until(lambda: all(_status(http, j) == "succeeded" for j in ids), 30, "the held jobs")
    finally:
        client.config_set("maxmemory", before)
        client.close()


def test_results_are_kept_for_the_shorter_default_ttl(tmp_path: Path) -> None:
    """The default result TTL is an hour (it was a day)."""
    from bastion.settings import Settings

    assert Settings(data_dir=tmp_path).result_ttl_s == 3600
