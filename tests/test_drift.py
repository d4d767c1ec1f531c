"""Drift, judged the way the control plane judges it: live rows counted by the worker's Monitor
into a real Redis (per-minute hashes, an injected clock), read back and judged by
MonitoringService and bastion.monitoring.drift against a threshold calibrated for the sample size."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import redis

from bastion import codec
from bastion.constants import MONITOR_PREFIX
from bastion.monitoring import bins, drift
from bastion.monitoring.counting import Monitor
from bastion.monitoring.service import MinuteCounts
from bastion.redisconn import sync_client
from bastion.settings import Settings
from bastion.signature import Feature, Signature, TensorSpec
from bastion.snapshot import VersionInfo
from bastion.worker.batching import run_batch

FEATURES = 12
REFERENCE_ROWS = 5000
ROWS_PER_MINUTE = 1000
CALLS_PER_MINUTE = 10
WINDOW_S = 300  # five one-minute buckets


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _signature() -> Signature:
    columns = tuple(Feature(f"f{i}") for i in range(FEATURES))
    return Signature(
        (TensorSpec("x", "float32", (None, FEATURES), columns),),
        (
            TensorSpec("label", "int64", (None,), labels=("no", "yes")),
            TensorSpec("probabilities", "float32", (None, 2)),
        ),
    )


def _draw(rng: np.random.Generator, rows: int, shift: dict[int, float] | None = None) -> np.ndarray:
    """Independent features: normal, skewed, uniform, and a discrete one with three values."""
    x = rng.standard_normal((rows, FEATURES))
    x[:, 1] = rng.exponential(size=rows)
    x[:, 2] = rng.integers(0, 3, size=rows)
    x[:, 3] = rng.uniform(size=rows)
    sd = {1: 1.0, 2: np.sqrt(2 / 3), 3: np.sqrt(1 / 12)}
    for column, by in (shift or {}).items():
        x[:, column] += by * sd.get(column, 1.0)
    return x


def _outputs(x: np.ndarray) -> dict[str, np.ndarray]:
    p = 1 / (1 + np.exp(-x[:, 0]))
    return {"label": (p >= 0.5).astype(np.int64), "probabilities": np.stack([1 - p, p], axis=1)}


class Rig:
    """One version's reference, a worker Monitor and a control-side judge, on one Redis."""

    def __init__(self, client: redis.Redis, seed: int) -> None:
        self.client = client
        self.rng = np.random.default_rng(seed)
        self.clock = Clock(1_800_000_000.0)
        self.settings = Settings(
            monitoring_flush_s=1, drift_window_s=WINDOW_S, drift_interval_s=60, drift_min_rows=100, drift_alpha=0.01
        )
        reference = _draw(self.rng, REFERENCE_ROWS)
        self.spec = bins.spec(_signature(), {"x": reference.tolist()}, self.settings.monitoring_bins)
        self.info = VersionInfo("m", seed + 1, "0" * 64, _signature(), None, self.spec)
        self.monitor = Monitor(client, self.settings, clock=self.clock)
        self.counts = MinuteCounts(client, self.settings, clock=self.clock)  # the control plane's reader

    def minute(self, shift: dict[int, float] | None = None) -> dict[str, Any]:
        """One minute of traffic through the worker's observer, flushed, then judged at its end."""
        for _ in range(CALLS_PER_MINUTE):
            x = _draw(self.rng, ROWS_PER_MINUTE // CALLS_PER_MINUTE, shift)
            observe = self.monitor.observer(self.info, ["primary"])
            assert observe is not None
            observe({"x": x.astype(np.float32)}, _outputs(x))
            self.clock.now += 60 / CALLS_PER_MINUTE - 0.01
            self.monitor.flush()
        self.clock.now += 0.01 * CALLS_PER_MINUTE
        self.monitor.flush(force=True)
        looks = drift.looks(WINDOW_S, self.settings.drift_interval_s)
        return self.counts.judge("m", self.info.version, self.spec, WINDOW_S, self.clock.now - 1, looks)


def test_reference_traffic_raises_at_most_one_false_alarm_in_20_runs_of_5_minutes(redis_client: redis.Redis) -> None:
    alarms = []
    for seed in range(20):
        rig = Rig(redis_client, seed)
        for minute in range(5):
            judged = rig.minute()
            assert judged["judged"] and judged["rows"] == ROWS_PER_MINUTE * (minute + 1)
            if judged["alarm"]:
                alarms.append((seed, minute, judged["drifted"]))
    assert len(alarms) <= 1, alarms


@pytest.mark.parametrize("column", [0, 1, 3])
def test_a_feature_shifted_half_a_deviation_alarms_within_two_windows_and_no_other(
    redis_client: redis.Redis, column: int
) -> None:
    rig = Rig(redis_client, 100 + column)
    for _ in range(5):
        assert not rig.minute()["alarm"]
    raised_after = None
    for minute in range(1, 2 * WINDOW_S // 60 + 1):
        judged = rig.minute(shift={column: 0.5})
        assert set(judged["drifted"]) <= {f"f{column}"}, judged["drifted"]
        if judged["alarm"] and raised_after is None:
            raised_after = minute
    assert raised_after is not None and raised_after <= 2 * WINDOW_S // 60
    assert judged["drifted"] == [f"f{column}"]
    psi = {f["feature"]: f for f in judged["features"]}
    assert psi[f"f{column}"]["psi"] > psi[f"f{column}"]["threshold"]


def test_thresholds_shrink_with_the_sample_and_counts_live_in_expiring_minute_hashes(redis_client: redis.Redis) -> None:
    """The calibrated threshold follows (1/n + 1/m): four times the rows, about a quarter of the
    threshold (a fixed PSI cut-off would not); every key the worker wrote has a TTL."""
    small = drift.threshold(1000, 10**9, 10, 0.01, 12)
    large = drift.threshold(4000, 10**9, 10, 0.01, 12)
    assert large == pytest.approx(small / 4, rel=1e-3)
    rig = Rig(redis_client, 7)
    rig.minute()
    keys = list(redis_client.scan_iter(f"{MONITOR_PREFIX}*"))
    assert keys and all(0 < redis_client.ttl(k) <= rig.settings.monitoring_retention_s for k in keys)
    assert all(redis_client.hlen(k) <= 128 for k in keys)  # small hashes: listpack-encoded


def test_discrete_reference_gets_one_bin_per_value_range_and_no_empty_bin() -> None:
    values = np.array([0.0] * 700 + [1.0] * 300)
    edges = bins.cut(values, 10)
    counts = np.bincount(np.searchsorted(edges, values, side="right"))
    assert list(edges) == [1.0] and list(counts) == [700, 300]


class _Doubling:
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"] * 2}

    def terminate(self) -> None:
        pass


def test_an_observer_that_fails_never_fails_the_batch() -> None:
    def broken(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], rows: Any = None) -> None:
        raise RuntimeError("boom")

    blobs = [codec.encode({"x": np.ones((2, 3), dtype=np.float32)}) for _ in range(3)]
    answers = run_batch(_Doubling(), blobs, observe=broken)
    assert [codec.decode(a)["y"].tolist() for a in answers] == [[[2.0] * 3] * 2] * 3


def test_counts_a_flush_could_not_write_are_kept_for_the_next(redis_client: redis.Redis) -> None:
    rig = Rig(redis_client, 3)
    rig.monitor.client = sync_client("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)  # nothing listens
    observe = rig.monitor.observer(rig.info, ["primary"])
    assert observe is not None
    x = _draw(rig.rng, 150)
    observe({"x": x}, _outputs(x))
    rig.monitor.flush(force=True)  # refused: kept
    assert not list(redis_client.scan_iter(f"{MONITOR_PREFIX}*"))
    rig.monitor.client = redis_client
    rig.monitor.flush(force=True)
    judged = rig.counts.judge("m", rig.info.version, rig.spec, WINDOW_S, rig.clock.now, 1)
    assert judged["rows"] == 150 and all(f["rows"] == 150 for f in judged["features"])


def test_a_model_answering_ever_new_labels_adds_a_bounded_number_of_label_series(redis_client: redis.Redis) -> None:
    """The predicted-label counter's children are capped per version and role across flushes,
    not per flush: a model whose integer output follows its inputs cannot grow the worker's
    Prometheus registry without bound."""
    from bastion import metrics
    from bastion.monitoring.counting import MAX_LABELS

    rig = Rig(redis_client, 11)
    observe = rig.monitor.observer(rig.info, ["primary"])
    assert observe is not None
    for flush in range(20):
        x = _draw(rig.rng, 50)
        outputs = _outputs(x)
        outputs["label"] = np.arange(flush * 50, flush * 50 + 50, dtype=np.int64)  # 1000 distinct values
        observe({"x": x}, outputs)
        rig.monitor.flush(force=True)
    version = str(rig.info.version)
    children = {
        s.labels["label"]
        for family in metrics.PREDICTED_LABELS.collect()
        for s in family.samples
        if s.name.endswith("_total") and s.labels["model"] == "m" and s.labels["version"] == version
    }
    assert MAX_LABELS <= len(children) <= MAX_LABELS + 1 and "other" in children
