"""The chaos suite's own bookkeeping: a job the client was answered 202 for and that Redis does not
show finished is counted lost, after a bounded wait (the figures would be meaningless otherwise)."""

from __future__ import annotations

import time
from typing import cast

import redis

from tests.chaos import scenarios
from tests.support import Stack


def test_an_accepted_job_missing_from_redis_or_unfinished_counts_as_lost() -> None:
    """lost counts the client's 202 ids whose final state is absent or not terminal; failed counts
    the ones that ended otherwise than in success."""
    accepted = ["a", "b", "c", "d", "e"]
    final = {"a": "succeeded", "b": "succeeded", "c": "running", "e": "dead_lettered"}  # d: hash gone
    assert scenarios.account(accepted, final) == {"lost": 2, "succeeded": 2, "failed": 1}
    assert scenarios.account(["a", "b"], {"a": "succeeded", "b": "succeeded"})["lost"] == 0
    assert scenarios.account(["a", "missing"], {"a": "succeeded"})["lost"] == 1


class _RedisOnly:
    """The one part of a Stack that settle and final_statuses use: a client of a real Redis."""

    def __init__(self, url: str) -> None:
        self.url = url

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def test_settling_gives_up_after_its_timeout_and_the_stragglers_are_counted_lost(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Against a real Redis: one job done, one stuck running, one never written. settle returns
    False after its timeout instead of raising or hanging, and two of the three are lost."""
    redis_client.hset("job:done", "status", "succeeded")
    redis_client.hset("job:stuck", "status", "running")
    stack = cast(Stack, _RedisOnly(redis_url))
    started = time.monotonic()
    assert scenarios.settle(stack, ["done", "stuck", "gone"], timeout_s=0.5, interval_s=0.05) is False
    assert time.monotonic() - started < 2
    final = scenarios.final_statuses(stack, ["done", "stuck", "gone"])
    assert final == {"done": "succeeded", "stuck": "running"}
    assert scenarios.account(["done", "stuck", "gone"], final)["lost"] == 2
    redis_client.hset("job:stuck", "status", "failed")
    assert scenarios.settle(stack, ["done", "stuck"], timeout_s=5) is True
