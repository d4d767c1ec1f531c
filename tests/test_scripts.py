"""Script pipelines on a real Redis: a NOSCRIPT retry re-sends only the calls that did not run."""

from __future__ import annotations

import asyncio

import redis

from bastion.queue.scripts import Lua, arun_pipeline, run_pipeline
from bastion.redisconn import async_client


def _lua(source: str) -> Lua:
    lua = Lua("inline")
    lua.__dict__["source"] = source  # a script of the test's own, not a file
    return lua


def test_a_partly_failed_pipeline_retries_only_the_noscript_calls(redis_client: redis.Redis) -> None:
    loaded = _lua("return redis.call('INCR', KEYS[1])")
    missing = _lua("return redis.call('INCRBY', KEYS[1], 10)")
    redis_client.script_load(loaded.source)  # another process loaded one script, not the other
    pipe = redis_client.pipeline(transaction=False)
    loaded.queue(pipe, ["a"], [])
    missing.queue(pipe, ["b"], [])
    loaded.queue(pipe, ["a"], [])
    assert run_pipeline(redis_client, pipe, [loaded, missing]) == [1, 10, 2]
    assert redis_client.get("a") == b"2", "a call that had run was sent again"


def test_the_async_pipeline_does_the_same_and_answers_its_tail_last(redis_url: str) -> None:
    loaded = _lua("return redis.call('INCR', KEYS[1])")
    missing = _lua("return redis.call('INCRBY', KEYS[1], 10)")

    async def go() -> list[object]:
        client = async_client(redis_url)
        try:
            await client.script_load(loaded.source)
            pipe = client.pipeline(transaction=False)
            loaded.queue(pipe, ["a"], [])
            missing.queue(pipe, ["b"], [])
            found = await arun_pipeline(client, pipe, [loaded, missing], tail=("WAIT", 0, 10))
            found.append(await client.get("a"))
            return found
        finally:
            await client.aclose()

    # one WAIT answer per pipeline sent (the first and the retry), each on its own connection
    assert asyncio.run(go()) == [1, 10, [0, 0], b"1"]
