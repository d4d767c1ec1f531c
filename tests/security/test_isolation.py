"""From the tenant's side: nothing of another tenant or of an unreleased version is readable.

Job ids (async and sync), shadow copies, response-cache entries and Idempotency-Key records are
probed by one tenant against another's, and by every tenant against the shadow copies made
from its own requests, over real HTTP against real processes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import onnx
import pytest

from bastion import demo
from tests.support import Stack, running, wait_until

ROW = [1.0] * 30
MODEL = demo.MODEL_NAME
PREDICT = f"/v1/models/{MODEL}/predict"
JOBS = f"/v1/models/{MODEL}/jobs"


@pytest.fixture(scope="module")
def shadowed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, int]]:
    """Version 1 serves; version 2 (unreleased) receives a copy of every answered request."""
    with running(tmp_path_factory.mktemp("isolation"), workers=1) as stack:
        variant = onnx.load_model_from_string(demo.model_bytes())
        variant.doc_string = "an unreleased candidate"
        v2 = int(stack.admin.register(MODEL, variant.SerializeToString(), activate=False)["version"])
        stack.admin.deploy(MODEL, [{"version": 1}, {"version": v2, "weight": 100, "role": "shadow"}])
        time.sleep(0.5)
        yield stack, v2


def _shadow_ids(stack: Stack) -> list[str]:
    client = stack.redis_client()
    try:
        return [k.decode()[3:] for k in client.scan_iter("sj:*")]
    finally:
        client.close()


def _copies(stack: Stack, version: int) -> int:
    return int(stack.admin.shadow(MODEL)["versions"].get(str(version), {}).get("requests", 0))


def test_no_shadow_copy_is_a_job_any_tenant_can_read(shadowed: tuple[Stack, int]) -> None:
    """A shadow's outputs (an unreleased version's) never reach a tenant: not under the id the
    old scheme derived from the answer's id, not under the copy's own id, for no tenant."""
    stack, v2 = shadowed
    before = _copies(stack, v2)
    with stack.client("acme") as acme, stack.client("globex") as globex:
        answered = [acme.post(PREDICT, json={"inputs": [ROW, ROW, ROW]}) for _ in range(5)]
        assert all(r.status_code == 200 for r in answered)
        wait_until(lambda: _copies(stack, v2) >= before + 5, 15, "the shadow copies to be compared")
        for r in answered:
            for http in (acme, globex):
                assert http.get(f"/v1/jobs/{r.json()['id']}-shadow{v2}").status_code == 404
        ids = _shadow_ids(stack)
        assert ids, "the copies left their (short-lived) records"
        for shadow_id in ids:
            for http in (acme, globex):
                found = http.get(f"/v1/jobs/{shadow_id}")
                assert found.status_code == 404 and found.headers["content-type"] == "application/problem+json"
    client = stack.redis_client()
    try:
        for shadow_id in ids:
            record = client.hgetall(f"sj:{shadow_id}")
            assert record.get(b"result", b"") == b"", "no shadow outputs are stored"
            assert 0 < client.ttl(f"sj:{shadow_id}") <= 600
        assert client.xlen(f"q:{MODEL}:shadow") == 0, "copies go to their own lane (drained)"
        assert client.hget(f"cost:{MODEL}:{v2}", "per_row") is None, "a shadow teaches no price"
    finally:
        client.close()


def test_a_policy_rule_keeps_a_tenants_data_away_from_a_shadow_it_forbids(shadowed: tuple[Stack, int]) -> None:
    """A tenant whose jurisdiction allows only version 1 has no copy of its requests sent to
    the shadow version; other tenants' requests are still copied."""
    stack, v2 = shadowed
    stack.admin.set_tenant("acme", "EU")
    stack.admin.deploy(
        MODEL,
        [{"version": 1}, {"version": v2, "weight": 100, "role": "shadow"}],
        rules=[{"jurisdiction": "EU", "allow": [1]}],
    )
    time.sleep(0.5)
    try:
        before = _copies(stack, v2)
        with stack.client("acme") as acme:
            assert all(acme.post(PREDICT, json={"inputs": [ROW]}).status_code == 200 for _ in range(20))
        with stack.client("globex") as globex:
            assert globex.post(PREDICT, json={"inputs": [ROW]}).status_code == 200
        wait_until(lambda: _copies(stack, v2) >= before + 1, 15, "globex's copy")
        time.sleep(0.5)  # any copy of acme's would have been compared by now
        assert _copies(stack, v2) == before + 1, "an EU tenant's data reached a version its policy forbids"
    finally:
        stack.admin.set_tenant("acme", None)
        stack.admin.deploy(MODEL, [{"version": 1}, {"version": v2, "weight": 100, "role": "shadow"}])
        time.sleep(0.3)


def test_no_tenant_reads_another_tenants_jobs_cached_answers_or_idempotency_records(
    shadowed: tuple[Stack, int],
) -> None:
    stack, v2 = shadowed
    stack.admin.set_serving(MODEL, {"cache_ttl_s": 30})
    time.sleep(0.3)
    try:
        with stack.client("acme") as acme, stack.client("globex") as globex:
            job = acme.post(JOBS, json={"inputs": [ROW]}).json()["id"]
            wait_until(lambda: acme.get(f"/v1/jobs/{job}").json()["status"] == "succeeded", 15, "the job")
            sync = acme.post(PREDICT, json={"inputs": [[3.0] * 30]}, headers={"X-Bastion-Timeout-Ms": "5000"})
            for probe in (f"/v1/jobs/{job}", f"/v1/jobs/{job}/events", f"/v1/jobs/{sync.json()['id']}"):
                mine, theirs = acme.get(probe), globex.get(probe)
                assert theirs.status_code == 404, probe
                assert "acme" not in theirs.text and "succeeded" not in theirs.text
                assert mine.status_code in (200, 404)  # a sync outcome may already have expired
            nobody = globex.get("/v1/jobs/AAAAAAAAAAAAAAAAAAAAAA")
            assert (
                nobody.status_code == 404 and nobody.json()["detail"] == globex.get(f"/v1/jobs/{job}").json()["detail"]
            )

            # the response cache: per tenant, and per version
            row = [4.0] * 30
            assert "x-bastion-cache" not in acme.post(PREDICT, json={"inputs": [row]}).headers
            assert acme.post(PREDICT, json={"inputs": [row]}).headers.get("x-bastion-cache") == "hit"
            assert "x-bastion-cache" not in globex.post(PREDICT, json={"inputs": [row]}).headers

            # an Idempotency-Key names a record of its own tenant only
            key = {"Idempotency-Key": "shared-key-1"}
            first = acme.post(PREDICT, json={"inputs": [[5.0] * 30]}, headers=key)
            other = globex.post(PREDICT, json={"inputs": [[5.0] * 30]}, headers=key)
            assert first.status_code == other.status_code == 200
            assert "idempotent-replayed" not in other.headers and other.json()["id"] != first.json()["id"]
            async_first = acme.post(JOBS, json={"inputs": [ROW]}, headers={"Idempotency-Key": "shared-key-2"})
            async_other = globex.post(JOBS, json={"inputs": [ROW]}, headers={"Idempotency-Key": "shared-key-2"})
            assert async_other.json()["id"] != async_first.json()["id"]

        # a cached answer of version 1 is never served once version 2 answers
        stack.admin.deploy(MODEL, [{"version": v2}, {"version": 1, "weight": 100, "role": "shadow"}])
        time.sleep(0.5)
        with stack.client("acme") as acme:
            moved = acme.post(PREDICT, json={"inputs": [row]})
            assert moved.headers["x-bastion-model-version"] == str(v2) and "x-bastion-cache" not in moved.headers
    finally:
        stack.admin.set_serving(MODEL, {})
        stack.admin.deploy(MODEL, [{"version": 1}, {"version": v2, "weight": 100, "role": "shadow"}])
        time.sleep(0.3)


def test_model_metadata_lists_only_versions_the_caller_can_reach(shadowed: tuple[Stack, int]) -> None:
    """An unreleased (shadow-only) version is not announced, and policy hides forbidden ones."""
    stack, _ = shadowed
    with stack.client("acme") as acme:
        meta = acme.get(f"/v2/models/{MODEL}")
    assert meta.status_code == 200 and meta.json()["versions"] == ["1"]
    with httpx.Client(base_url=stack.gateway) as anonymous:
        assert anonymous.get(f"/v2/models/{MODEL}").status_code == 401


def test_a_shadow_version_cannot_be_named_on_any_v2_version_route(shadowed: tuple[Stack, int]) -> None:
    """``/v2/models/{name}/versions/{v}`` (metadata, ready, infer) reaches only versions that take
    traffic: the shadow answers exactly as a version that does not exist, for every tenant."""
    stack, v2 = shadowed
    body = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": ROW}]}
    for tenant in ("acme", "globex"):
        with stack.client(tenant) as http:
            assert http.get(f"/v2/models/{MODEL}/versions/1").status_code == 200
            for method, suffix in (("GET", ""), ("GET", "/ready"), ("POST", "/infer")):
                shadow = http.request(method, f"/v2/models/{MODEL}/versions/{v2}{suffix}", json=body)
                missing = http.request(method, f"/v2/models/{MODEL}/versions/77{suffix}", json=body)
                assert shadow.status_code == missing.status_code == 404, shadow.text
                assert shadow.json() == {"error": f"model {MODEL!r} has no version {v2} taking traffic"}
                assert shadow.text.replace(str(v2), "N") == missing.text.replace("77", "N")
