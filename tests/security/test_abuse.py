"""Tarpit and ban: a client that keeps failing is slowed, then banned; others are unaffected."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support import Stack

ROW = [1.0] * 30
PREDICT = "/v1/models/breast-cancer/predict"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(
        tmp_path_factory.mktemp("abuse"),
        workers=1,
        gateways=2,
        trusted_proxies="127.0.0.1",
        abuse_tarpit_after=10,
        abuse_ban_after=30,
        abuse_tarpit_step_ms=20,
        abuse_ban_s=60,
    )
    try:
        s.start()
        yield s
    finally:
        s.stop()


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[int(len(ordered) * 0.99) - 1]


def _victim_latencies(stack: Stack, n: int) -> list[float]:
    took = []
    headers = {"X-Forwarded-For": "10.0.0.7"}
    with stack.client("globex", gateway=1, headers=headers) as http:
        for _ in range(n):
            started = time.perf_counter()
            assert http.post(PREDICT, json={"inputs": [ROW]}).status_code == 200
            took.append(time.perf_counter() - started)
    return took


def test_a_client_sending_invalid_requests_is_slowed_then_banned(guarded: Stack) -> None:
    stack = guarded
    _victim_latencies(stack, 200)  # warm up
    before = _victim_latencies(stack, 750)

    results: list[tuple[int, float]] = []
    attacker_headers = {"X-Forwarded-For": "203.0.113.66", "Content-Type": "application/json"}

    def attack() -> None:
        with stack.client("acme", gateway=0, headers=attacker_headers) as http:
            for _ in range(50):
                started = time.perf_counter()
                r = http.post(PREDICT, content=b"{not json")
                results.append((r.status_code, time.perf_counter() - started))

    attacker = threading.Thread(target=attack)
    attacker.start()
    during = _victim_latencies(stack, 1500)
    attacker.join(60)
    # The baseline brackets the attack (half before, half after), so slow drift on a shared machine
    # does not count for or against it.
    baseline = before + _victim_latencies(stack, 750)

    statuses = [s for s, _ in results]
    first_ban = statuses.index(429)
    print(
        f"attacker: {statuses.count(400)} x 400, then banned at request {first_ban + 1}; "
        f"delays 1-10 {max(t for _, t in results[:10]) * 1000:.0f} ms max, "
        f"11-29 up to {max(t for _, t in results[10:29]) * 1000:.0f} ms"
    )
    assert statuses[:29] == [400] * 29 and set(statuses[30:]) == {429}
    assert results[25][1] > 0.2 > max(t for _, t in results[:9]), "answers slow down past the tarpit line"
    banned = httpx.post(
        f"{stack.gateway_urls[1]}{PREDICT}", json={"inputs": [ROW]}, headers={"X-Forwarded-For": "203.0.113.66"}
    )
    assert banned.status_code == 429 and int(banned.headers["retry-after"]) > 30, "every gateway obeys the ban"
    assert "blocked" in banned.json()["detail"]
    # The attacker's key is banned too, from any address; other tenants are served as before.
    with stack.client("acme", gateway=1, headers={"X-Forwarded-For": "198.51.100.9"}) as http:
        assert http.post(PREDICT, json={"inputs": [ROW]}).status_code == 429
    base_p99, during_p99 = _p99(baseline), _p99(during)
    print(f"other tenant p99: baseline {base_p99 * 1000:.2f} ms, during the attack {during_p99 * 1000:.2f} ms")
    assert during_p99 <= base_p99 * 1.2


def test_forwarded_for_is_ignored_from_an_untrusted_peer(guarded: Stack) -> None:
    from bastion.gateway.abuse import AbuseGuard

    guard = AbuseGuard(None, guarded.settings.model_copy(update={"trusted_proxies": "10.1.0.0/16"}))
    scope = {"client": ("192.0.2.1", 5000), "headers": [(b"x-forwarded-for", b"1.2.3.4")]}
    assert guard.address(scope) == "192.0.2.1"
    scope = {"client": ("10.1.2.3", 5000), "headers": [(b"x-forwarded-for", b"6.6.6.6, 1.2.3.4, 10.1.9.9")]}
    assert guard.address(scope) == "1.2.3.4", "the right-most hop that is not a trusted proxy"
