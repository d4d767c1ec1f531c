"""Abuse handling at the gateway: tarpit, then ban, clients that keep failing.

Failures (bad credentials, refused scopes, unknown objects, invalid payloads) are counted per
client address and, once a key is authenticated, per key, in Redis (``strike.lua``), so the
counts hold across gateways. A 429 is not a failure: a spent budget is not abuse. Past a
threshold the failing responses are held back for a growing delay (an ``asyncio.sleep``: the
connection costs a coroutine, not a thread); past a second one the client is banned for an
escalating period: every gateway refuses it at once (a 429 with ``Retry-After``, before reading
its body), told through the ban channel.

Each gateway keeps the bans it knows in memory, at most ``abuse_max_bans`` of them: an insert
first drops ended bans, and past the bound the ban that ends soonest goes (it loses the least ban
time). At start and after every reconnect it loads the live bans from one sorted set
(``BANNED_KEY``: client id -> ban end, written and trimmed by ``strike.lua``), the
``abuse_max_bans`` that end last, in one read: never a scan of the keyspace.

A client address is the peer's, or, when the peer is a configured trusted proxy, the right-most
address in ``X-Forwarded-For`` that is not itself a trusted proxy; an IPv6 address counts as its /64
network (``httpserver.client_network``), as the edge's connection cap counts it. A key id is counted only after
the key verified, so nobody can get someone else's key banned by sending its id with a bad secret.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion import logs, metrics, problems
from bastion.constants import BAN_CHANNEL, BANNED_KEY, abuse_keys
from bastion.gateway.channel import ChannelWatcher
from bastion.httpserver import client_network
from bastion.queue.scripts import Lua
from bastion.settings import Settings

log = logs.get("bastion.gateway.abuse")

# A 429 is never a strike: a spent budget or a full in-flight cap is a paying customer at its
# limit, not abuse (and a banned client's 429 is answered before anything is counted).
FAILURES = frozenset({400, 401, 403, 404, 413, 415, 422})
_STRIKE = Lua("strike")
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AbuseGuard:
    def __init__(self, redis: Any, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.trusted: list[_Network] = [
            ipaddress.ip_network(p.strip(), strict=False) for p in settings.trusted_proxies.split(",") if p.strip()
        ]
        self._bans: dict[str, float] = {}  # client id -> ban end (epoch seconds)
        self._ends: list[tuple[float, str]] = []  # heap of (ban end, client id); stale entries skipped
        self._channel = ChannelWatcher(redis, BAN_CHANNEL, on_connect=self._load, on_tick=self._on_ban, idle_s=30.0)

    # bans ----------------------------------------------------------------------------------
    def banned_for(self, client: str) -> float:
        """Seconds left of ``client``'s ban, or 0."""
        until = self._bans.get(client)
        if until is None:
            return 0.0
        left = until - time.time()
        if left <= 0:
            del self._bans[client]
            return 0.0
        return left

    @property
    def bans_held(self) -> int:
        """How many bans this gateway keeps in memory (at most ``abuse_max_bans``)."""
        return len(self._bans)

    def _ban(self, client: str, seconds: float) -> None:
        """Remember ``client``'s ban for ``seconds`` (a known ban is only ever lengthened), keeping
        at most ``abuse_max_bans``: ended bans go first, then those that end soonest."""
        now = time.time()
        until = now + seconds
        if until <= self._bans.get(client, 0.0):
            return
        self._bans[client] = until
        heapq.heappush(self._ends, (until, client))
        while self._ends and (self._ends[0][0] <= now or len(self._bans) > self.settings.abuse_max_bans):
            end, gone = heapq.heappop(self._ends)
            if self._bans.get(gone) == end:  # else a stale entry: the ban was lengthened or dropped
                del self._bans[gone]
        if len(self._ends) > 2 * len(self._bans) + 64:  # lengthened bans leave stale entries behind
            self._ends = [(end, c) for c, end in self._bans.items()]
            heapq.heapify(self._ends)

    async def start(self) -> None:
        await self._channel.start()

    async def stop(self) -> None:
        await self._channel.stop()

    async def _load(self) -> None:
        """Bans set while this gateway was not listening (at start, or after a reconnect): the
        ``abuse_max_bans`` live ones that end last, from ``BANNED_KEY`` (ended ones trimmed first)."""
        seconds, micros = await self.redis.time()
        now = seconds + micros / 1_000_000  # ban ends are on Redis's clock
        await self.redis.zremrangebyscore(BANNED_KEY, "-inf", now)
        live = await self.redis.zrevrangebyscore(
            BANNED_KEY, "+inf", now, start=0, num=self.settings.abuse_max_bans, withscores=True
        )
        for raw, end in reversed(live):  # soonest first: the bound keeps those that end last
            self._ban(raw.decode(), end - now)

    async def _on_ban(self, message: dict[str, Any] | None) -> None:
        if message and message.get("type") == "message":
            client, _, seconds = message["data"].decode().rpartition("|")
            self._ban(client, float(seconds))

    # strikes -------------------------------------------------------------------------------
    async def strike(self, clients: list[str]) -> float:
        """Count a failure for each client; returns the delay (seconds) to hold the answer back."""
        s = self.settings
        keys = [*(k for c in clients for k in abuse_keys(c)), BANNED_KEY]
        args: list[Any] = [s.abuse_window_s, s.abuse_tarpit_after, s.abuse_ban_after, s.abuse_tarpit_step_ms]
        args += [s.abuse_tarpit_max_ms, s.abuse_ban_s, s.abuse_ban_max_s, BAN_CHANNEL, *clients]
        try:
            delay_ms, banned = await _STRIKE.acall(self.redis, keys, args)
        except Exception:  # Redis away: no strike counted, the answer is not delayed
            return 0.0
        if banned:
            for client in clients:
                self._ban(client, float(banned))
            metrics.ERRORS.labels("gateway", "client_banned").inc()
            log.warning("client_banned", clients=clients, seconds=int(banned))
        if delay_ms:
            metrics.ERRORS.labels("gateway", "tarpitted").inc()
        return float(delay_ms) / 1000

    def address(self, scope: Scope) -> str:
        """The client id of the request's address (``a:<this>``): an IPv4 address, or an IPv6 /64
        network (one subscriber holds a whole /64), an IPv4-mapped IPv6 address as its IPv4 one."""
        peer = str((scope.get("client") or ("unknown", 0))[0])
        if not self.trusted or not self._is_trusted(peer):
            return client_network(peer)
        for name, value in scope["headers"]:
            if name == b"x-forwarded-for":
                hops = [h.strip() for h in value.decode("latin-1").split(",") if h.strip()]
                for hop in reversed(hops):
                    if not self._is_trusted(hop):
                        return client_network(hop[:64])
        return client_network(peer)

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)


class AbuseMiddleware:
    """Refuses banned addresses up front; counts failures and holds failing answers back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(scope.get("app"), "state", None)
        guard: AbuseGuard | None = getattr(getattr(state, "gateway", None), "abuse", None)
        if scope["type"] != "http" or guard is None or not scope["path"].startswith(("/v1/", "/v2/")):
            await self.app(scope, receive, send)
            return
        address = "a:" + guard.address(scope)
        left = guard.banned_for(address)
        if left:
            response = problems.respond(
                scope["path"],
                429,
                "Too many requests",
                f"this client is blocked for {int(left) + 1} s after repeated failed requests",
                {"Retry-After": str(int(left) + 1)},
            )
            await response(scope, receive, send)
            return

        async def counted_send(message: Message) -> None:
            if (
                message["type"] == "http.response.start"
                and message["status"] in FAILURES
                and not scope.get("state", {}).get("no_strike")  # a refusal of content (bastion.gateway.openai)
            ):
                clients = [address]
                key_id = scope.get("state", {}).get("key_id")
                if key_id:
                    clients.append("k:" + key_id)
                delay = await guard.strike(clients)
                if delay:
                    await asyncio.sleep(delay)
            await send(message)

        await self.app(scope, receive, counted_send)
