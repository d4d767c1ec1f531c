"""Text token budgets on a real Redis: tokens and requests per minute, per (tenant, model) and per
key, taken in the same atomic admission call as compute units (exact across gateway processes),
and the unused tokens of a generation given back by ``calls.settle_tokens``."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import subprocess
import sys
import time
from typing import Any, cast

import pytest
import redis

from bastion.constants import SNAPSHOT_KEY
from bastion.errors import RateLimited
from bastion.queue import calls
from bastion.queue.envelope import Envelope, Job
from bastion.queue.producer import Admission, Producer, join_ratelimit_fields, text_ratelimit_fields
from bastion.redisconn import async_client
from bastion.registry.limits import Budget, TenantLimits, resolve
from bastion.snapshot import Limits, Snapshot
from tests.support import running, wait_until

MODEL = "chat"
TENANT_TOKENS = f"rl:tt:acme:{MODEL}"
TENANT_REQUESTS = f"rl:tr:acme:{MODEL}"
TEXT_PREFIXES = ("rl:tt:*", "rl:tr:*", "rl:kt:*", "rl:kr:*")


def _env(job_id: str, key_id: str = "k1", lane: str = "sync") -> Envelope:
    return Envelope(job_id, "acme", MODEL, 1, lane, key_id=key_id, rows=1)


def _producer(client: Any) -> Producer:
    return Producer(client, max_queue_sync=100_000, max_queue_batch=100_000, result_ttl_s=60)


async def _enqueue_all(url: str, prefix: str, sizes: list[int], limits: Limits) -> list[int]:
    """Enqueue one job per size, all at once through one Producer on its own connection pool; the
    tokens of each admitted job (0: refused with RateLimited)."""
    client = async_client(url, max_connections=64)
    producer = _producer(client)

    async def one(i: int, tokens: int) -> int:
        try:
            await producer.enqueue(_env(f"{prefix}-{i}"), limits=limits, tokens=tokens)
        except RateLimited:
            return 0
        return tokens

    try:
        return list(await asyncio.gather(*(one(i, n) for i, n in enumerate(sizes))))
    finally:
        await client.aclose()


def _gateway(url: str, prefix: str, sizes: list[int], limits: Limits, start: Any, out: Any) -> None:
    """One gateway process: wait for the start signal, then enqueue everything at once."""
    start.wait()
    out.put(asyncio.run(_enqueue_all(url, prefix, sizes, limits)))


def _two_gateways(url: str, sizes: list[int], limits: Limits) -> list[int]:
    """Half the sizes from each of two processes, started together; admitted tokens per size."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    halves = [sizes[0::2], sizes[1::2]]
    procs = [
        ctx.Process(target=_gateway, args=(url, f"g{i}", half, limits, start, out)) for i, half in enumerate(halves)
    ]
    for p in procs:
        p.start()
    time.sleep(1.5)  # both have imported bastion and wait on the signal
    start.set()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return [n for result in results for n in result]


def _level(client: redis.Redis, key: str) -> float:
    return float(client.hget(key, "tokens") or "nan")


def test_a_token_budget_admits_exactly_its_tokens_across_two_gateway_processes(
    redis_url: str, redis_client: redis.Redis
) -> None:
    limits = Limits(tenant_tokens_per_min=0.0, tenant_tokens_burst=10_000.0)  # never refilled: exact
    admitted = _two_gateways(redis_url, [10] * 2000, limits)
    print(f"2,000 concurrent 10-token jobs from 2 processes: {sum(n > 0 for n in admitted)} admitted")
    assert sum(admitted) == 10_000 and sum(n > 0 for n in admitted) == 1000
    assert _level(redis_client, TENANT_TOKENS) == 0
    assert redis_client.xlen(f"q:{MODEL}:sync") == 1000
    assert 0 < redis_client.ttl(TENANT_TOKENS) <= 86_400, "budget keys always carry a TTL"


def test_with_random_token_counts_every_admitted_token_is_accounted_for(
    redis_url: str, redis_client: redis.Redis
) -> None:
    limits = Limits(
        tenant_tokens_per_min=0.0, tenant_tokens_burst=20_000.0, key_tokens_per_min=0.0, key_tokens_burst=15_000.0
    )
    rng = random.Random(17)
    sizes = [rng.randint(1, 80) for _ in range(1200)]  # about 48,000 tokens asked for
    admitted = _two_gateways(redis_url, sizes, limits)
    taken = sum(admitted)
    tenant_left, key_left = _level(redis_client, TENANT_TOKENS), _level(redis_client, "rl:kt:k1")
    refused = [n for n, got in zip(sizes, admitted, strict=True) if not got]
    print(f"random 1-80 token jobs: {taken} of a 15,000-token key budget admitted; {len(refused)} refused")
    assert taken <= 15_000
    assert taken + key_left == 15_000 and taken + tenant_left == 20_000  # exactly, nothing lost
    assert key_left < min(refused), "every refused job really did not fit what was left"
    assert sum(int(fields[b"t"]) for _, fields in _entries(redis_client)) == taken  # the entries carry what was taken


def test_tokens_refill_per_minute_and_never_exceed_burst_plus_refill(redis_url: str, redis_client: redis.Redis) -> None:
    limits = Limits(tenant_tokens_per_min=6000.0, tenant_tokens_burst=6000.0)  # 100 tokens a second
    began = time.monotonic()
    admitted = _two_gateways(redis_url, [50] * 600, limits)
    elapsed = time.monotonic() - began
    assert 6000 <= sum(admitted) <= 6000 + 100 * elapsed
    assert 0 < redis_client.ttl(TENANT_TOKENS) <= 60 + 60  # the time to refill (and a margin)


def test_a_requests_per_minute_bucket_admits_exactly_its_requests(redis_url: str, redis_client: redis.Redis) -> None:
    # one request a minute back, a burst of 50: a few seconds of test refill a tenth of a request
    limits = Limits(
        tenant_requests_per_min=1.0, tenant_requests_burst=50.0, key_requests_per_min=100.0, key_requests_burst=100.0
    )
    admitted = _two_gateways(redis_url, [3] * 400, limits)
    assert sum(n > 0 for n in admitted) == 50
    assert 0 <= _level(redis_client, TENANT_REQUESTS) < 1
    assert 50 <= _level(redis_client, "rl:kr:k1") < 51, "refused jobs took nothing from the key's bucket"
    assert 3000 < redis_client.ttl(TENANT_REQUESTS) <= 50 * 60 + 60
    assert not redis_client.exists(TENANT_TOKENS), "no token budget was set: no token bucket"


def _entries(client: redis.Redis) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The sync lane's queued entries."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(f"q:{MODEL}:sync"))


def _read_job(entry: tuple[bytes, dict[bytes, bytes]]) -> Job:
    entry_id, fields = entry
    return Job.from_entry(f"q:{MODEL}:sync", entry_id.decode(), fields)


def test_settle_tokens_gives_back_the_unused_tokens_never_above_burst(
    redis_url: str, redis_client: redis.Redis
) -> None:
    limits = Limits(
        tenant_tokens_per_min=0.0, tenant_tokens_burst=1000.0, key_tokens_per_min=0.0, key_tokens_burst=800.0
    )

    async def enqueue() -> Admission:
        client = async_client(redis_url)
        try:
            return await _producer(client).enqueue(_env("gen1"), limits=limits, tokens=300)
        finally:
            await client.aclose()

    admission = asyncio.run(enqueue())
    assert admission.tokens == 300
    assert (admission.tenant_tokens_left, admission.key_tokens_left) == (700, 500)
    assert admission.tenant_requests_left is None and admission.key_requests_left is None  # no such budget
    (entry,) = _entries(redis_client)
    job = _read_job(entry)
    assert job.tokens == 300 and job.key_id == "k1"

    calls.settle_tokens(redis_client, job, 120)  # a generation that produced fewer than max_tokens
    assert (_level(redis_client, TENANT_TOKENS), _level(redis_client, "rl:kt:k1")) == (880, 680)
    calls.settle_tokens(redis_client, job, 500)  # used more than reserved (it cannot): nothing taken
    assert (_level(redis_client, TENANT_TOKENS), _level(redis_client, "rl:kt:k1")) == (880, 680)
    calls.settle_tokens(redis_client, job, 0)  # settled twice, by mistake: never above the burst
    assert (_level(redis_client, TENANT_TOKENS), _level(redis_client, "rl:kt:k1")) == (1000, 800)

    redis_client.delete("rl:kt:k1")  # expired: full again, and left alone
    calls.settle_tokens(redis_client, job, 0)
    assert not redis_client.exists("rl:kt:k1")
    calls.settle_tokens(redis_client, Job("j", "acme", MODEL, 1, "sync"), 0)  # reserved nothing: no call
    assert _level(redis_client, TENANT_TOKENS) == 1000


def test_a_non_text_job_touches_no_token_or_request_bucket(redis_url: str, redis_client: redis.Redis) -> None:
    limits = Limits(
        tenant_rate=0.0,
        tenant_burst=100.0,
        tenant_tokens_per_min=10.0,
        tenant_tokens_burst=10.0,
        tenant_requests_per_min=1.0,
        key_tokens_per_min=10.0,
        key_requests_per_min=1.0,
    )
    env = _env("plain")
    env.created_ms = 1
    keys, args = calls.enqueue(env, calls.Admit(100, False, 60, limits, calls.Pricing(1.0, 0.01), 60_000))
    assert len(keys) == 7 and args[21:] == env.fields()  # the call is what it was before text jobs

    async def enqueue() -> list[Admission]:
        client = async_client(redis_url)
        try:
            producer = _producer(client)
            return [await producer.enqueue(_env(f"plain{i}"), limits=limits) for i in range(3)]
        finally:
            await client.aclose()

    admissions = asyncio.run(enqueue())
    assert [a.tenant_left for a in admissions] == pytest.approx([99.9, 99.8, 99.7])  # compute units as today
    assert all(a.tokens == 0 and a.tenant_tokens_left is None and a.key_requests_left is None for a in admissions)
    assert not [k for pattern in TEXT_PREFIXES for k in redis_client.scan_iter(pattern)]
    for entry in _entries(redis_client):
        assert b"t" not in entry[1]
        assert _read_job(entry).tokens == 0


def _refusal(redis_url: str, limits: Limits, sizes: list[int]) -> tuple[list[Admission], RateLimited]:
    """Enqueue the sizes one after another until one is refused."""

    async def run() -> tuple[list[Admission], RateLimited]:
        client = async_client(redis_url)
        producer = _producer(client)
        done: list[Admission] = []
        try:
            for i, n in enumerate(sizes):
                done.append(await producer.enqueue(_env(f"r{i}"), limits=limits, tokens=n))
        except RateLimited as exc:
            return done, exc
        finally:
            await client.aclose()
        raise AssertionError("nothing was refused")

    return asyncio.run(run())


def test_a_spent_token_budget_is_refused_with_retry_after_and_ratelimit_fields(redis_url: str) -> None:
    limits = Limits(tenant_tokens_per_min=600.0, tenant_tokens_burst=600.0)  # 10 tokens a second
    done, refused = _refusal(redis_url, limits, [600, 100])
    assert len(done) == 1
    assert text_ratelimit_fields(limits, done[0]) == {
        "RateLimit-Policy": '"tenant-model-tokens";q=600;w=60',
        "RateLimit": '"tenant-model-tokens";r=0;t=60',
    }
    assert refused.retry_after == 10  # 100 tokens at 10 a second
    assert "tenant-model token budget is spent" in str(refused) and "retry in 10 s" in str(refused)
    assert refused.headers == {
        "RateLimit-Policy": '"tenant-model-tokens";q=600;w=60',
        "RateLimit": '"tenant-model-tokens";r=0;t=10',
    }


def test_a_request_larger_than_the_budget_is_told_to_lower_max_tokens(redis_url: str) -> None:
    limits = Limits(key_tokens_per_min=1000.0, key_tokens_burst=1000.0)
    done, refused = _refusal(redis_url, limits, [1001])
    assert not done and refused.retry_after == 60
    assert "more than the key token budget of 1000" in str(refused) and "lower max_tokens" in str(refused)
    assert refused.headers["RateLimit-Policy"] == '"key-tokens";q=1000;w=60'


def test_a_spent_request_budget_is_refused_with_its_own_name(redis_url: str) -> None:
    limits = Limits(
        key_requests_per_min=2.0, key_requests_burst=2.0, tenant_tokens_per_min=10_000.0, tenant_tokens_burst=10_000.0
    )
    done, refused = _refusal(redis_url, limits, [5, 5, 5])
    assert len(done) == 2
    assert text_ratelimit_fields(limits, done[1]) == {
        "RateLimit-Policy": '"tenant-model-tokens";q=10000;w=60, "key-requests";q=2;w=60',
        "RateLimit": '"tenant-model-tokens";r=9990;t=1, "key-requests";r=0;t=60',
    }
    compute = {"RateLimit-Policy": '"key";q=10;w=86400', "RateLimit": '"key";r=9;t=86400'}
    assert join_ratelimit_fields(compute, text_ratelimit_fields(limits, done[1])) == {
        "RateLimit-Policy": '"key";q=10;w=86400, "tenant-model-tokens";q=10000;w=60, "key-requests";q=2;w=60',
        "RateLimit": '"key";r=9;t=86400, "tenant-model-tokens";r=9990;t=1, "key-requests";r=0;t=60',
    }
    assert refused.retry_after == 30  # one request back every 30 s
    assert "key request budget is spent" in str(refused)
    assert refused.headers == {"RateLimit-Policy": '"key-requests";q=2;w=60', "RateLimit": '"key-requests";r=0;t=30'}


def test_limits_resolve_bursts_to_the_per_minute_amount_and_read_old_snapshots() -> None:
    tenant = TenantLimits(units_per_s=5.0, burst=10.0, tokens_per_min=9000, requests_per_min=30, requests_burst=5)
    resolved = resolve(tenant.model_dump(exclude_none=True), Budget(tokens_per_min=100, tokens_burst=400))
    limits = Limits.from_dict(resolved)
    assert (limits.tenant_tokens_per_min, limits.tenant_tokens_burst) == (9000, 9000)
    assert (limits.tenant_requests_per_min, limits.tenant_requests_burst) == (30, 5)
    assert (limits.key_tokens_per_min, limits.key_tokens_burst) == (100, 400)
    assert (limits.key_requests_per_min, limits.key_requests_burst) == (0, 0)  # unset: no bucket
    assert (limits.tenant_rate, limits.tenant_burst) == (5.0, 10.0)
    old = Limits.from_dict({"tenant_rate": 1.0, "tenant_burst": 2.0, "key_rate": 0.0, "key_burst": 0.0})
    assert old == Limits(tenant_rate=1.0, tenant_burst=2.0)  # a snapshot from before text budgets
    assert Limits.from_dict({"key_tokens_per_min": 60}).key_tokens_burst == 60
    with pytest.raises(ValueError):
        TenantLimits.model_validate({"tokens_per_min": -1})


def test_tenant_and_tier_token_limits_reach_the_snapshot_from_the_cli(tmp_path_factory: pytest.TempPathFactory) -> None:
    tiers = {"chatty": {"tokens_per_min": 500, "requests_per_min": 20, "requests_burst": 40}}
    with running(tmp_path_factory.mktemp("token-cli"), workers=0, rate_tiers=json.dumps(tiers)) as stack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
        env |= {"BASTION_CONTROL_URL": stack.control_url, "BASTION_ADMIN_KEY": stack.admin_key}
        args = ["tenants", "set", "texty", "--tokens-per-min", "1200", "--requests-per-min", "30", "--json"]
        done = subprocess.run([sys.executable, "-m", "bastion", *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["limits"] == {
            "units_per_s": 0.0,
            "max_concurrency": 0,
            "tokens_per_min": 1200,
            "requests_per_min": 30,
        }
        bad = subprocess.run(
            [sys.executable, "-m", "bastion", "tenants", "set", "texty", "--tokens-per-min", "-5"],
            capture_output=True,
            text=True,
            env=env,
        )
        assert bad.returncode != 0 and "tokens-per-min" in bad.stderr
        key = stack.admin.create_key("texty", "chat", tier="chatty")
        client = stack.redis_client()

        def published() -> Limits | None:
            raw = cast(bytes | None, client.get(SNAPSHOT_KEY))
            snap = Snapshot.parse(raw or b'{"keys": {}, "models": {}}')
            return next((k.limits for k in snap.keys.values() if k.id == key["id"]), None)

        wait_until(lambda: published() is not None, 10, "the key to be published")
        limits = published()
        client.close()
        assert limits is not None
        assert (limits.tenant_tokens_per_min, limits.tenant_tokens_burst) == (1200, 1200)
        assert (limits.tenant_requests_per_min, limits.tenant_requests_burst) == (30, 30)
        assert (limits.key_tokens_per_min, limits.key_tokens_burst) == (500, 500)
        assert (limits.key_requests_per_min, limits.key_requests_burst) == (20, 40)
