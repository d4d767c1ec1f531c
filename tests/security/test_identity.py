"""API keys at the edge: revocation, rotation with an overlap window and expiry, on two gateways."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.support import Stack, running, wait_until

ROW = [1.0] * 30


@pytest.fixture(scope="module")
def two_gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("identity"), workers=1, gateways=2) as s:
        yield s


def _status(url: str, key: str) -> int:
    r = httpx.post(
        f"{url}/v1/models/breast-cancer/predict", json={"inputs": [ROW]}, headers={"Authorization": f"Bearer {key}"}
    )
    return r.status_code


def _on_both(stack: Stack, key: str, status: int) -> bool:
    return all(_status(url, key) == status for url in stack.gateway_urls)


def test_a_revoked_key_is_refused_by_both_gateways_within_a_second(two_gateways: Stack) -> None:
    stack = two_gateways
    created = stack.admin.create_key("acme", "to-revoke")
    wait_until(lambda: _on_both(stack, created["key"], 200), 5, "the key to work on both gateways")
    stack.admin.revoke_key(created["id"])
    started = time.monotonic()
    wait_until(lambda: _on_both(stack, created["key"], 401), 5, "both gateways to refuse the key")
    took = time.monotonic() - started
    print(f"revocation obeyed by both gateways after {took * 1000:.0f} ms")
    assert took < 1.0


def test_rotation_keeps_the_old_secret_for_the_overlap_then_only_the_new_one(two_gateways: Stack) -> None:
    stack = two_gateways
    old = stack.admin.create_key("acme", "to-rotate", tier="standard")
    wait_until(lambda: _on_both(stack, old["key"], 200), 5, "the key to work")
    rotated = stack.admin.rotate_key(old["id"], overlap_s=2)
    assert rotated["key"]["tenant"] == "acme" and rotated["key"]["scopes"] == old["scopes"]
    assert rotated["key"]["tier"] == "standard" and rotated["rotated"]["expires_at"] is not None
    wait_until(lambda: _on_both(stack, rotated["secret"], 200), 5, "the new secret to work")
    assert _on_both(stack, old["key"], 200), "the old secret works during the overlap"
    wait_until(lambda: _on_both(stack, old["key"], 401), 5, "the old secret to expire")
    assert _on_both(stack, rotated["secret"], 200)


def test_an_expired_key_is_refused_without_any_publish(two_gateways: Stack) -> None:
    stack = two_gateways
    soon = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
    with httpx.Client(base_url=stack.control_url, headers={"Authorization": f"Bearer {stack.admin_key}"}) as http:
        created = http.post("/admin/v1/keys", json={"tenant": "acme", "expires_at": soon}).json()
    wait_until(lambda: _on_both(stack, created["key"], 200), 5, "the key to work")
    wait_until(lambda: _on_both(stack, created["key"], 401), 5, "the key to expire")
