"""Tarpit and ban: a client that keeps failing is slowed, then banned; others are unaffected."""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import Stack, running

ROW = [1.0] * 30
PREDICT = "/v1/models/breast-cancer/predict"


# The real thresholds (defaults), a shorter tarpit step to keep the run short, and 127.0.0.1 as a
# trusted proxy so that test clients can stand for different addresses.
GUARDED: dict[str, Any] = {
    "workers": 1,
    "gateways": 2,
    "trusted_proxies": "127.0.0.1",
    "abuse_tarpit_after": 10,
    "abuse_ban_after": 30,
    "abuse_tarpit_step_ms": 20,
    "abuse_ban_s": 60,
}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("abuse"), **GUARDED) as s:
        yield s


def attack(url: str, keys: list[str], rounds: Any, results: Any) -> None:
    """Per round: 50 malformed requests in a row from a new address and key; reports (status, s) each."""
    with httpx.Client(base_url=url, timeout=30) as http:
        results.put("ready")
        for i in range(len(keys)):
            rounds.get(timeout=120)
            headers = {
                "Authorization": f"Bearer {keys[i]}",
                "X-Forwarded-For": f"203.0.113.{60 + i}",
                "Content-Type": "application/json",
            }
            found = []
            for _ in range(50):
                started = time.perf_counter()
                r = http.post(PREDICT, content=b"{not json", headers=headers)
                found.append((r.status_code, time.perf_counter() - started))
            results.put(found)


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[int(len(ordered) * 0.99) - 1]


def _victim_latencies(http: httpx.Client, n: int) -> list[float]:
    took = []
    for _ in range(n):
        started = time.perf_counter()
        assert http.post(PREDICT, json={"inputs": [ROW]}).status_code == 200
        took.append(time.perf_counter() - started)
    return took


def run_attack_rounds(stack: Stack, rounds_n: int) -> tuple[list[list[tuple[int, float]]], list[float], list[float]]:
    """Rounds of attack (each: a new key and address, 50 malformed requests) alternating with quiet
    blocks, while another tenant calls predict on the other gateway over one connection.

    Returns the attacker's (status, seconds) per round, and the other tenant's latencies in the
    quiet blocks (baseline) and during the attacks. The attacker is its own process, started and
    past its interpreter start-up before anything is measured, so it competes with the victim for
    the server, not for this process's GIL; alternating spreads machine noise over both sides.
    """
    keys = [stack.admin.create_key("acme", f"attacker-{i}-{time.time_ns()}")["key"] for i in range(rounds_n)]
    time.sleep(0.5)
    victim = stack.client("globex", gateway=1, headers={"X-Forwarded-For": "10.0.0.7"})
    _victim_latencies(victim, 200)  # warm up
    context = multiprocessing.get_context("spawn")
    rounds, answers = context.Queue(), context.Queue()
    attacker = context.Process(target=attack, args=(stack.gateway_urls[0], keys, rounds, answers))
    attacker.start()
    assert answers.get(timeout=60) == "ready"
    baseline = _victim_latencies(victim, 500)
    during: list[float] = []
    all_results = []
    for _ in range(rounds_n):
        rounds.put("go")
        results = None
        while results is None:  # the victim keeps calling for as long as the attack lasts
            during += _victim_latencies(victim, 25)
            with contextlib.suppress(queue.Empty):
                results = answers.get_nowait()
        all_results.append(results)
        baseline += _victim_latencies(victim, 500)
    attacker.join(10)
    victim.close()
    return all_results, baseline, during


def test_a_client_sending_invalid_requests_is_slowed_then_banned(guarded: Stack) -> None:
    stack = guarded
    all_results, baseline, during = run_attack_rounds(stack, 2)
    for results in all_results:
        statuses = [s for s, _ in results]
        assert statuses[:29] == [400] * 29 and set(statuses[30:]) == {429}, statuses
        assert results[25][1] > 0.2 > max(t for _, t in results[:9]), "answers slow down past the tarpit line"
    results = all_results[0]
    print(
        f"attacker: 30 x 400 then banned; delays of failures 1-10 up to {max(t for _, t in results[:10]) * 1000:.0f}"
        f" ms, 11-29 up to {max(t for _, t in results[10:29]) * 1000:.0f} ms; banned answers in "
        f"{max(t for _, t in results[30:]) * 1000:.1f} ms"
    )
    banned = httpx.post(
        f"{stack.gateway_urls[1]}{PREDICT}", json={"inputs": [ROW]}, headers={"X-Forwarded-For": "203.0.113.60"}
    )
    assert banned.status_code == 429 and int(banned.headers["retry-after"]) > 30, "every gateway obeys the ban"
    assert "blocked" in banned.json()["detail"]
    # The other tenant was served throughout (every call above asserted a 200). Its p99 is printed
    # here and bounded loosely, to catch a tarpit that blocks the event loop; the 20 % figure is
    # measured over many more rounds by benchmarks/bench_abuse.py (timings belong in benchmarks).
    base_p99, during_p99 = _p99(baseline), _p99(during)
    print(
        f"other tenant p99: baseline {base_p99 * 1000:.2f} ms ({len(baseline)} calls), during the attacks "
        f"{during_p99 * 1000:.2f} ms ({len(during)} calls)"
    )
    assert during_p99 <= base_p99 * 2


def test_a_banned_key_is_refused_from_any_address(guarded: Stack) -> None:
    key = guarded.admin.create_key("acme", "banned-key")["key"]
    time.sleep(0.5)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with httpx.Client(base_url=guarded.gateway_urls[0], headers=headers) as http:
        for i in range(30):  # a new address each time: only the key's count can reach the ban
            http.post(PREDICT, content=b"{", headers={"X-Forwarded-For": f"192.0.2.{i}"})
        r = http.post(PREDICT, json={"inputs": [ROW]}, headers={"X-Forwarded-For": "192.0.2.200"})
    assert r.status_code == 429 and "this key is blocked" in r.json()["detail"]


def test_forwarded_for_is_ignored_from_an_untrusted_peer(guarded: Stack) -> None:
    from bastion.gateway.abuse import AbuseGuard

    guard = AbuseGuard(None, guarded.settings.model_copy(update={"trusted_proxies": "10.1.0.0/16"}))
    scope = {"client": ("192.0.2.1", 5000), "headers": [(b"x-forwarded-for", b"1.2.3.4")]}
    assert guard.address(scope) == "192.0.2.1"
    scope = {"client": ("10.1.2.3", 5000), "headers": [(b"x-forwarded-for", b"6.6.6.6, 1.2.3.4, 10.1.9.9")]}
    assert guard.address(scope) == "1.2.3.4", "the right-most hop that is not a trusted proxy"


def test_a_tenant_at_its_budget_is_refused_but_never_banned(guarded: Stack) -> None:
    """A 429 for a spent budget is a paying customer at its limit, not abuse: 60 of them in a
    row (twice the ban line) neither ban the key nor the (possibly shared) address."""
    guarded.admin.set_tenant("thrifty", None, limits={"units_per_s": 0.001, "burst": 0.05})
    key = guarded.admin.create_key("thrifty", "at-its-limit")["key"]
    time.sleep(0.5)
    shared = {"X-Forwarded-For": "198.51.100.7"}
    with httpx.Client(base_url=guarded.gateway_urls[0], headers={"Authorization": f"Bearer {key}"}) as http:
        answers = [http.post(PREDICT, json={"inputs": [ROW] * 64}, headers=shared) for _ in range(60)]
    refused = [r for r in answers if r.status_code == 429]
    assert len(refused) >= 55, [r.status_code for r in answers]
    assert all("budget" in r.json()["detail"] for r in refused), "refused by its budget, never by a ban"
    with guarded.client("acme", gateway=1, headers=shared) as neighbour:
        assert neighbour.post(PREDICT, json={"inputs": [ROW]}).status_code == 200, "the shared address was banned"
