"""Lua scripts called by their SHA, loaded once per server.

redis-py's ``Script`` objects re-check ``SCRIPT EXISTS`` on every pipeline execute, one extra
round trip per batch; this calls ``EVALSHA`` directly and loads the script again only when the
server answers ``NOSCRIPT`` (after a restart). Re-running a whole pipeline is safe because
every script here is idempotent per job id.
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError


def script(name: str) -> str:
    """The source of ``lua/{name}.lua`` (each file says in its header what it guarantees)."""
    return resources.files("bastion.queue").joinpath("lua", f"{name}.lua").read_text()


class Lua:
    """A script by file name; its source is read on first use, not at import. A ``prelude``
    (another file of functions, e.g. ``outcome``) is prepended, so scripts share code."""

    def __init__(self, name: str, prelude: str | None = None) -> None:
        self.name = name
        self.prelude = prelude

    @cached_property
    def source(self) -> str:
        body = script(self.name)
        return f"{script(self.prelude)}\n{body}" if self.prelude else body

    @cached_property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    def queue(self, pipe: Any, keys: list[str], args: list[Any]) -> None:
        """Add one call to a pipeline (run it with ``run_pipeline``)."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)

    def call(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)

    async def acall(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


def run_pipeline(client: Any, pipe: Any, scripts: list[Lua], raise_errors: bool = True) -> list[Any]:
    """Execute a non-transactional pipeline of script calls, loading scripts on NOSCRIPT.

    Only the calls that got NOSCRIPT are sent again: the others already ran (a pipeline is not
    atomic, so another process may load a script between two of its calls). The first error is
    raised, or (``raise_errors`` False) each call's error is returned in its place."""
    commands = list(pipe.command_stack)
    results: list[Any] = pipe.execute(raise_on_error=False)
    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if missing:
        for lua in scripts:
            client.script_load(lua.source)
        retry = client.pipeline(transaction=False)
        for i in missing:
            args, options = commands[i]
            retry.execute_command(*args, **options)
        for i, result in zip(missing, retry.execute(raise_on_error=False), strict=True):
            results[i] = result
    if raise_errors:
        for result in results:
            if isinstance(result, Exception):
                raise result
    return results


async def arun_pipeline(client: Any, pipe: Any, scripts: list[Lua], tail: tuple[Any, ...] = ()) -> list[Any]:
    """``run_pipeline`` for redis-py's asyncio client; errors are returned per call, not raised.

    ``tail`` (a WAIT / WAITAOF) is sent after the calls, and again after any retried ones (on
    that pipeline's connection): the last item returned is the list of its answers, one per
    pipeline, which together cover every write made."""
    commands = list(pipe.command_stack)
    if tail:
        pipe.execute_command(*tail)
    results: list[Any] = await pipe.execute(raise_on_error=False)
    tails = [results.pop()] if tail else []
    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if missing:
        for lua in scripts:
            await client.script_load(lua.source)
        retry = client.pipeline(transaction=False)
        for i in missing:
            args, options = commands[i]
            retry.execute_command(*args, **options)
        if tail:
            retry.execute_command(*tail)
        again = await retry.execute(raise_on_error=False)
        if tail:
            tails.append(again.pop())
        for i, result in zip(missing, again, strict=True):
            results[i] = result
    return [*results, tails] if tail else results
