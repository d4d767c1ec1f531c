"""Deployments over real processes: weighted sticky canaries, rollback and the kill switch on two gateways."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bastion import demo
from bastion.artifacts.store import ArtifactStore
from bastion.errors import Conflict, InvalidInput
from bastion.registry import db
from bastion.registry.service import Registry
from tests.support import Stack

ROW = [1.0] * 30
PREDICT = "/v1/models/breast-cancer/predict"


@pytest.fixture(scope="module")
def two_gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("deploy"), workers=1, gateways=2)
    try:
        s.start()
        s.admin.register(demo.MODEL_NAME, demo.model_bytes(), activate=False)  # version 2
        yield s
    finally:
        s.stop()


def _version(http: httpx.Client, subject: str) -> int:
    r = http.post(PREDICT, json={"inputs": [ROW]}, headers={"X-Bastion-Subject": subject})
    assert r.status_code == 200, r.text
    return int(r.headers["x-bastion-model-version"])


def test_a_90_10_canary_splits_distinct_subjects_and_is_sticky(two_gateways: Stack) -> None:
    stack = two_gateways
    stack.admin.deploy(demo.MODEL_NAME, [{"version": 1, "weight": 90}, {"version": 2, "weight": 10, "role": "canary"}])
    time.sleep(0.5)
    clients = [stack.client("acme-subjects", gateway=i % 2, limits=httpx.Limits(max_connections=4)) for i in range(16)]
    try:

        def run(i: int) -> int:
            return _version(clients[i % 16], f"user-{i}")

        with ThreadPoolExecutor(16) as pool:
            versions = list(pool.map(run, range(10_000)))
        share = versions.count(2) / len(versions) * 100
        print(f"canary share over 10,000 distinct subjects: {share:.2f}%")
        assert 8.5 <= share <= 11.5
        # Sticky: the same subject gets the same version on every call and on either gateway.
        for i in range(0, 10_000, 50):
            assert _version(clients[(i + 1) % 16], f"user-{i}") == versions[i]
    finally:
        for c in clients:
            c.close()


def test_only_a_key_operators_trust_chooses_its_canary_by_subject(two_gateways: Stack) -> None:
    """An ordinary key cannot pick the version it gets by trying ``X-Bastion-Subject`` values:
    it is routed by its own identity. A key marked ``subject_trusted`` routes each subject."""
    stack = two_gateways
    stack.admin.deploy(demo.MODEL_NAME, [{"version": 1, "weight": 50}, {"version": 2, "weight": 50, "role": "canary"}])
    time.sleep(0.5)
    try:
        with stack.client("acme") as plain, stack.client("acme-subjects") as trusted:
            assert len({_version(plain, f"try-{i}") for i in range(60)}) == 1, "a plain key chose its version"
            assert {_version(trusted, f"try-{i}") for i in range(60)} == {1, 2}
            assert plain.post(PREDICT, json={"inputs": [ROW]}, headers={"X-Bastion-Subject": ""}).status_code == 200
    finally:
        stack.admin.deploy(demo.MODEL_NAME, [{"version": 1}])


def test_rollback_and_kill_switch_are_obeyed_by_both_gateways_within_a_second(two_gateways: Stack) -> None:
    stack = two_gateways
    stack.admin.deploy(demo.MODEL_NAME, [{"version": 1, "weight": 50}, {"version": 2, "weight": 50, "role": "canary"}])
    time.sleep(0.5)
    clients = [stack.client("acme-subjects", gateway=0), stack.client("acme-subjects", gateway=1)]
    try:
        canary_subject = next(s for s in (f"s{i}" for i in range(1000)) if _version(clients[0], s) == 2)

        def obeyed_within(check: object) -> float:
            started = time.monotonic()
            pending = set(range(len(clients)))
            while pending and time.monotonic() - started < 5:
                for i in list(pending):
                    if check(clients[i]):  # type: ignore[operator]
                        pending.discard(i)
            assert not pending, "a gateway never obeyed"
            return time.monotonic() - started

        stack.admin.rollback(demo.MODEL_NAME)
        rollback_s = obeyed_within(lambda c: _version(c, canary_subject) == 1)
        stack.admin.set_enabled(demo.MODEL_NAME, False)
        disable_s = obeyed_within(lambda c: c.post(PREDICT, json={"inputs": [ROW]}).status_code == 503)
        r = clients[1].post(PREDICT, json={"inputs": [ROW]})
        assert r.headers["content-type"] == "application/problem+json"
        assert "disabled" in r.json()["detail"]
        stack.admin.set_enabled(demo.MODEL_NAME, True)
        enable_s = obeyed_within(lambda c: c.post(PREDICT, json={"inputs": [ROW]}).status_code == 200)
        print(
            f"obeyed by both gateways: rollback {rollback_s:.3f} s, disable {disable_s:.3f} s, enable {enable_s:.3f} s"
        )
        assert max(rollback_s, disable_s, enable_s) < 1.0
    finally:
        for c in clients:
            c.close()


def test_a_disabled_model_with_a_fallback_is_answered_by_it_and_labelled(two_gateways: Stack) -> None:
    stack = two_gateways
    stack.admin.deploy(demo.MODEL_NAME, [{"version": 2}], fallback=1)
    stack.admin.set_enabled(demo.MODEL_NAME, False)
    time.sleep(0.5)
    try:
        with stack.client() as http:
            r = http.post(PREDICT, json={"inputs": [ROW]})
        assert r.status_code == 200
        assert r.headers["x-bastion-fallback"] == "true"
        assert r.headers["x-bastion-model-version"] == "1"
    finally:
        stack.admin.set_enabled(demo.MODEL_NAME, True)
    # Promoting v2 then rolling back returns all traffic to v1.
    assert stack.admin.rollback(demo.MODEL_NAME)["routes"] == [{"version": 1, "weight": 100, "role": "primary"}]


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Iterator[Registry]:
    engine = db.engine_for(database_url)
    db.migrate(engine)
    yield Registry(db.session_factory(engine), ArtifactStore(tmp_path / "artifacts"), max_upload_bytes=1 << 20)
    engine.dispose()


def test_deployments_are_validated_and_recorded(registry: Registry) -> None:
    registry.register_version("m", demo.model_bytes())
    registry.register_version("m", demo.model_bytes(), activate=False)
    deployments = registry.deployments
    for routes, says in [
        ([], "at least one route"),
        ([{"version": 1, "role": "canary"}], "exactly one primary"),
        ([{"version": 1}, {"version": 1, "role": "canary"}], "more than one route"),
        ([{"version": 9}], "no version"),
        ([{"version": 1, "weight": 0}], "add up to zero"),
        ([{"version": 1, "role": "shadowy"}], "role"),
    ]:
        with pytest.raises(InvalidInput, match=says):
            deployments.deploy("m", routes, None, "alice")
    with pytest.raises(Conflict, match="no earlier production version"):
        deployments.rollback("m", "alice")
    deployments.deploy("m", [{"version": 2}], None, "alice")
    assert registry.get_model("m")["current_version"] == 2
    assert deployments.rollback("m", "bob")["routes"][0]["version"] == 1
    snap = registry.snapshot()["models"]["m"]
    assert snap["routes"] == [{"version": 1, "weight": 100, "role": "primary"}]
    assert snap["disabled"] is False
    for rules, says in [
        ([{"allow": [1]}], "needs a 'jurisdiction', a 'tenant' or a 'without_consent'"),
        ([{"jurisdiction": "EU", "allow": "1"}], "list of version numbers"),
        ([{"jurisdiction": "EU", "allow": [7]}], "no version"),
        ([{"jurisdiction": "EU", "allow": [1], "consent": True}], "unknown fields"),
    ]:
        with pytest.raises(InvalidInput, match=says):
            deployments.deploy("m", [{"version": 1}], None, "alice", rules=rules)
    deployments.deploy("m", [{"version": 1}], None, "alice", rules=[{"jurisdiction": "EU", "allow": [2, 1, 1]}])
    assert registry.snapshot()["models"]["m"]["rules"] == [{"jurisdiction": "EU", "allow": [1, 2]}]
    registry.create_key("acme", "k", ["predict"])
    registry.set_tenant("acme", "EU")
    assert [k["jurisdiction"] for k in registry.snapshot()["keys"].values()] == ["EU"]
    with pytest.raises(InvalidInput, match="jurisdiction"):
        registry.set_tenant("acme", "no spaces allowed")


def test_rollback_leaves_the_kill_switch_as_it_is(registry: Registry) -> None:
    """A disabled model stays disabled through a rollback: rolling back is not switching it back on."""
    registry.register_version("m", demo.model_bytes())
    registry.register_version("m", demo.model_bytes(), activate=False)
    deployments = registry.deployments
    deployments.deploy("m", [{"version": 2}], 1, "alice")
    deployments.set_disabled("m", True, "alice")
    rolled = deployments.rollback("m", "bob")
    assert rolled["routes"] == [{"version": 1, "weight": 100, "role": "primary"}]
    assert rolled["disabled"] is True and rolled["fallback_version"] == 1
    assert registry.snapshot()["models"]["m"]["disabled"] is True
    deployments.set_disabled("m", False, "alice")
    deployments.deploy("m", [{"version": 2}], 1, "alice")
    assert deployments.rollback("m", "bob")["disabled"] is False  # and an enabled one stays enabled


def test_rollback_never_routes_to_a_retired_or_unqualified_version(registry: Registry) -> None:
    """On a gated model a rollback passes over versions no longer in production, and retired ones;
    with none left it is refused and nothing changes."""
    registry.lifecycle.set_policy("m", {"require_approval": True}, "alice")
    for _ in range(3):
        v = registry.register_version("m", demo.model_bytes(), created_by="alice")["version"]
        registry.lifecycle.approve("m", v, "bob")
        registry.lifecycle.set_stage("m", v, "staging", "alice")
        registry.lifecycle.set_stage("m", v, "production", "alice")  # becomes the primary
    assert registry.get_model("m")["current_version"] == 3
    registry.lifecycle.set_stage("m", 2, "staging", "alice")  # v2 leaves production
    deployments = registry.deployments
    assert deployments.rollback("m", "bob")["routes"][0]["version"] == 1, "v2 is not in production"
    with pytest.raises(Conflict, match="no earlier production version"):
        deployments.rollback("m", "bob")
    # Ungated: a retired version is passed over too.
    registry.register_version("n", demo.model_bytes())
    registry.register_version("n", demo.model_bytes(), activate=False)
    deployments.deploy("n", [{"version": 2}], None, "alice")
    registry.lifecycle.set_stage("n", 1, "retired", "alice")
    with pytest.raises(Conflict, match="no earlier production version"):
        deployments.rollback("n", "bob")
    assert deployments.get("n")["routes"] == [{"version": 2, "weight": 100, "role": "primary"}]


def test_rolling_back_again_goes_further_back_and_never_flips_between_two_versions(registry: Registry) -> None:
    """Each rollback steps one version further back through the deployment history; the version just
    rolled back from is not returned to; at the oldest, a rollback is a 409."""
    registry.register_version("m", demo.model_bytes())  # v1 serves
    for _ in range(2):
        registry.register_version("m", demo.model_bytes(), activate=False)
    deployments = registry.deployments
    deployments.deploy("m", [{"version": 2}], None, "alice")
    deployments.deploy("m", [{"version": 3}], None, "alice")

    def primary() -> int:
        return int(deployments.get("m")["routes"][0]["version"])

    assert deployments.rollback("m", "bob")["routes"][0]["version"] == 2
    assert deployments.rollback("m", "bob")["routes"][0]["version"] == 1
    with pytest.raises(Conflict, match="no earlier production version"):
        deployments.rollback("m", "bob")
    assert primary() == 1
    # Two versions: v2 deployed again, one rollback returns to v1, the next one does not flip back.
    deployments.deploy("m", [{"version": 2}], None, "alice")
    assert deployments.rollback("m", "bob")["routes"][0]["version"] == 1
    with pytest.raises(Conflict, match="no earlier production version"):
        deployments.rollback("m", "bob")
    assert primary() == 1
    # With canaries live, a rollback drops them and keeps the primary; that is no step back.
    deployments.deploy("m", [{"version": 3}], None, "alice")
    deployments.deploy("m", [{"version": 3, "weight": 90}, {"version": 2, "weight": 10, "role": "canary"}], None, "al")
    assert deployments.rollback("m", "bob")["routes"] == [{"version": 3, "weight": 100, "role": "primary"}]
    assert deployments.rollback("m", "bob")["routes"][0]["version"] == 1


def test_migration_0002_gives_existing_models_a_deployment(database_url: str) -> None:
    """A database created before deployments existed keeps serving its current versions after upgrade."""
    import sqlalchemy as sa

    engine = db.engine_for(database_url)
    try:
        db.migrate(engine, "0001")
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO models (name, description, current_version, created_at) "
                    "VALUES ('old', '', 3, CURRENT_TIMESTAMP)"
                )
            )
        db.migrate(engine)
        with engine.connect() as conn:
            routes = conn.execute(sa.text("SELECT routes FROM deployments")).scalar_one()
        if isinstance(routes, str):
            routes = json.loads(routes)
        assert routes == [{"version": 3, "weight": 100, "role": "primary"}]
    finally:
        engine.dispose()


def test_a_tampered_canary_is_refused_by_the_worker_while_the_primary_keeps_serving(two_gateways: Stack) -> None:
    import onnx

    stack = two_gateways
    variant = onnx.load_model_from_string(demo.model_bytes())
    variant.doc_string = "a retrained variant (different bytes, different sha256)"
    v3 = stack.admin.register(demo.MODEL_NAME, variant.SerializeToString(), activate=False)
    artifact = next(p for p in (stack.root / "artifacts").rglob(v3["sha256"]))
    artifact.chmod(0o644)
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    stack.admin.deploy(demo.MODEL_NAME, [{"version": 1, "weight": 50}, {"version": 3, "weight": 50, "role": "canary"}])
    time.sleep(0.5)
    with stack.client("acme-subjects") as http:
        answers = [
            http.post(PREDICT, json={"inputs": [ROW]}, headers={"X-Bastion-Subject": f"t{i}"}) for i in range(40)
        ]
    served = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    assert served and all(r.headers["x-bastion-model-version"] == "1" for r in served), "the primary keeps serving"
    assert refused and all(r.status_code == 502 for r in refused), "the tampered canary is never served"
    assert all("failed its integrity check" in r.json()["detail"] for r in refused)
    assert "artifact_refused" in stack.log("worker-0")
    stack.admin.rollback(demo.MODEL_NAME)


def test_a_jurisdiction_rule_keeps_eu_tenants_on_eu_approved_versions(two_gateways: Stack) -> None:
    """EU is an attribute of the tenant (set by operators); no client header can change it."""
    stack = two_gateways
    stack.admin.set_tenant("acme", "EU")
    rule = {"jurisdiction": "EU", "allow": [1]}
    both = [{"version": 1, "weight": 50}, {"version": 2, "weight": 50, "role": "canary"}]
    stack.admin.deploy(demo.MODEL_NAME, both, rules=[rule])
    time.sleep(0.5)
    try:
        with stack.client("acme-subjects", gateway=0) as eu, stack.client("globex-subjects", gateway=1) as other:
            eu_versions = {_version(eu, f"u{i}") for i in range(200)}
            other_versions = {_version(other, f"u{i}") for i in range(200)}
            assert eu_versions == {1}, "an EU tenant reached a version not approved for EU"
            assert other_versions == {1, 2}
            forged = eu.post(PREDICT, json={"inputs": [ROW]}, headers={"X-Bastion-Jurisdiction": "US"})
            assert forged.headers["x-bastion-model-version"] == "1"
            # Only an unapproved version deployed: EU callers get a 403 saying why; others are served.
            stack.admin.deploy(demo.MODEL_NAME, [{"version": 2}], rules=[rule])
            time.sleep(0.5)
            refused = eu.post(PREDICT, json={"inputs": [ROW]})
            assert refused.status_code == 403
            assert refused.headers["content-type"] == "application/problem+json"
            assert "policy (jurisdiction EU) allows this caller only version(s) [1]" in refused.json()["detail"]
            assert other.post(PREDICT, json={"inputs": [ROW]}).status_code == 200
    finally:
        stack.admin.set_tenant("acme", None)
        stack.admin.deploy(demo.MODEL_NAME, [{"version": 1}])


def test_a_consent_rule_keeps_tenants_without_the_consent_off_the_versions_that_need_it(two_gateways: Stack) -> None:
    """Consent flags are tenant attributes set by operators, like the jurisdiction."""
    stack = two_gateways
    stack.admin.set_tenant("globex", None, consents=["profiling"])
    both = [{"version": 1, "weight": 50}, {"version": 2, "weight": 50, "role": "canary"}]
    stack.admin.deploy(demo.MODEL_NAME, both, rules=[{"without_consent": "profiling", "allow": [1]}])
    time.sleep(0.5)
    try:
        with (
            stack.client("acme-subjects", gateway=1) as without,
            stack.client("globex-subjects", gateway=0) as consenting,
        ):
            assert {_version(without, f"c{i}") for i in range(100)} == {1}
            assert {_version(consenting, f"c{i}") for i in range(100)} == {1, 2}
            stack.admin.deploy(
                demo.MODEL_NAME, [{"version": 2}], rules=[{"without_consent": "profiling", "allow": [1]}]
            )
            time.sleep(0.5)
            refused = without.post(PREDICT, json={"inputs": [ROW]})
            assert refused.status_code == 403 and "without consent 'profiling'" in refused.json()["detail"]
    finally:
        stack.admin.set_tenant("globex", None, consents=[])
        stack.admin.deploy(demo.MODEL_NAME, [{"version": 1}])


def test_a_shadow_version_records_comparisons_for_the_requests_and_never_answers(two_gateways: Stack) -> None:
    import onnx

    stack = two_gateways
    variant = onnx.load_model_from_string(demo.model_bytes())
    variant.doc_string = "shadow candidate"
    shadow_v = stack.admin.register(demo.MODEL_NAME, variant.SerializeToString(), activate=False)["version"]
    stack.admin.deploy(demo.MODEL_NAME, [{"version": 1}, {"version": shadow_v, "weight": 100, "role": "shadow"}])
    time.sleep(0.5)
    before = stack.admin.shadow(demo.MODEL_NAME)["versions"].get(str(shadow_v), {}).get("requests", 0)
    requests = 300
    try:
        with stack.client() as http:
            reference = http.post(PREDICT, json={"inputs": [ROW]}).json()["outputs"]
            for i in range(requests - 1):
                r = http.post(PREDICT, json={"inputs": [ROW]}, headers={"X-Bastion-Subject": f"sh{i}"})
                assert r.status_code == 200
                assert r.headers["x-bastion-model-version"] == "1"
                assert r.json()["outputs"] == reference

        def recorded() -> int:
            figures = stack.admin.shadow(demo.MODEL_NAME)["versions"].get(str(shadow_v), {})
            return int(figures.get("requests", 0)) - before

        deadline = time.monotonic() + 15
        while recorded() < requests and time.monotonic() < deadline:
            time.sleep(0.2)
        figures = stack.admin.shadow(demo.MODEL_NAME)["versions"][str(shadow_v)]
        print(f"shadow recorded {recorded()}/{requests}: {figures}")
        assert recorded() >= 0.99 * requests
        assert figures["agreement_rate"] == 1.0  # same weights, different bytes
        assert figures["mean_abs_diff"] == 0.0
        still_due = requests - recorded()  # copies not compared yet may land after the reset
        stack.admin.shadow(demo.MODEL_NAME, reset=True)
        after = stack.admin.shadow(demo.MODEL_NAME)["versions"].get(str(shadow_v), {}).get("requests", 0)
        assert after <= max(still_due, 0), "the reset starts the figures afresh"
    finally:
        stack.admin.deploy(demo.MODEL_NAME, [{"version": 1}])


def test_a_new_version_is_loaded_and_warmed_up_by_the_worker_before_it_takes_traffic(two_gateways: Stack) -> None:
    import onnx

    stack = two_gateways
    variant = onnx.load_model_from_string(demo.model_bytes())
    variant.doc_string = "warm-up check"
    new = stack.admin.register(demo.MODEL_NAME, variant.SerializeToString(), activate=False)["version"]
    client = stack.redis_client()
    try:
        assert client.zcard(f"warm:{demo.MODEL_NAME}:{new}") == 0, "nothing routes to it yet"
        started = time.monotonic()
        view = stack.admin.deploy(
            demo.MODEL_NAME, [{"version": 1, "weight": 90}, {"version": new, "weight": 10, "role": "canary"}]
        )
        took = time.monotonic() - started
        # When the call returns (and before any gateway routes to it) a worker has it loaded and warm.
        assert view["warm"] is True
        assert client.zrange(f"warm:{demo.MODEL_NAME}:{new}", 0, -1) == [b"worker-0"]
        print(f"deploy with warm-up of a new version took {took * 1000:.0f} ms")
        assert took < stack.settings.warm_timeout_s
    finally:
        stack.admin.deploy(demo.MODEL_NAME, [{"version": 1}])
        client.close()
