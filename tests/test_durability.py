"""Durability modes: a 202 only once the configured confirmation holds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bastion.embedded.redis_server import EmbeddedRedis, free_port
from tests.support import Stack, http_ok, running, wait_until

JOBS = "/v1/models/breast-cancer/jobs"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("durable"), durability="replicas", durability_timeout_ms=50) as s:
        yield s


def test_replicas_mode_without_a_replica_never_says_202(stack: Stack) -> None:
    with stack.client() as http:
        for _ in range(3):
            r = http.post(JOBS, json={"inputs": [[1.0] * 30]}, headers={"Idempotency-Key": "k-durable-1"})
            assert r.status_code == 503, r.text
            assert r.headers["content-type"] == "application/problem+json"
            assert "not confirmed held by 1 replica(s) within 50 ms" in r.json()["detail"]
            assert "Idempotency-Key" in r.json()["detail"]
            assert int(r.headers["retry-after"]) >= 1
        predict = http.post("/v1/models/breast-cancer/predict", json={"inputs": [[1.0] * 30]})
        assert predict.status_code == 503, "a sync call is refused the same way"


def test_waitaof_is_used_where_redis_has_it_and_refused_at_start_where_not(stack: Stack) -> None:
    client = stack.redis_client()
    version = str(client.info("server")["redis_version"])
    client.close()
    port = free_port()
    stack._spawn("gateway-waitaof", ["gateway"], {"BASTION_GATEWAY_PORT": str(port), "BASTION_DURABILITY": "waitaof"})
    if tuple(int(p) for p in version.split(".")[:2]) < (7, 2):
        assert stack.wait("gateway-waitaof", 30) != 0
        assert "needs Redis 7.2 or later" in stack.log("gateway-waitaof")
        return
    url = f"http://127.0.0.1:{port}"  # Redis 7.2+: the local AOF is fsynced before each 202
    wait_until(lambda: http_ok(f"{url}/readyz"), 60, "the waitaof gateway")
    with stack.client(headers={}) as http:
        r = httpx.post(f"{url}{JOBS}", json={"inputs": [[1.0] * 30]}, headers=http.headers)
    assert r.status_code == 202, r.text


def test_the_embedded_redis_writes_the_durability_mode_into_its_config(tmp_path: Path) -> None:
    for mode, fsync in (("everysec", "everysec"), ("always", "always"), ("replicas", "everysec")):
        server = EmbeddedRedis(tmp_path / mode, fsync=mode)
        server.start()
        try:
            client = __import__("redis").Redis.from_url(server.url)
            wait_until(lambda client=client: client.ping(), 5, "redis")
            config = client.config_get("append*")
            client.close()
            assert config["appendonly"] == "yes" and config["appendfsync"] == fsync
        finally:
            server.stop()
