"""Worker semantics on a real Redis: deadlines, idempotent outcomes, reclaim, dead letters, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import orjson
import pytest
import redis

from bastion import codec, demo, snapshot
from bastion.artifacts import onnx_check
from bastion.artifacts.store import ArtifactStore
from bastion.constants import CONSUMER_GROUP, dead_letter_key, job_key, queue_key
from bastion.queue.consumer import Consumer, Outcome
from bastion.queue.envelope import Envelope, Job
from bastion.runtime.onnx import OnnxRuntime
from bastion.settings import Settings
from bastion.worker.models import ModelCache
from bastion.worker.service import Worker
from tests.support import Stack, wait_until

MODEL = "breast-cancer"
BLOB = codec.encode({"input": np.ones((1, 30), np.float32)})


def _publish_models(client: redis.Redis, store: ArtifactStore, models: dict[str, bytes]) -> None:
    """Publish a snapshot with version 1 of each model (no routes: workers load on demand)."""
    published = {}
    for name, data in models.items():
        sig = onnx_check.inspect(data, 1 << 20).to_dict()
        published[name] = {"current": 1, "versions": {"1": {"sha256": store.put(data), "signature": sig}}}
    snapshot.publish(client, {"keys": {}, "models": published})


def _publish(client: redis.Redis, store: ArtifactStore) -> None:
    _publish_models(client, store, {MODEL: demo.model_bytes()})


def _enqueue(client: redis.Redis, job_id: str, deadline_ms: int = 0, lane: str = "batch") -> None:
    env = Envelope(
        job_id, "acme", MODEL, 1, lane, deadline_ms=deadline_ms, created_ms=int(time.time() * 1000), blob=BLOB
    )
    fields = env.fields()
    client.xadd(queue_key(MODEL, lane), dict(zip(fields[::2], fields[1::2], strict=True)))  # type: ignore[arg-type]


def _worker(client: redis.Redis, tmp_path: Path, name: str, **settings: object) -> Worker:
    s = Settings(data_dir=tmp_path, redis_url="redis://unused", **settings)  # type: ignore[arg-type]
    cache = ModelCache(ArtifactStore(tmp_path / "artifacts"), OnnxRuntime())
    worker = Worker(s, client, cache, name)
    assert worker.refresh(force=True)
    return worker


def _status(client: redis.Redis, job_id: str) -> str:
    return (client.hget(job_key(job_id), "status") or b"").decode()


def test_a_job_past_its_deadline_is_dropped_with_a_clear_result(redis_client: redis.Redis, tmp_path: Path) -> None:
    _publish(redis_client, ArtifactStore(tmp_path / "artifacts"))
    worker = _worker(redis_client, tmp_path, "w1")
    _enqueue(redis_client, "late", deadline_ms=int(time.time() * 1000) - 1)
    _enqueue(redis_client, "fine")
    worker.step()
    assert _status(redis_client, "late") == "expired"
    assert b"deadline" in redis_client.hget(job_key("late"), "error")  # type: ignore[operator]
    assert _status(redis_client, "fine") == "succeeded"


def test_the_first_outcome_wins_on_redelivery(redis_client: redis.Redis, tmp_path: Path) -> None:
    """Completing the same job twice (a redelivery) keeps the first stored result."""
    _publish(redis_client, ArtifactStore(tmp_path / "artifacts"))
    consumer = Consumer(redis_client, "c1", result_ttl_s=60, sync_result_ttl_s=60)
    consumer.ensure_groups([MODEL])
    _enqueue(redis_client, "twice")
    (job,) = consumer.read([MODEL], 10, None)
    assert consumer.complete([Outcome(job, "succeeded", result=b"first")]) == ["succeeded"]
    assert consumer.complete([Outcome(job, "failed", error="second")]) == ["succeeded"]
    assert redis_client.hget(job_key("twice"), "result") == b"first"
    assert redis_client.ttl(job_key("twice")) > 0


def test_an_abandoned_job_is_reclaimed_then_dead_lettered(redis_client: redis.Redis, tmp_path: Path) -> None:
    """A job claimed by a consumer that never acknowledges it is retried, then dead-lettered."""
    _publish(redis_client, ArtifactStore(tmp_path / "artifacts"))
    ghost = Consumer(redis_client, "ghost", result_ttl_s=60, sync_result_ttl_s=60)
    ghost.ensure_groups([MODEL])
    _enqueue(redis_client, "poison")
    stream = queue_key(MODEL, "batch")
    assert len(ghost.read([MODEL], 10, None)) == 1  # delivery 1, never acknowledged
    # Two more deliveries that also die without acknowledging:
    for _ in range(2):
        time.sleep(0.06)
        run, dead = ghost.reclaim([MODEL], min_idle_ms=50, max_deliveries=3)
        assert (len(run), len(dead)) == (1, 0)
    time.sleep(0.06)
    worker = _worker(redis_client, tmp_path, "w1", visibility_timeout_s=0.05, max_deliveries=3)
    worker.reclaim()
    assert _status(redis_client, "poison") == "dead_lettered"
    dead_entries = redis_client.xrange(dead_letter_key(MODEL))
    assert len(dead_entries) == 1 and orjson.loads(dead_entries[0][1][b"m"])["id"] == "poison"
    assert redis_client.xpending(stream, CONSUMER_GROUP)["pending"] == 0


def test_a_job_held_by_a_dead_consumer_is_run_by_another(redis_client: redis.Redis, tmp_path: Path) -> None:
    _publish(redis_client, ArtifactStore(tmp_path / "artifacts"))
    ghost = Consumer(redis_client, "ghost", result_ttl_s=60, sync_result_ttl_s=60)
    ghost.ensure_groups([MODEL])
    _enqueue(redis_client, "orphan")
    assert len(ghost.read([MODEL], 10, None)) == 1
    time.sleep(0.06)
    worker = _worker(redis_client, tmp_path, "w1", visibility_timeout_s=0.05)
    worker.reclaim()
    assert _status(redis_client, "orphan") == "succeeded"


def test_a_tampered_artifact_is_refused_and_the_job_fails_clearly(redis_client: redis.Redis, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    _publish(redis_client, store)
    path = next(p for p in (tmp_path / "artifacts").rglob("*") if p.is_file())
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    worker = _worker(redis_client, tmp_path, "w1")
    _enqueue(redis_client, "tampered")
    worker.step()
    assert _status(redis_client, "tampered") == "failed"
    error = redis_client.hget(job_key("tampered"), "error") or b""
    assert b"failed its integrity check" in error
    assert b"sha" not in error and b"found" not in error  # digests stay in the worker's log


@pytest.mark.slow
def test_sigterm_finishes_claimed_work_and_exits(tmp_path: Path) -> None:
    stack = Stack(tmp_path, workers=1).start()
    try:
        with stack.client() as http:
            ids = [
                http.post("/v1/models/breast-cancer/jobs", json={"inputs": [[1.0] * 30]}).json()["id"]
                for _ in range(50)
            ]
            stack.signal("worker-0", signal.SIGTERM)
            assert stack.wait("worker-0", 20) == 0
            rc = stack.redis_client()
            assert rc.xpending(queue_key(MODEL, "batch"), CONSUMER_GROUP)["pending"] == 0
            stack.start_worker(0)
            wait_until(
                lambda: all(http.get(f"/v1/jobs/{i}").json()["status"] == "succeeded" for i in ids), 30, "all jobs"
            )
    finally:
        stack.stop()


@pytest.mark.slow
def test_worker_exports_batch_inference_and_queue_metrics(tmp_path: Path) -> None:
    from bastion.embedded.redis_server import free_port

    port = free_port()
    stack = Stack(tmp_path, workers=1, worker_metrics_port=port).start()
    try:
        with stack.client() as http:
            for _ in range(3):
                assert http.post("/v1/models/breast-cancer/predict", json={"inputs": [[1.0] * 30]}).status_code == 200
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'bastion_worker_batch_jobs_count{model="breast-cancer"}' in text
        assert "bastion_worker_inference_seconds_bucket" in text
        assert 'bastion_worker_jobs_total{model="breast-cancer",status="succeeded"} 3.0' in text
        assert 'bastion_queue_depth{lane="sync",model="breast-cancer"}' in text
    finally:
        stack.stop()


def _graph_model(node: onnx.NodeProto, inputs: list[onnx.ValueInfoProto], output: onnx.ValueInfoProto) -> bytes:
    graph = onnx.helper.make_graph([node], "g", inputs, [output])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _enqueue_to(client: redis.Redis, model: str, job_id: str, tensors: dict[str, np.ndarray], tenant: str) -> None:
    fields = Envelope(
        job_id, tenant, model, 1, "batch", created_ms=int(time.time() * 1000), blob=codec.encode(tensors)
    ).fields()
    client.xadd(queue_key(model, "batch"), dict(zip(fields[::2], fields[1::2], strict=True)))  # type: ignore[arg-type]


def test_a_model_onnxruntime_cannot_load_fails_its_jobs_and_the_worker_keeps_serving(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    f = onnx.TensorProto.FLOAT
    broken = _graph_model(  # passes onnx.checker, refused by onnxruntime (Add of float and int64)
        onnx.helper.make_node("Add", ["a", "b"], ["y"]),
        [
            onnx.helper.make_tensor_value_info("a", f, [None, 2]),
            onnx.helper.make_tensor_value_info("b", onnx.TensorProto.INT64, [None, 2]),
        ],
        onnx.helper.make_tensor_value_info("y", f, [None, 2]),
    )
    _publish_models(redis_client, ArtifactStore(tmp_path / "artifacts"), {MODEL: demo.model_bytes(), "broken": broken})
    worker = _worker(redis_client, tmp_path, "w1")
    _enqueue_to(
        redis_client, "broken", "b1", {"a": np.ones((1, 2), np.float32), "b": np.ones((1, 2), np.int64)}, "acme"
    )
    _enqueue(redis_client, "good")
    worker.step()
    assert _status(redis_client, "b1") == "failed"
    assert b"could not be loaded" in redis_client.hget(job_key("b1"), "error")  # type: ignore[operator]
    assert _status(redis_client, "good") == "succeeded"


def test_outputs_that_mix_rows_are_never_split_across_tenants(redis_client: redis.Redis, tmp_path: Path) -> None:
    """A model whose output is not one row per input row runs each job alone."""
    f = onnx.TensorProto.FLOAT
    reduce_sum = _graph_model(
        onnx.helper.make_node("ReduceSum", ["x"], ["y"], keepdims=1),
        [onnx.helper.make_tensor_value_info("x", f, [None, 2])],
        onnx.helper.make_tensor_value_info("y", f, [None, 1]),
    )
    _publish_models(redis_client, ArtifactStore(tmp_path / "artifacts"), {"summer": reduce_sum})
    worker = _worker(redis_client, tmp_path, "w1")
    _enqueue_to(redis_client, "summer", "acme-job", {"x": np.array([[1, 2]], np.float32)}, "acme")
    _enqueue_to(redis_client, "summer", "globex-job", {"x": np.array([[100, 200]], np.float32)}, "globex")
    worker.step()
    for job_id, expected in (("acme-job", 3.0), ("globex-job", 300.0)):
        assert _status(redis_client, job_id) == "succeeded"
        result = codec.decode(redis_client.hget(job_key(job_id), "result"))  # type: ignore[arg-type]
        assert result["y"].ravel().tolist() == [expected]


def test_a_version_registered_as_not_row_independent_is_never_batched(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Softmax across the batch has row-shaped outputs, so only the uploader's flag can keep it apart."""
    f = onnx.TensorProto.FLOAT
    across_rows = _graph_model(
        onnx.helper.make_node("Softmax", ["x"], ["y"], axis=0),
        [onnx.helper.make_tensor_value_info("x", f, [None, 1])],
        onnx.helper.make_tensor_value_info("y", f, [None, 1]),
    )
    store = ArtifactStore(tmp_path / "artifacts")
    sig = onnx_check.inspect(across_rows, 1 << 20)
    assert sig.batchable  # the shapes alone would allow batching
    flagged = {**sig.to_dict(), "rows_independent": False}
    snapshot.publish(
        redis_client,
        {
            "keys": {},
            "models": {
                "sm": {"current": 1, "versions": {"1": {"sha256": store.put(across_rows), "signature": flagged}}}
            },
        },
    )
    worker = _worker(redis_client, tmp_path, "w1")
    _enqueue_to(redis_client, "sm", "a", {"x": np.array([[1.0]], np.float32)}, "acme")
    _enqueue_to(redis_client, "sm", "b", {"x": np.array([[5.0]], np.float32)}, "globex")
    worker.step()
    for job_id in ("a", "b"):
        result = codec.decode(redis_client.hget(job_key(job_id), "result"))  # type: ignore[arg-type]
        assert result["y"].ravel().tolist() == [1.0], "each job ran alone: softmax over its own single row"


def test_routed_versions_are_loaded_warm_and_unrouted_ones_unloaded(redis_client: redis.Redis, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    data = demo.model_bytes()
    sig = onnx_check.inspect(data, 1 << 20).to_dict()
    versions = {str(v): {"sha256": store.put(data), "signature": sig} for v in (1, 2)}

    def publish(routes: list[dict[str, object]]) -> None:
        model = {"current": 1, "routes": routes, "versions": versions}
        snapshot.publish(redis_client, {"keys": {}, "models": {MODEL: model}})

    publish([{"version": 1, "weight": 90, "role": "primary"}, {"version": 2, "weight": 10, "role": "canary"}])
    worker = _worker(redis_client, tmp_path, "w1")
    assert worker.cache.loaded_versions() == {(MODEL, 1), (MODEL, 2)}
    publish([{"version": 1, "weight": 100, "role": "primary"}])
    worker.refresh()
    assert worker.cache.loaded_versions() == {(MODEL, 1)}


def test_a_runaway_call_is_stopped_its_batch_mates_answered_and_it_is_dead_lettered(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    from tests.chaos.models import runaway_model

    _publish_models(redis_client, ArtifactStore(tmp_path / "artifacts"), {"runaway": runaway_model()})
    stream = queue_key("runaway", "batch")

    def enqueue(job_id: str, value: float) -> None:
        blob = codec.encode({"x": np.full((1, 30), value, np.float32)})
        fields = Envelope(job_id, "acme", "runaway", 1, "batch", created_ms=int(time.time() * 1000), blob=blob).fields()
        redis_client.hset(job_key(job_id), mapping={"status": "queued", "tenant": "acme", "model": "runaway"})
        redis_client.xadd(stream, dict(zip(fields[::2], fields[1::2], strict=True)))  # type: ignore[arg-type]

    enqueue("runaway", 1000.0)  # first in the batch: its value sizes the whole call's matrix
    for i in range(3):
        enqueue(f"mate{i}", 1.0)
    worker = _worker(redis_client, tmp_path, "w1", visibility_timeout_s=0.2, max_job_s=0.3, max_deliveries=2)
    t0 = time.monotonic()
    worker.step()  # the batched call is stopped; each job then runs alone; only the runaway is stopped again
    took = time.monotonic() - t0
    assert [_status(redis_client, f"mate{i}") for i in range(3)] == ["succeeded"] * 3
    assert _status(redis_client, "runaway") == "running"
    (pending,) = redis_client.xpending_range(stream, CONSUMER_GROUP, "-", "+", 10)
    assert pending["times_delivered"] == 1, "released without a delivery charged"
    assert pending["time_since_delivered"] >= 200, "released: idle past the visibility timeout at once"
    assert 0.5 < took < 5, "stopped twice at about max_job_s each"
    worker.reclaim()  # delivery 2: stopped again, released
    worker.reclaim()  # past max_deliveries: dead-lettered
    assert _status(redis_client, "runaway") == "dead_lettered"
    assert redis_client.xpending(stream, CONSUMER_GROUP)["pending"] == 0


def _held_job(client: redis.Redis, job_id: str) -> tuple[Consumer, Job]:
    """A job that consumer w1 has read from its stream and holds (for a heartbeat to touch)."""
    stream = queue_key(MODEL, "batch")
    client.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    entry = client.xadd(stream, {"x": "1"}).decode()  # type: ignore[union-attr]
    client.xreadgroup(CONSUMER_GROUP, "w1", {stream: ">"})
    job = Envelope(job_id, "acme", MODEL, 1, "batch")
    held = Job(**{f: getattr(job, f) for f in Envelope.__slots__}, stream=stream, entry_id=entry)  # type: ignore[attr-defined]
    return Consumer(client, "w1", result_ttl_s=60, sync_result_ttl_s=60), held


class _StartsLate:
    """A model call whose thread is held up past the time limit before the run begins and that,
    like onnxruntime, clears its stop flag when the run begins; it gives up on its own after
    ``run_s`` (then the watchdog missed it)."""

    def __init__(self, held_s: float, run_s: float) -> None:
        self.held_s, self.run_s, self.stop = held_s, run_s, False

    def terminate(self) -> None:
        self.stop = True

    def run(self) -> None:
        time.sleep(self.held_s)
        self.stop = False
        ends = time.monotonic() + self.run_s
        while time.monotonic() < ends:
            if self.stop:
                raise RuntimeError("stopped")
            time.sleep(0.002)


def test_a_call_that_begins_after_the_watchdogs_first_stop_is_stopped_too(redis_client: redis.Redis) -> None:
    from bastion.worker.heartbeat import Heartbeat, TimeLimited

    consumer, held = _held_job(redis_client, "late")
    model = _StartsLate(held_s=0.3, run_s=3.0)
    t0 = time.monotonic()
    with Heartbeat(consumer, [held], visibility_timeout_s=0.2, max_job_s=0.1, exit_grace_s=30) as beat:
        with pytest.raises(TimeLimited), beat.call(model):
            model.run()
    assert time.monotonic() - t0 < 1.5, "the call ran on to its own end: the first stop was lost"


def test_a_call_that_ignores_the_stop_gets_the_whole_grace_before_the_worker_exits(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grace counts from the first stop, not from the deadline: a tick longer than the grace
    (a long visibility timeout, a slow Redis touch) must not stop the call and end the worker at once."""
    from bastion.worker import heartbeat

    events: list[tuple[str, float]] = []

    class Deaf:
        def terminate(self) -> None:
            events.append(("stop", time.monotonic()))

    monkeypatch.setattr(heartbeat.os, "_exit", lambda code: events.append((f"exit {code}", time.monotonic())))
    consumer, held = _held_job(redis_client, "deaf")
    with heartbeat.Heartbeat(consumer, [held], visibility_timeout_s=0.3, max_job_s=0.4, exit_grace_s=0.001) as beat:
        assert beat.interval == pytest.approx(0.1)  # ticks far longer than the grace
        with beat.call(Deaf()):
            time.sleep(0.75)  # deaf to the stop: past the deadline by more than two ticks
    stops = [at for what, at in events if what == "stop"]
    exits = [at for what, at in events if what.startswith("exit")]
    assert stops and exits, events
    assert exits[0] - stops[0] >= 0.05, "the worker exited on the tick that first stopped the call"


def test_a_job_run_in_a_child_process_answers_the_same_and_a_killed_child_is_reported() -> None:
    from bastion.worker.isolation import ChildDied, run_isolated

    loaded = OnnxRuntime().load(demo.model_bytes())
    children: list[int] = []
    isolated = run_isolated(loaded, BLOB, lambda child: children.append(child.pid))
    assert codec.decode(isolated)["probabilities"].tolist() == loaded.run(codec.decode(BLOB))["probabilities"].tolist()
    assert children and children[0] != os.getpid()

    from tests.chaos.models import runaway_model

    runaway = OnnxRuntime().load(runaway_model())
    hostile = codec.encode({"x": np.full((1, 30), 1000.0, np.float32)})
    with pytest.raises(ChildDied, match="signal 9"):
        run_isolated(runaway, hostile, lambda child: child.terminate())  # what the OOM killer does
    assert runaway.run({"x": np.ones((1, 30), np.float32)})["y"].tolist() == [[1.0]], "the worker's copy is unharmed"


@pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true", reason="needs root for a pid namespace")
def test_the_prefork_loop_runs_when_the_master_is_pid_1(tmp_path: Path) -> None:
    """In a container the worker's master is PID 1: its forked loop must still run (it once took
    "my parent is 1" for "my master died" and exited at once)."""
    script = tmp_path / "master.py"
    script.write_text(
        "import os, sys\n"
        "from bastion.worker.prefork import Prefork\n"
        "marker = sys.argv[1]\n"
        "def serve():\n"
        "    open(marker, 'w').write(str(os.getppid()))\n"
        "pid = Prefork(serve)._fork()\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.WEXITSTATUS(status))\n"
    )
    marker = tmp_path / "ran"
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script), str(marker)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "1"  # the loop ran, and its master was PID 1
