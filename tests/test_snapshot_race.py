"""Snapshot publishing under concurrent admin changes: the newest state always wins.

Every publish reads the state with a serial SQL issues and Redis keeps only the highest serial, so
a slow publisher that read before a revocation (or a kill switch) can never overwrite the snapshot
that has it: both gateways refuse the revoked key, and the stored serial is SQL's newest. Gateways
also ignore a snapshot older than the one they hold.

The slow publisher is made deterministic: the test reads a snapshot the way the control plane does
(a ``Registry`` on the control plane's own SQLite database), lets 50 concurrent admin changes with
the revocation and the kill switch go by, and only then publishes what it read.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest

from bastion import demo, snapshot
from bastion.adminclient import AdminClient
from bastion.artifacts.store import ArtifactStore
from bastion.constants import SNAPSHOT_CHANNEL, SNAPSHOT_KEY
from bastion.registry import db
from bastion.registry.service import Registry
from tests.support import Stack, running, wait_until

CHANGES = 50
ROUNDS = 4
THREADS = 16
RACE_MODEL = "race"


@pytest.fixture(scope="module")
def two_gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("race"), workers=0, gateways=2) as s:
        s.admin.register(RACE_MODEL, demo.model_bytes())
        yield s


def _status(stack: Stack, gateway: int, key: str) -> int:
    return httpx.get(
        f"{stack.gateway_urls[gateway]}/v2/models/{RACE_MODEL}", headers={"Authorization": f"Bearer {key}"}, timeout=10
    ).status_code


def _disabled_everywhere(stack: Stack) -> bool:
    key = stack.keys["acme"]
    for url in stack.gateway_urls:
        r = httpx.post(
            f"{url}/v1/models/{RACE_MODEL}/predict",
            json={"inputs": [[1.0] * 30]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        if r.status_code != 503 or "disabled" not in r.text:
            return False
    return True


def _stored_serial(stack: Stack) -> int:
    return int(orjson.loads(stack.published_snapshot())["serial"])


def _sql_serial(stack: Stack) -> int:
    db = sqlite3.connect(stack.root / "bastion.db")
    try:
        return int(db.execute("select serial from snapshot_serial").fetchone()[0])
    finally:
        db.close()


@pytest.fixture(scope="module")
def registry(two_gateways: Stack) -> Iterator[Registry]:
    """The control plane's registry, opened a second time: a publisher of our own."""
    engine = db.engine_for(two_gateways.settings.resolved_database_url)
    yield Registry(db.session_factory(engine), ArtifactStore(two_gateways.root / "artifacts"), 1 << 20)
    engine.dispose()


def test_a_revocation_and_a_kill_switch_among_50_concurrent_changes_stick_on_both_gateways(
    two_gateways: Stack, registry: Registry
) -> None:
    stack = two_gateways
    redis_client = stack.redis_client()
    clients = [AdminClient(stack.control_url, stack.admin_key) for _ in range(THREADS)]
    for i in range(7):
        stack.admin.set_tenant(f"race-{i}", None)  # the burst updates tenants that exist
    try:
        for round_ in range(ROUNDS):
            victim = stack.admin.create_key("acme", f"victim-{round_}")
            wait_until(lambda v=victim: all(_status(stack, g, v["key"]) == 200 for g in (0, 1)), 5, "the key to work")
            slow = registry.snapshot()  # a publisher reads the state (the victim is live) ...
            calls: list[Callable[[AdminClient], Any]] = []
            for i in range(CHANGES):
                if i % 2:
                    calls.append(lambda c, i=i: c.set_tenant(f"race-{i % 7}", "EU" if i % 3 else None))
                else:
                    calls.append(lambda c, i=i, r=round_: c.create_key("acme", f"race-{r}-{i}"))
            # The two changes that must stick, late in the burst, while earlier publishes are in flight.
            calls[CHANGES - 12] = lambda c, v=victim: c.revoke_key(v["id"])
            calls[CHANGES - 8] = lambda c: c.set_enabled(RACE_MODEL, False)

            def call(i: int, calls: list[Callable[[AdminClient], Any]] = calls) -> Any:
                return calls[i](clients[i % THREADS])

            with ThreadPoolExecutor(THREADS) as pool:
                list(pool.map(call, range(CHANGES)))
            snapshot.publish(redis_client, slow)  # ... and writes only now, after all of them
            try:
                wait_until(
                    lambda v=victim: all(_status(stack, g, v["key"]) == 401 for g in (0, 1)),
                    3,
                    f"round {round_}: the revoked key to be refused by both gateways",
                )
                wait_until(lambda: _disabled_everywhere(stack), 3, f"round {round_}: the kill switch on both gateways")
                assert _stored_serial(stack) == _sql_serial(stack), "Redis holds the newest serial SQL issued"
            finally:
                stack.admin.set_enabled(RACE_MODEL, True)
        time.sleep(0.2)
        assert _stored_serial(stack) == _sql_serial(stack)
    finally:
        redis_client.close()
        for c in clients:
            c.close()


def test_gateways_ignore_a_snapshot_older_than_the_one_they_hold(two_gateways: Stack, registry: Registry) -> None:
    """Even written past the publish script (say, a Redis restored from an older copy), an older
    snapshot does not replace the gateways' newer one: a key revoked since stays refused."""
    stack = two_gateways
    victim = stack.admin.create_key("acme", "restored-victim")
    wait_until(lambda: all(_status(stack, g, victim["key"]) == 200 for g in (0, 1)), 5, "the key to work")
    _, older = snapshot.encode(registry.snapshot())
    stack.admin.revoke_key(victim["id"])
    wait_until(lambda: all(_status(stack, g, victim["key"]) == 401 for g in (0, 1)), 5, "the key to be refused")
    client = stack.redis_client()
    try:
        client.set(SNAPSHOT_KEY, older)
        client.publish(SNAPSHOT_CHANNEL, "restored")
        time.sleep(1.0)  # gateways act on a notice within milliseconds
        assert all(_status(stack, g, victim["key"]) == 401 for g in (0, 1)), "a gateway went back in time"
    finally:
        client.close()
        with httpx.Client(base_url=stack.control_url, headers={"Authorization": f"Bearer {stack.admin_key}"}) as http:
            assert http.post("/admin/v1/snapshot").status_code == 200


def test_an_older_snapshot_is_never_stored_over_a_newer_one(two_gateways: Stack) -> None:
    """The publish script itself: a lower serial is refused atomically and announces nothing."""
    stack = two_gateways
    client = stack.redis_client()
    try:
        current = _stored_serial(stack)
        pubsub = client.pubsub()
        pubsub.subscribe("snap:notify")
        pubsub.get_message(timeout=1.0)  # the subscription confirmation
        stored, written = snapshot.publish(client, {"serial": current - 1, "keys": {}, "models": {}, "tenants": {}})
        assert (stored, written) == (current, False)
        assert pubsub.get_message(timeout=0.3) is None, "a refused snapshot is not announced"
        assert orjson.loads(client.get(SNAPSHOT_KEY) or b"{}")["keys"], "the newer snapshot is still there"
        pubsub.close()
    finally:
        client.close()
    # Gateways keep serving from the newest snapshot.
    assert all(_status(stack, g, stack.keys["acme"]) == 200 for g in (0, 1))


def test_the_control_plane_republishes_a_snapshot_that_redis_lost_or_went_back_on(
    two_gateways: Stack, registry: Registry
) -> None:
    """A gateway that starts after Redis was flushed, or restored from an older copy, must not
    serve from a stale snapshot: within one refresh period the control plane notices that Redis
    holds less than SQL's last serial and publishes again."""
    stack = two_gateways
    victim = stack.admin.create_key("acme", "reconcile-victim")
    _, older = snapshot.encode(registry.snapshot())  # the victim is live in this one
    stack.admin.revoke_key(victim["id"])
    client = stack.redis_client()
    period = stack.settings.snapshot_refresh_s + 5
    try:
        newest = _stored_serial(stack)
        client.set(SNAPSHOT_KEY, older)  # restored from an older copy
        wait_until(lambda: _stored_serial(stack) > newest, period, "the control plane to republish")
        published = orjson.loads(client.get(SNAPSHOT_KEY) or b"{}")
        assert victim["id"] not in {k["id"] for k in published["keys"].values()}, "the revoked key came back"
        client.delete(SNAPSHOT_KEY)  # flushed
        wait_until(lambda: client.exists(SNAPSHOT_KEY) == 1, period, "the control plane to publish again")
    finally:
        client.close()
