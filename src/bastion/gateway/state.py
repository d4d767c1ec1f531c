"""What one gateway process holds: its Redis client, producer, reply router, snapshot, job watch
and the text models' tokenizers and guards."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bastion.gateway.abuse import AbuseGuard
from bastion.gateway.breakers import Breakers, Policy
from bastion.gateway.evidence import Backlog
from bastion.gateway.jobwatch import JobWatch
from bastion.gateway.replies import ReplyRouter
from bastion.gateway.snapshots import SnapshotWatcher
from bastion.gateway.textmodels import TextModels
from bastion.queue.producer import Producer
from bastion.security.oidc import JwksCache
from bastion.settings import Settings
from bastion.text.tokenizer import MAX_TOKENIZER_BYTES

if TYPE_CHECKING:  # it imports the pipeline, which imports this
    from bastion.gateway.textstream import ChunkRouter


@dataclass
class GatewayState:
    settings: Settings
    gateway_id: str
    redis: Any
    producer: Producer
    replies: ReplyRouter
    snapshots: SnapshotWatcher
    jobwatch: JobWatch
    jwks: JwksCache | None = None  # set when an OIDC issuer is configured
    abuse: AbuseGuard | None = None
    breakers: Breakers = field(default_factory=lambda: Breakers(Policy()))
    backlog: Backlog | None = None  # the decision log's backlog (None: not watched)
    text: TextModels = field(default_factory=lambda: TextModels(MAX_TOKENIZER_BYTES))  # tokenizers, configs, guards
    chunks: ChunkRouter | None = None  # follows the generations this gateway streams (None: none can stream)
    draining: bool = False
    background: set[asyncio.Task[None]] = field(default_factory=set)  # shadow copies in flight

    def spawn(self, work: Any) -> None:
        """Run ``work`` (a coroutine) without making the caller wait; keep it referenced until done."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
