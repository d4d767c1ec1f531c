"""Version lifecycle: promotion gates (evaluation on a worker, fairness, documentation, four-eyes),
stages, signed artifacts and post-processing, against a real stack."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from bastion.adminclient import AdminClient, AdminError
from tests.support import Stack, running, wait_until

MODEL = "credit"
PREDICT = f"/v1/models/{MODEL}/predict"

POLICY = {
    "min_accuracy": 0.8,
    "min_auc": 0.85,
    "min_f1": 0.75,
    "max_demographic_parity_difference": 0.1,
    "max_equal_opportunity_difference": 0.1,
    "require_documentation": True,
    "require_approval": True,
}

DOCS: dict[str, Any] = {
    "owner": "risk-ml@example.com",
    "model_card": "Credit default classifier. Intended use: pre-screening. Not for final decisions.",
    "lineage": {"dataset": "loans", "version": "2026-10", "digest": "sha256:" + "0" * 64},
    "offline_metrics": {"accuracy": 0.9},
    "signature": {
        "inputs": {"x": {"features": [{"name": "income"}, {"name": "noise"}, {"name": "group_proxy"}]}},
        "outputs": {"probabilities": {"labels": ["repaid", "default"]}},
    },
}


def logistic(weights: list[float], bias: float) -> bytes:
    """A 3-feature logistic regression as ONNX: outputs ``label`` [N] int64 and ``probabilities`` [N, 2]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["z0"]),
        helper.make_node("Add", ["z0", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p"]),
        helper.make_node("Sub", ["one", "p"], ["q"]),
        helper.make_node("Concat", ["q", "p"], ["probabilities"], axis=1),
        helper.make_node("Greater", ["p", "half"], ["positive"]),
        helper.make_node("Cast", ["positive"], ["label_col"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["label_col", "flat"], ["label"]),
    ]
    init = [
        numpy_helper.from_array(np.array(weights, dtype=np.float32).reshape(3, 1), "w"),
        numpy_helper.from_array(np.array([bias], dtype=np.float32), "b"),
        numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one"),
        numpy_helper.from_array(np.array([0.5], dtype=np.float32), "half"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
    ]
    graph = helper.make_graph(
        nodes,
        "logistic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2]),
        ],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


FAIR = [3.0, 0.0, 0.0], 0.0
UNFAIR = [3.0, 0.0, 1.2], -0.6  # the group proxy moves the decision: same accuracy class, unequal outcomes
BETTER = [3.5, 0.05, 0.0], 0.0


def holdout(rows: int = 2000) -> dict[str, Any]:
    """Labels depend on income only; the protected group is independent of them; feature 3 is a proxy."""
    rng = np.random.default_rng(7)
    group = rng.integers(0, 2, rows)
    income = rng.normal(size=rows)
    labels = (income + rng.normal(scale=0.3, size=rows) > 0).astype(int)
    x = np.column_stack([income, rng.normal(size=rows), group + rng.normal(scale=0.05, size=rows)])
    return {
        "inputs": {"x": x.round(4).tolist()},
        "labels": labels.tolist(),
        "protected": ["a" if g == 0 else "b" for g in group],
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("lifecycle"), workers=1, gateways=2) as s:
        yield s


@pytest.fixture(scope="module")
def reviewer(stack: Stack) -> Iterator[AdminClient]:
    """A second admin principal (its own key), for four-eyes approvals."""
    key = stack.admin.create_key("operators", "reviewer", scopes=["admin"])["key"]
    client = AdminClient(stack.control_url, key)
    yield client
    client.close()


def _evaluated(admin: AdminClient, version: int) -> dict[str, Any]:
    admin.evaluate(MODEL, version)
    evaluation = admin.wait_for_evaluation(MODEL, version, timeout_s=60)
    assert evaluation["status"] == "succeeded", evaluation
    return dict(evaluation["report"])


def _served_version(stack: Stack, gateway: int) -> int:
    with stack.client(gateway=gateway) as http:
        r = http.post(PREDICT, json={"inputs": [[0.5, 0.0, 0.0]]})
    assert r.status_code == 200, r.text
    return int(r.headers["x-bastion-model-version"])


def test_gates_keep_an_unfair_version_out_and_four_eyes_let_a_good_one_in(stack: Stack, reviewer: AdminClient) -> None:
    uploader = stack.admin
    uploader.set_policy(MODEL, POLICY)
    info = uploader.set_holdout(MODEL, holdout())["holdout"]
    assert info["rows"] == 2000 and info["groups"] == ["a", "b"]

    # A gated model's versions wait in 'registered'; activating one directly is refused.
    with pytest.raises(AdminError, match=r"409.*promotion gates"):
        uploader.register(MODEL, logistic(*FAIR), activate=True, metadata=DOCS)
    v1 = uploader.register(MODEL, logistic(*FAIR), metadata=DOCS)
    v2 = uploader.register(MODEL, logistic(*UNFAIR), metadata=DOCS)
    assert (v1["version"], v1["stage"], v2["version"], v2["stage"]) == (1, "registered", 2, "registered")
    assert v1["signature"]["inputs"][0]["features"][0] == {"name": "income"}

    for v in (1, 2):
        uploader.set_stage(MODEL, v, "staging")
    report1, report2 = _evaluated(uploader, 1), _evaluated(uploader, 2)
    print("v1 report", report1["metrics"], report1["fairness"]["demographic_parity_difference"])
    print("v2 report", report2["metrics"], report2["fairness"]["demographic_parity_difference"])
    assert report1["rows"] == 2000 and report1["evaluated_by"] == "worker-0"
    assert report2["fairness"]["demographic_parity_difference"] > 0.1

    # v1 passes once a second principal approves it; it goes to production and takes the traffic.
    reviewer.approve(MODEL, 1)
    assert uploader.set_stage(MODEL, 1, "production")["stage"] == "production"
    wait_until(lambda: _served_version(stack, 0) == 1 and _served_version(stack, 1) == 1, 5, "v1 to serve")

    # v2 is approved too, but fails its fairness gate: the error names the gate; traffic stays on v1.
    reviewer.approve(MODEL, 2)
    with httpx.Client(base_url=stack.control_url, headers={"Authorization": f"Bearer {stack.admin_key}"}) as http:
        r = http.post(f"/admin/v1/models/{MODEL}/versions/2/stage", json={"stage": "production"})
    assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert "gate 'fairness.demographic_parity_difference' failed" in problem["detail"]
    failed = {g["gate"] for g in problem["gates"] if not g["passed"]}
    assert "fairness.demographic_parity_difference" in failed
    assert not failed & {"accuracy", "auc", "f1", "documentation", "approval", "evaluation"}, failed
    assert uploader.version(MODEL, 2)["stage"] == "staging"
    assert _served_version(stack, 0) == 1

    # v3 passes its gates but needs another principal: its uploader cannot approve it.
    v3 = uploader.register(MODEL, logistic(*BETTER), metadata=DOCS)["version"]
    uploader.set_stage(MODEL, v3, "staging")
    _evaluated(uploader, v3)
    with pytest.raises(AdminError, match=r"403.*four-eyes"):
        uploader.approve(MODEL, v3)
    with pytest.raises(AdminError, match=r"409.*gate 'approval' failed"):
        uploader.set_stage(MODEL, v3, "production")
    reviewer.approve(MODEL, v3)
    promoted = uploader.set_stage(MODEL, v3, "production")
    assert promoted["stage"] == "production" and all(g["passed"] for g in promoted["gates"])
    wait_until(lambda: _served_version(stack, 0) == 3 and _served_version(stack, 1) == 3, 5, "v3 to serve")

    # The report is stored with the version, and the history says who did what.
    stored = uploader.version(MODEL, v3)
    assert stored["evaluation"]["report"]["metrics"]["auc"] > 0.85
    actions = [(e["action"], e["by"]) for e in uploader.history(MODEL, v3)]
    reviewer_id = next(k["id"] for k in uploader.keys("operators") if k["name"] == "reviewer")
    assert ("approved", reviewer_id) in actions and ("stage", stored["created_by"]) in actions

    # Rollback returns to the previous production version; a staging version cannot be made primary.
    assert uploader.rollback(MODEL)["routes"][0]["version"] == 1
    with pytest.raises(AdminError, match=r"409.*must be in production"):
        uploader.deploy(MODEL, [{"version": 2}])


def test_documentation_gate_names_what_is_missing(stack: Stack) -> None:
    stack.admin.set_policy("undocumented", {"require_documentation": True})
    v = stack.admin.register("undocumented", logistic(*FAIR), metadata={"owner": "someone"})["version"]
    stack.admin.set_stage("undocumented", v, "staging")
    with pytest.raises(AdminError, match=r"gate 'documentation' failed: missing \['model_card', 'lineage'\]"):
        stack.admin.set_stage("undocumented", v, "production")


def test_stage_transitions_are_enforced(stack: Stack) -> None:
    admin = stack.admin
    v = admin.register("stages", logistic(*FAIR), activate=False)["version"]
    with pytest.raises(AdminError, match=r"409.*registered; it can move to"):
        admin.set_stage("stages", v, "production")
    admin.set_stage("stages", v, "retired")
    with pytest.raises(AdminError, match=r"409.*retired"):
        admin.deploy("stages", [{"version": v}])
    with pytest.raises(AdminError, match="409"):
        admin.set_stage("stages", v, "staging")


def test_a_signed_version_is_verified_and_a_model_can_require_signatures(stack: Stack) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    private = Ed25519PrivateKey.generate()
    public_pem = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    stack.admin.set_tenant("publisher", None, signing_key=public_pem)
    stack.admin.set_policy("signed", {"require_verified": True})
    data = logistic(*FAIR)
    good = base64.b64encode(private.sign(hashlib.sha256(data).digest())).decode()
    forged = base64.b64encode(Ed25519PrivateKey.generate().sign(hashlib.sha256(data).digest())).decode()

    with pytest.raises(AdminError, match=r"422.*accepts only signed versions"):
        stack.admin.register("signed", data)
    with pytest.raises(AdminError, match=r"422.*does not verify"):
        stack.admin.register("signed", data, signature=forged, signer="publisher")
    view = stack.admin.register("signed", data, signature=good, signer="publisher")
    assert view["verified"] is True and view["signed_by"] == "publisher"
    # The same signature does not carry over to other bytes.
    with pytest.raises(AdminError, match=r"422.*does not verify"):
        stack.admin.register("signed", logistic(*BETTER), signature=good, signer="publisher")


def test_a_per_model_size_limit_refuses_larger_artifacts(stack: Stack) -> None:
    data = logistic(*FAIR)
    stack.admin.set_policy("tiny", {"max_artifact_bytes": len(data) - 1})
    with pytest.raises(AdminError, match="413"):
        stack.admin.register("tiny", data)


def test_refined_ranges_are_enforced_and_the_threshold_is_applied_when_serving(stack: Stack) -> None:
    meta = {
        "signature": {
            "inputs": {"x": {"features": [{"name": "income", "min": -10, "max": 10}, {"name": "n"}, {"name": "g"}]}}
        },
        "postprocessing": {"label_output": "label", "score_output": "probabilities", "threshold": 0.9},
    }
    stack.admin.register("thresholded", logistic(*FAIR), metadata=meta)
    time.sleep(0.3)
    with stack.client() as http:
        r = http.post("/v1/models/thresholded/predict", json={"inputs": [[11.0, 0.0, 0.0]]})
        assert r.status_code == 400 and "feature 'income' must be within [-10.0, 10.0]" in r.json()["detail"]
        # p = sigmoid(3 * 0.5) = 0.82: positive at 0.5, negative at the declared threshold 0.9.
        r = http.post("/v1/models/thresholded/predict", json={"inputs": [[0.5, 0.0, 0.0], [1.0, 0.0, 0.0]]})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"]["label"] == [0, 1]


def test_bad_lifecycle_input_is_a_clear_4xx(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.admin_key}"}
    with httpx.Client(base_url=stack.control_url, headers=headers) as http:
        cases = [
            http.put(f"/admin/v1/models/{MODEL}/policy", json={"min_accuracy": 2}),
            http.put(f"/admin/v1/models/{MODEL}/policy", json={"unknown": 1}),
            http.put(f"/admin/v1/models/{MODEL}/policy", json={"max_artifact_bytes": 10**31}),  # past 64 bits
            http.put(f"/admin/v1/models/{MODEL}/policy", json={"live_accuracy_margin": 1.5}),
            http.put(f"/admin/v1/models/{MODEL}/policy", json={"live_accuracy_margin": -0.1}),
            http.put(f"/admin/v1/models/{MODEL}/policy", json={"live_accuracy_margin": "a lot"}),
            http.put(f"/admin/v1/models/{MODEL}/policy", json={"live_accuracy_margin": 0.02, "min_live_labels": 0}),
            http.put(f"/admin/v1/models/{MODEL}/policy", json={"min_live_labels": 10**12}),
            http.put(f"/admin/v1/models/{MODEL}/deployment", json={"routes": [{"version": 10**20}]}),
            http.put(f"/admin/v1/models/{MODEL}/holdout", json={"inputs": {"x": [[1, 2, 3]]}, "labels": [1, 0]}),
            http.put(f"/admin/v1/models/{MODEL}/holdout", json={"inputs": {"x": [[1]]}, "labels": [True]}),
            http.put(f"/admin/v1/models/{MODEL}/holdout", content=b"{", headers={"Content-Type": "application/json"}),
            http.put(f"/admin/v1/models/{MODEL}/holdout", content=b"x", headers={"Content-Type": "text/plain"}),
            http.post(f"/admin/v1/models/{MODEL}/versions/99/stage", json={"stage": "production"}),
            http.post(f"/admin/v1/models/{MODEL}/versions/1/stage", json={"stage": "gold"}),
            http.post(f"/admin/v1/models/{MODEL}/versions", files={"metadata": (None, "{}")}),
            http.post(
                f"/admin/v1/models/{MODEL}/versions",
                files={"artifact": ("m.onnx", logistic(*FAIR)), "metadata": (None, '{"model_card": 5}')},
            ),
            http.post(
                f"/admin/v1/models/{MODEL}/versions",
                files={
                    "artifact": ("m.onnx", logistic(*FAIR)),
                    "metadata": (None, '{"signature": {"inputs": {"x": {"features": []}}}}'),
                },
            ),
            http.post(f"/admin/v1/models/{MODEL}/versions", files={"artifact": ("m", b"x"), "other": (None, "1")}),
            http.put("/admin/v1/tenants/acme", json={"signing_key": "not a key"}),
            http.post("/admin/v1/models/nope/versions/1/evaluate"),
        ]
    for r in cases:
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["detail"]


class _Scores:
    """A test runtime (our own seam): returns fixed labels and scores for the rows it is given."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray) -> None:
        self.labels, self.scores = labels, scores

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = inputs["x"][:, 0].astype(int)
        return {"label": self.labels[rows], "probabilities": self.scores[rows]}

    def terminate(self) -> None:
        """Runs are instant: nothing to stop."""


def test_evaluation_metrics_match_scikit_learn() -> None:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    from bastion.holdout import validate
    from bastion.signature import Signature
    from bastion.worker import evaluation

    rng = np.random.default_rng(3)
    n = 500
    truth = rng.integers(0, 2, n)
    p = np.clip(truth * 0.3 + rng.random(n) * 0.7, 0, 1).round(2)  # ties on purpose
    predicted = (p > 0.5).astype(np.int64)
    groups = np.where(rng.random(n) < 0.4, "a", "b")
    signature = Signature.from_dict(
        {
            "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 1]}],
            "outputs": [
                {"name": "label", "dtype": "int64", "shape": [None]},
                {"name": "probabilities", "dtype": "float32", "shape": [None, 2]},
            ],
        }
    )
    found = validate({"inputs": {"x": [[i] for i in range(n)]}, "labels": truth.tolist(), "protected": groups.tolist()})
    model = _Scores(predicted, np.column_stack([1 - p, p]))
    report = evaluation.evaluate(model, signature, found, evaluation.Spec(holdout="h"))
    m = report["metrics"]
    assert m["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert m["f1"] == pytest.approx(f1_score(truth, predicted))
    assert m["auc"] == pytest.approx(roc_auc_score(truth, p))
    rates = {g: predicted[groups == g].mean() for g in ("a", "b")}
    tpr = {g: predicted[(groups == g) & (truth == 1)].mean() for g in ("a", "b")}
    fairness = report["fairness"]
    assert fairness["demographic_parity_difference"] == pytest.approx(abs(rates["a"] - rates["b"]))
    assert fairness["equal_opportunity_difference"] == pytest.approx(abs(tpr["a"] - tpr["b"]))
    # With a threshold the decision follows the score, not the model's own label output.
    strict = evaluation.evaluate(model, signature, found, evaluation.Spec(holdout="h", threshold=0.8))
    assert strict["metrics"]["accuracy"] == pytest.approx(accuracy_score(truth, p >= 0.8))


def test_migration_0004_puts_serving_versions_in_production(database_url: str) -> None:
    import sqlalchemy as sa

    from bastion.registry import db

    engine = db.engine_for(database_url)
    try:
        db.migrate(engine, "0003")
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO models (id, name, description, current_version, created_at) "
                    "VALUES (1, 'old', '', 1, CURRENT_TIMESTAMP)"
                )
            )
            for v in (1, 2):
                conn.execute(
                    sa.text(
                        "INSERT INTO model_versions (model_id, version, sha256, size_bytes, signature, created_by, "
                        "created_at) VALUES (1, :v, :sha, 1, '{}', 'x', CURRENT_TIMESTAMP)"
                    ),
                    {"v": v, "sha": str(v) * 64},
                )
            conn.execute(
                sa.text(
                    "INSERT INTO deployments (model_id, routes, disabled, updated_by, updated_at) VALUES "
                    "(1, :routes, false, 'x', CURRENT_TIMESTAMP)"
                ),
                {"routes": '[{"version": 1, "weight": 100, "role": "primary"}]'},
            )
        db.migrate(engine)
        with engine.connect() as conn:
            stages = dict(conn.execute(sa.text("SELECT version, stage FROM model_versions")).all())
        assert stages == {1: "production", 2: "registered"}
    finally:
        engine.dispose()
