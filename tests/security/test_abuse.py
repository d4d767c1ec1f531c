"""Tarpit and ban: a client that keeps failing is slowed, then banned; others are unaffected."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bastion.constants import BANNED_KEY
from bastion.gateway.abuse import AbuseGuard
from bastion.redisconn import async_client, sync_client
from bastion.settings import Settings
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
    guard = AbuseGuard(None, guarded.settings.model_copy(update={"trusted_proxies": "10.1.0.0/16"}))
    scope = {"client": ("192.0.2.1", 5000), "headers": [(b"x-forwarded-for", b"1.2.3.4")]}
    assert guard.address(scope) == "192.0.2.1"
    scope = {"client": ("10.1.2.3", 5000), "headers": [(b"x-forwarded-for", b"6.6.6.6, 1.2.3.4, 10.1.9.9")]}
    assert guard.address(scope) == "1.2.3.4", "the right-most hop that is not a trusted proxy"


def test_an_ipv6_client_is_counted_by_its_64_network_and_a_mapped_ipv4_one_as_its_ipv4_address(
    tmp_path: Any,
) -> None:
    """A subscriber holds a whole /64: failures from any of its addresses count (and ban) as one
    client, whether the address is the peer's or a trusted proxy's ``X-Forwarded-For`` hop."""
    guard = AbuseGuard(None, Settings(data_dir=tmp_path, trusted_proxies="10.1.0.0/16"))
    for peer in ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe"):
        assert guard.address({"client": (peer, 5000), "headers": []}) == "2001:db8:1:2::/64"
    assert guard.address({"client": ("2001:db8:1:3::1", 5000), "headers": []}) == "2001:db8:1:3::/64"
    assert guard.address({"client": ("::ffff:192.0.2.1", 5000), "headers": []}) == "192.0.2.1"
    assert guard.address({"client": ("192.0.2.1", 5000), "headers": []}) == "192.0.2.1"
    forwarded = {"client": ("10.1.2.3", 5000), "headers": [(b"x-forwarded-for", b"2001:db8:9:9::42, 10.1.9.9")]}
    assert guard.address(forwarded) == "2001:db8:9:9::/64"


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


def test_the_ban_map_is_bounded_dropping_ended_then_soonest_ending_bans(tmp_path: Any) -> None:
    """However many bans arrive, a gateway holds at most ``abuse_max_bans``: an insert drops the
    ended ones (not only a lookup), then the ones that end soonest."""
    guard = AbuseGuard(None, Settings(data_dir=tmp_path, abuse_max_bans=16))
    for i in range(10):
        guard._ban(f"a:short-{i}", 0.05)
    time.sleep(0.1)
    guard._ban("a:long-0", 3600)
    assert guard.bans_held == 1, "ended bans are dropped on insert"
    for i in range(1, 1000):
        guard._ban(f"a:long-{i}", 60 + i)
    assert guard.bans_held == 16
    assert all(guard.banned_for(f"a:long-{i}") > 0 for i in range(985, 1000)), "the bans that end last stay"
    assert guard.banned_for("a:long-0") > 0, "the longest ban stays (15 + 1 = 16)"
    assert guard.banned_for("a:long-500") == 0
    assert len(guard._ends) <= 2 * 16 + 64, "the expiry heap is bounded too"


def _scans(client: Any) -> int:
    return int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


def test_a_starting_gateway_loads_live_bans_from_one_set_without_scanning(redis_url: str, tmp_path: Any) -> None:
    """Bans are recorded in one sorted set (TTL: the longest ban); a guard that starts loads the
    live ones (the ``abuse_max_bans`` that end last), trims the ended ones, never SCANs, and then
    follows new bans on the ban channel."""
    base = {"data_dir": tmp_path, "abuse_ban_after": 1, "abuse_max_bans": 16, "abuse_ban_max_s": 3600}
    sync = sync_client(redis_url)

    async def go() -> None:
        client = async_client(redis_url)
        striker = AbuseGuard(client, Settings(**base, abuse_ban_s=60))
        brief = AbuseGuard(client, Settings(**base, abuse_ban_s=1))
        for i in range(40):
            assert await striker.strike([f"a:198.51.100.{i}"]) == 0
        for i in range(5):
            await brief.strike([f"a:192.0.2.{i}"])
        assert await client.zcard(BANNED_KEY) == 45
        assert 3500 < await client.ttl(BANNED_KEY) <= 3600
        for i in range(1000):  # a keyspace a SCAN would have to walk
            await client.set(f"test:other:{i}", b"x", ex=600)
        await asyncio.sleep(1.2)  # the five short bans end
        scans = _scans(sync)
        starting = AbuseGuard(client, Settings(**base))
        await starting.start()
        try:
            assert _scans(sync) == scans, "the guard scanned the keyspace"
            assert starting.bans_held == 16
            assert all(starting.banned_for(f"a:198.51.100.{i}") > 50 for i in range(24, 40))
            assert await client.zcard(BANNED_KEY) == 40, "ended bans are trimmed"
            await striker.strike(["a:203.0.113.99"])
            for _ in range(100):  # the channel still tells a running gateway of a new ban
                if starting.banned_for("a:203.0.113.99"):
                    break
                await asyncio.sleep(0.05)
            assert starting.banned_for("a:203.0.113.99") > 50
            assert starting.bans_held == 16
        finally:
            await starting.stop()
            await client.aclose()

    try:
        asyncio.run(go())
    finally:
        sync.close()
