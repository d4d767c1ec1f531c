"""What one gateway process holds: its Redis client, producer, reply router and snapshot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion.gateway.replies import ReplyRouter
from bastion.gateway.snapshots import SnapshotWatcher
from bastion.queue.producer import Producer
from bastion.settings import Settings


@dataclass
class GatewayState:
    settings: Settings
    gateway_id: str
    redis: Any
    producer: Producer
    replies: ReplyRouter
    snapshots: SnapshotWatcher
    draining: bool = False
