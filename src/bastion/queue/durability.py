"""When a queued job counts as durable: the confirmation the gateway waits for before its 202.

``everysec`` and ``always`` are the Redis server's AOF settings: Redis writes every command to
its append-only file before it replies, so a killed Redis process loses nothing it acknowledged;
``everysec`` fsyncs once a second (a machine crash can lose up to a second), ``always`` on every
write. ``waitaof`` and ``replicas`` add a confirmation after each enqueue pipeline: ``WAITAOF``
(the local AOF fsynced; Redis 7.2 or later) or ``WAIT`` (that many replicas hold the writes).
Without it, the answer is 503: the job may still run, and a retry with the same
Idempotency-Key returns it instead of queueing another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion import logs
from bastion.errors import Unavailable

log = logs.get("bastion.queue")


@dataclass(frozen=True, slots=True)
class Durability:
    mode: str = "everysec"
    replicas: int = 1
    timeout_ms: int = 1000

    @property
    def command(self) -> tuple[Any, ...]:
        """The confirmation to pipeline after the enqueues (empty: none)."""
        if self.mode == "waitaof":
            return ("WAITAOF", 1, 0, self.timeout_ms)
        if self.mode == "replicas":
            return ("WAIT", self.replicas, self.timeout_ms)
        return ()

    def confirmed(self, reply: Any) -> bool:
        if isinstance(reply, Exception):
            return False
        if self.mode == "waitaof":
            return int(reply[0]) >= 1
        return int(reply) >= self.replicas

    def refusal(self) -> Unavailable:
        what = "fsynced to the append-only file" if self.mode == "waitaof" else f"held by {self.replicas} replica(s)"
        return Unavailable(
            f"the job was queued but not confirmed {what} within {self.timeout_ms} ms; retry with the same "
            "Idempotency-Key to get this job instead of a new one",
            retry_after=1,
        )

    async def check(self, redis: Any) -> None:
        """Refuse to start with a mode the server cannot give; warn when its AOF is off."""
        if self.mode == "waitaof":
            version = str((await redis.info("server")).get("redis_version", "0"))
            if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (7, 2):
                raise Unavailable(f"durability 'waitaof' needs Redis 7.2 or later (WAITAOF); this one is {version}")
        try:
            config = await redis.config_get("append*")
        except Exception:  # managed Redis often refuses CONFIG: nothing to check then
            return
        if self.mode == "waitaof" and config.get("appendonly") != "yes":
            raise Unavailable("durability 'waitaof' needs the Redis append-only file on (appendonly yes)")
        if config.get("appendonly") != "yes":
            log.warning("redis_aof_off", durability=self.mode, hint="a Redis restart loses queued jobs")
        elif self.mode == "always" and config.get("appendfsync") != "always":
            log.warning("redis_fsync_not_always", appendfsync=config.get("appendfsync"))
