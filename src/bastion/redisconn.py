"""Redis clients built one way for every process.

``CLIENT SETINFO`` is turned off: Redis 6.2 (the embedded one) does not know it and would fail
two commands on every new connection. redis-py ≥ 7 spells that ``driver_info=None``; older
releases ``lib_name=None, lib_version=None``. A ``rediss://`` URL is TLS with the server verified
against ``tls.ca`` (host name checked) and ``tls``'s certificate presented as the client's.
"""

from __future__ import annotations

import inspect
from functools import cache
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.connection import AbstractConnection

from bastion.security.tls import TLSFiles


@cache
def _no_setinfo() -> dict[str, Any]:
    if "driver_info" in inspect.signature(AbstractConnection.__init__).parameters:
        return {"driver_info": None}
    return {"lib_name": None, "lib_version": None}


def sync_client(url: str, tls: TLSFiles | None = None, **options: Any) -> redis.Redis:
    return redis.Redis.from_url(url, **_no_setinfo(), **(tls or TLSFiles()).redis_options(url), **options)


def async_client(
    url: str, max_connections: int | None = None, tls: TLSFiles | None = None, **options: Any
) -> aioredis.Redis:
    """With ``max_connections``, a bounded pool: a burst waits for a free connection (up to the
    socket timeout) instead of opening thousands of new ones at once."""
    options = {**(tls or TLSFiles()).redis_options(url), **options}
    if max_connections is None:
        return aioredis.Redis.from_url(url, **_no_setinfo(), **options)
    timeout = options.get("socket_timeout") or 5
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=timeout, **_no_setinfo(), **options
    )
    return aioredis.Redis(connection_pool=pool)
