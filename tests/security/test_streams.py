"""Job event streams (SSE) are bounded per key and per tenant, cost Redis nothing while idle, and end
when their key stops authenticating (issue 11, finding 5)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from redis.connection import parse_url

from bastion import demo
from tests.support import Stack, running, wait_until

ROW = [1.0] * 30
JOBS = f"/v1/models/{demo.MODEL_NAME}/jobs"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("streams"), max_streams_per_key=3) as s:
        yield s


@contextlib.contextmanager
def frozen_worker(stack: Stack) -> Iterator[None]:
    """The worker is stopped: jobs stay queued until the block ends."""
    stack.signal("worker-0", signal.SIGSTOP)
    try:
        yield
    finally:
        stack.signal("worker-0", signal.SIGCONT)


def _key(stack: Stack, tenant: str, **limits: Any) -> tuple[str, str]:
    """A new key of ``tenant`` (its limits set first), once the gateway knows it: (secret, id)."""
    if limits:
        stack.admin.set_tenant(tenant, None, limits=limits)
    made = stack.admin.create_key(tenant, "streams")
    auth = {"Authorization": f"Bearer {made['key']}"}
    wait_until(lambda: httpx.get(f"{stack.gateway}/v1/jobs/none", headers=auth).status_code == 404, 10, "the key")
    return made["key"], made["id"]


def _job(stack: Stack, key: str) -> str:
    r = httpx.post(f"{stack.gateway}{JOBS}", json={"inputs": [ROW]}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def _open(url: str, key: str, job_id: str) -> tuple[socket.socket, int]:
    """A raw stream connection, its response head read: (socket, status)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=10)
    request = f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n"
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, int(head.split(b" ", 2)[1])


def _still_open(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        return sock.recv(4096, socket.MSG_PEEK) != b""
    except TimeoutError:
        return True  # nothing to read, and not closed
    except OSError:
        return False
    finally:
        sock.settimeout(10)


def _zcard(stack: Stack, name: str) -> int:
    client = stack.redis_client()
    try:
        return int(client.zcard(name))
    finally:
        client.close()


class Listener(threading.Thread):
    """Reads one stream in the background and records its event names (and when each came)."""

    def __init__(self, url: str, key: str, job_id: str) -> None:
        super().__init__(daemon=True)
        self.url, self.key, self.job_id = url, key, job_id
        self.events: list[tuple[str, float]] = []
        self.data: list[str] = []
        self.status = 0

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        with (
            httpx.Client(base_url=self.url, headers=headers, timeout=60) as http,
            http.stream("GET", f"/v1/jobs/{self.job_id}/events") as r,
        ):
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("event: "):
                    self.events.append((line.removeprefix("event: "), time.monotonic()))
                elif line.startswith("data: "):
                    self.data.append(line)

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def saw(self, name: str) -> bool:
        return name in self.names()


def test_a_keys_fourth_stream_is_refused_naming_the_per_key_cap_and_a_disconnect_frees_a_slot(stack: Stack) -> None:
    key, key_id = _key(stack, "acme")
    with frozen_worker(stack), contextlib.ExitStack() as sockets:
        job = _job(stack, key)
        opened = [_open(stack.gateway, key, job) for _ in range(3)]
        for sock, _ in opened:
            sockets.callback(sock.close)
        assert [status for _, status in opened] == [200, 200, 200]
        fourth = httpx.get(f"{stack.gateway}/v1/jobs/{job}/events", headers={"Authorization": f"Bearer {key}"})
        assert fourth.status_code == 429, fourth.text
        assert fourth.headers["content-type"] == "application/problem+json"
        assert "max_streams_per_key" in fourth.json()["detail"] and "3 job event streams" in fourth.json()["detail"]
        assert all(_still_open(sock) for sock, _ in opened), "the first three streams stay open"
        assert _zcard(stack, f"streams:{key_id}") == 3

        opened.pop()[0].close()  # a client that goes away gives its slot back
        wait_until(lambda: _zcard(stack, f"streams:{key_id}") == 2, 10, "the disconnected stream's slot")
        again, status = _open(stack.gateway, key, job)
        sockets.callback(again.close)
        assert status == 200
        for sock, _ in [*opened, (again, 200)]:
            sock.close()
        wait_until(lambda: _zcard(stack, f"streams:{key_id}") == 0, 10, "every slot to be given back")


def test_streams_count_against_the_tenants_in_flight_cap(stack: Stack) -> None:
    """A queued job holds one slot of a cap of 2 and a stream on it the other: a second stream is
    refused, naming the in-flight limit, and a closed stream gives its slot back."""
    key, _ = _key(stack, "streamcap", max_concurrency=2)
    with frozen_worker(stack), contextlib.ExitStack() as sockets:
        job = _job(stack, key)
        assert _zcard(stack, "inflight:streamcap") == 1
        first, status = _open(stack.gateway, key, job)
        sockets.callback(first.close)
        assert status == 200
        assert _zcard(stack, "inflight:streamcap") == 2
        second = httpx.get(f"{stack.gateway}/v1/jobs/{job}/events", headers={"Authorization": f"Bearer {key}"})
        assert second.status_code == 429, second.text
        assert "in-flight limit" in second.json()["detail"]
        first.close()
        wait_until(lambda: _zcard(stack, "inflight:streamcap") == 1, 10, "the stream's in-flight slot")
        third, status = _open(stack.gateway, key, job)
        sockets.callback(third.close)
        assert status == 200
        third.close()
    wait_until(lambda: _zcard(stack, "inflight:streamcap") == 0, 30, "the job and the stream to give theirs back")


def test_the_result_arrives_promptly_after_the_job_finishes_and_the_slot_is_given_back(stack: Stack) -> None:
    """End to end with a real worker: the stream is woken by the worker's notice, not by a poll."""
    key, key_id = _key(stack, "acme")
    with frozen_worker(stack):
        job = _job(stack, key)
        listener = Listener(stack.gateway, key, job)
        listener.start()
        wait_until(lambda: listener.saw("status"), 10, "the queued status")
        woken = time.monotonic()
    listener.join(30)
    assert listener.names()[-1] == "result" and '"outputs"' in listener.data[-1]
    delay = listener.events[-1][1] - woken
    print(f"result event {delay:.3f} s after the worker resumed")
    assert delay < 3.0, f"the result came {delay:.1f} s after the worker resumed (a notice should wake the stream)"
    wait_until(lambda: _zcard(stack, f"streams:{key_id}") == 0, 10, "the stream's slot after the result")


def test_a_stream_ends_with_revoked_and_never_gets_the_result_once_its_key_is_revoked(stack: Stack) -> None:
    key, key_id = _key(stack, "acme")
    client = stack.redis_client()
    try:
        with frozen_worker(stack):
            job = _job(stack, key)
            listener = Listener(stack.gateway, key, job)
            listener.start()
            wait_until(lambda: listener.saw("status"), 10, "the queued status")
            stack.admin.revoke_key(key_id)
            auth = {"Authorization": f"Bearer {key}"}
            wait_until(
                lambda: httpx.get(f"{stack.gateway}/v1/jobs/{job}", headers=auth).status_code == 401, 10, "revoke"
            )
            wait_until(lambda: listener.saw("revoked"), 10, "the stream to end with 'revoked'")
        wait_until(lambda: client.hget(f"job:{job}", "status") == b"succeeded", 30, "the job to finish later")
        listener.join(10)
    finally:
        client.close()
    assert not listener.is_alive()
    assert listener.names() == ["status", "revoked"], listener.names()
    assert not any('"outputs"' in line for line in listener.data)
    assert _zcard(stack, f"streams:{key_id}") == 0


def test_a_stream_ends_when_its_key_expires_without_any_job_event(stack: Stack) -> None:
    """A rotated key lives on for its overlap, then expires: its stream ends then, job still queued."""
    key, key_id = _key(stack, "acme")
    with frozen_worker(stack):
        job = _job(stack, key)
        listener = Listener(stack.gateway, key, job)
        listener.start()
        wait_until(lambda: listener.saw("status"), 10, "the queued status")
        stack.admin.rotate_key(key_id, overlap_s=3)
        listener.join(15)  # well before a heartbeat (15 s) or the 10 s refresh could end it by chance twice
        assert listener.names() == ["status", "revoked"], listener.names()
    wait_until(lambda: _zcard(stack, f"streams:{key_id}") == 0, 10, "the slot to be given back")


async def _idle_streams(url: str, key: str, job_id: str, count: int) -> list[asyncio.StreamWriter]:
    parts = urlsplit(url)
    writers: list[asyncio.StreamWriter] = []
    request = f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n"
    for _ in range(count):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(request.encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head[:100]
        writers.append(writer)
    return writers


def _client_commands(stack: Stack, seconds: float) -> dict[str, int]:
    """Commands clients sent to Redis during ``seconds``, by name (MONITOR, read raw; the commands a
    script runs are left out: one script call is one round trip)."""
    where = parse_url(stack.settings.require_redis_url())  # type: ignore[no-untyped-call]
    if "path" in where:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(1)
        sock.connect(where["path"])
    else:
        sock = socket.create_connection((where.get("host", "127.0.0.1"), int(where.get("port", 6379))), timeout=1)
    raw = b""
    with sock:
        if where.get("password"):
            sock.sendall(b"AUTH %s\r\n" % where["password"].encode())
        sock.sendall(b"MONITOR\r\n")
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            raw += chunk
    assert b"+OK" in raw[:20], raw[:200]
    seen: dict[str, int] = {}
    for line in raw.decode(errors="replace").split("\r\n"):
        found = re.match(r'\+[\d.]+ \[(\d+) ([^\]]+)\] "([^"]+)"', line)
        if found and found.group(2) != "lua":
            name = found.group(3).lower()
            seen[name] = seen.get(name, 0) + 1
    return seen


def test_two_hundred_idle_streams_cost_redis_almost_nothing(tmp_path: Path) -> None:
    """Before: every stream read its job with HGETALL every 100 ms (200 streams: ~4,000 commands in 2 s)."""
    with running(tmp_path, workers=0, max_streams_per_key=250) as stack:
        key = stack.keys["acme"]
        job = _job(stack, key)

        async def measure() -> dict[str, int]:
            writers = await _idle_streams(stack.gateway, key, job, 200)
            await asyncio.sleep(0.5)
            try:
                return await asyncio.to_thread(_client_commands, stack, 2.0)
            finally:
                for w in writers:
                    w.close()

        seen = asyncio.run(measure())
    print(f"commands sent to Redis in 2 s with 200 idle streams open: {sum(seen.values())} {seen}")
    assert seen.get("hgetall", 0) == 0, seen
    assert sum(seen.values()) < 60, seen


def test_a_stream_slot_lapses_unless_refreshed_and_a_refresh_never_revives_it(redis_client: Any) -> None:
    """stream_slot.lua on a real Redis, with a 1 s slot lifetime: a refreshed slot lives on and
    reports its job's status; one left alone lapses, frees the cap, and its refresh says so."""
    from bastion.gateway import streams

    def short(call: tuple[list[str], list[Any]]) -> tuple[list[str], list[Any]]:
        keys, args = call
        return keys, [args[0], 1000, *args[2:]]

    redis_client.hset("job:j1", "status", "running")
    kept = streams.Slot("sse:gw:a", "t", "k", "j1", counted=True)
    left = streams.Slot("sse:gw:b", "t", "k", "j2", counted=True)
    for slot in (kept, left):
        assert streams.STREAM_SLOT.call(redis_client, *short(streams.open_call(slot, 5, 2)))[0] == 1
    refused = streams.STREAM_SLOT.call(
        redis_client, *short(streams.open_call(streams.Slot("sse:gw:c", "t", "k", "j1", True), 5, 2))
    )
    assert [refused[0], refused[1]] == [0, b"key"]
    for _ in range(5):  # 1.5 s in all: past the lifetime, but ``kept`` is refreshed every 300 ms
        time.sleep(0.3)
        found = streams.STREAM_SLOT.call(redis_client, *short(streams.refresh_call([kept])))
        assert found == [b"running", 1]
    assert streams.STREAM_SLOT.call(redis_client, *short(streams.refresh_call([left]))) == [b"", 0]
    assert redis_client.zscore("streams:k", "sse:gw:b") is not None, "a refresh does not re-take a lapsed slot"
    again = streams.Slot("sse:gw:d", "t", "k", "j1", counted=True)
    assert streams.STREAM_SLOT.call(redis_client, *short(streams.open_call(again, 5, 2)))[0] == 1, "lapsed: freed"
    assert 0 < redis_client.pttl("streams:k") <= 1000 and 0 < redis_client.pttl("inflight:t") <= 1000
    streams.STREAM_SLOT.call(redis_client, *streams.close_call(kept))
    assert (
        redis_client.zscore("inflight:t", "sse:gw:a") is None and redis_client.zscore("streams:k", "sse:gw:a") is None
    )


def test_stopping_the_watch_waits_for_the_open_streams_to_end_and_gives_their_slots_back(redis_url: str) -> None:
    """At shutdown the watch pokes every open stream; the streams end on their next turn (their last
    event written first). ``stop`` waits for them to be gone and then for the releases, so their
    slots are back in Redis when it returns, not left to lapse 30 s later."""
    from bastion.constants import inflight_key, streams_key
    from bastion.gateway import streams
    from bastion.gateway.jobwatch import JobWatch, Watch
    from bastion.redisconn import async_client
    from bastion.snapshot import KeyInfo

    key = KeyInfo("k1", "t1", frozenset({"jobs"}), None)

    async def scenario() -> tuple[int, int, int]:
        client = async_client(redis_url)
        watch = JobWatch(client, None, lambda: False)  # type: ignore[arg-type]  # no snapshot is read

        async def stream(one: Watch) -> None:  # as EventStream: wait, write the last event, remove
            try:
                while one.ended is None:
                    await one.wait(60)
                for _ in range(3):
                    await asyncio.sleep(0)
            finally:
                watch.remove(one)

        tasks = []
        for i in range(3):
            one = Watch(f"j{i}", key, "digest", ("jobs",))
            watch.add(one)
            one.slot = await streams.take(
                client, "gw", tenant="t1", key_id="k1", job_id=f"j{i}", tenant_cap=10, key_cap=5
            )
            tasks.append(asyncio.create_task(stream(one)))
        await asyncio.sleep(0.05)
        held = int(await client.zcard(streams_key("k1")))
        await watch.stop()
        left = int(await client.zcard(streams_key("k1"))), int(await client.zcard(inflight_key("t1")))
        await asyncio.gather(*tasks)
        await client.aclose()
        return held, *left

    assert asyncio.run(scenario()) == (3, 0, 0)
