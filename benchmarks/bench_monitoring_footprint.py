"""The Redis footprint of model monitoring, per model version and minute, and so per day.

    .venv/bin/python benchmarks/bench_monitoring_footprint.py [--minutes 10] [--rows-per-minute 2000]
        [--canary-share 0.2] [--latency-ms 2,200] [--seed 1] [--json PATH]

What a worker writes for one version is a few ``mon:`` hashes per minute (docs/monitoring.md,
"Redis keys and footprint"): the drift bins, in parts of at most 120 fields, and the traffic
per role. This script builds them with the real code and weighs them:

1. The demo model ``breast-cancer`` is registered the way ``bastion up`` registers it
   (``Registry.register_version`` with ``bastion.demo``'s artifact and metadata, reference
   sample included, into a SQLite registry in a temporary directory); the control plane's
   ``MonitoringService.annotate`` adds the version's monitoring spec to the snapshot, and the
   worker's ``VersionInfo`` is read back from it (``Snapshot.parse``).
2. A private embedded Redis (``EmbeddedRedis``) and a worker's ``Monitor`` with an injected
   clock: ``--minutes`` minutes of one-row jobs whose rows are drawn from the reference sample
   (resampled with a seeded rng), each job ``primary`` or, with probability ``--canary-share``,
   ``canary``, and aged ``--latency-ms`` (log-uniform) since enqueue. The jobs run in chunks of
   ``max_batch`` through ``run_batch`` on the demo ONNX model (``OnnxRuntime``), as a worker runs
   them, so the observer sees real outputs; ``Monitor.finished`` counts the traffic, and the
   monitor flushes as a worker does (every ``monitoring_flush_s`` of the clock, and once more
   at each minute's end).
3. Every ``mon:*`` key is weighed with ``MEMORY USAGE key SAMPLES 0``, with its type, encoding,
   field count and TTL, and grouped by minute.

Printed: keys and bytes per minute (median, min, max), one minute's keys part by part, the bins
touched against the bins in the spec (and which were never touched), the TTLs, and bytes per
minute × 1,440 as MiB per version per day. Figures only: nothing is judged here.

The counts are the same from run to run for one seed, but a key of the same contents can weigh
16 bytes more or less in another run (the server's allocation history), so compare medians.
The traffic hash has a field per role and latency bucket reached: ``--latency-ms`` decides how
many (``1,40000`` reaches all 13).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from bastion import codec, demo  # noqa: E402 - after the path set-up above
from bastion.artifacts.store import ArtifactStore  # noqa: E402
from bastion.constants import MONITOR_PREFIX, STATUS_SUCCEEDED, monitor_bins_key, monitor_traffic_key  # noqa: E402
from bastion.embedded.redis_server import EmbeddedRedis  # noqa: E402
from bastion.monitoring.bins import Layout  # noqa: E402
from bastion.monitoring.counting import PART, Monitor  # noqa: E402
from bastion.monitoring.service import MonitoringService  # noqa: E402
from bastion.queue.consumer import Outcome  # noqa: E402
from bastion.queue.envelope import Job  # noqa: E402
from bastion.redisconn import sync_client  # noqa: E402
from bastion.registry import db  # noqa: E402
from bastion.registry.service import Registry  # noqa: E402
from bastion.runtime.onnx import OnnxRuntime  # noqa: E402
from bastion.settings import Settings  # noqa: E402
from bastion.snapshot import Snapshot, VersionInfo, encode  # noqa: E402
from bastion.worker.batching import run_batch  # noqa: E402

START = 1_800_000_000.0  # the injected clock's first second (a minute boundary), as tests/test_drift.py
DAY_MINUTES = 1440
MIB = 1 << 20


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def demo_version(directory: Path, settings: Settings, client: Any) -> tuple[VersionInfo, list[list[float]]]:
    """The demo version as a worker's snapshot holds it (monitoring spec included), registered
    as ``bastion up`` registers it; and the reference sample's rows."""
    engine = db.engine_for(f"sqlite:///{directory / 'registry.db'}")
    try:
        db.migrate(engine)
        sessions = db.Sessions(db.session_factory(engine))
        registry = Registry(sessions, ArtifactStore(directory / "artifacts"), settings.max_upload_bytes)
        meta = demo.metadata()
        view = registry.register_version(demo.MODEL_NAME, demo.model_bytes(), metadata=meta)
        data = MonitoringService(settings, sessions, client, registry).annotate(registry.snapshot())
        info = Snapshot.parse(encode(data)[1]).versions[(demo.MODEL_NAME, int(view["version"]))]
    finally:
        engine.dispose()
    if not info.monitoring:
        raise SystemExit("the demo version's snapshot entry has no monitoring spec (is monitoring off?)")
    return info, meta["reference_sample"][info.signature.inputs[0].name]


def drive(
    args: argparse.Namespace, info: VersionInfo, reference: list[list[float]], monitor: Monitor, clock: Clock
) -> dict[str, Any]:
    """``--minutes`` minutes of one-row jobs through the demo model and the worker's counting
    (``clock`` is the monitor's)."""
    rng = np.random.default_rng(args.seed)
    model = OnnxRuntime().load(demo.model_bytes())
    tensor = info.signature.inputs[0]
    label = next(o for o in info.signature.outputs if o.labels)  # the demo's "label" output
    rows = np.asarray(reference, dtype=np.float32)
    low, high = np.log(args.latency_ms[0]), np.log(args.latency_ms[1])
    batch = monitor.settings.max_batch
    chunks = -(-args.rows_per_minute // batch)
    roles: Counter[str] = Counter()
    labels: Counter[int] = Counter()
    calls = 0
    for minute in range(args.minutes):
        drawn = rows[rng.integers(0, rows.shape[0], size=args.rows_per_minute)]
        canary = rng.random(args.rows_per_minute) < args.canary_share
        ages = np.exp(rng.uniform(low, high, size=args.rows_per_minute))
        for k in range(chunks):
            clock.now = START + minute * 60 + (k + 0.5) * 59 / chunks
            now_ms = clock.now * 1000
            part = range(k * batch, min((k + 1) * batch, args.rows_per_minute))
            jobs = [
                Job(
                    f"j{minute}-{i}",
                    "demo",
                    info.model,
                    info.version,
                    "sync",
                    role="canary" if canary[i] else "primary",
                    created_ms=int(now_ms - ages[i]),
                    rows=1,
                    blob=codec.encode({tensor.name: drawn[i : i + 1]}),
                )
                for i in part
            ]
            observe = monitor.observer(info, [j.role for j in jobs])
            results = run_batch(model, [j.blob for j in jobs], observe=observe)
            calls += 1
            monitor.finished([Outcome(j, STATUS_SUCCEEDED, result=r) for j, r in zip(jobs, results, strict=True)])
            monitor.flush()  # at most every monitoring_flush_s of the clock, as a worker does
            roles.update(j.role for j in jobs)
            for r in results:
                labels.update(int(v) for v in codec.decode(r)[label.name].reshape(-1))
        clock.now = START + minute * 60 + 59.5
        monitor.flush(force=True)
    names = label.labels
    return {
        "jobs": sum(roles.values()),
        "model_calls": calls,
        "jobs_by_role": dict(sorted(roles.items())),
        "labels": {(names[v] if 0 <= v < len(names) else str(v)): n for v, n in sorted(labels.items())},
    }


def weigh(client: Any, info: VersionInfo, minutes: int) -> tuple[list[dict[str, Any]], list[str], set[int]]:
    """Every ``mon:*`` key: its minute and part, type, encoding, fields, bytes and TTL; the keys
    that match no minute's expected names (should be none); and the bins counted in any minute."""
    spec = info.monitoring or {}
    parts = -(-Layout.of(spec).size // PART)
    expected: dict[str, tuple[int, str]] = {}
    for m in range(minutes):
        minute = int(START // 60) + m
        expected[monitor_traffic_key(info.model, info.version, minute)] = (minute, "traffic")
        for p in range(parts):
            expected[monitor_bins_key(info.model, info.version, minute, spec["digest"], p)] = (minute, f"bins {p}")
    found: list[dict[str, Any]] = []
    unknown: list[str] = []
    seen: set[int] = set()
    for raw in sorted(client.scan_iter(f"{MONITOR_PREFIX}*", count=1000)):
        key = raw.decode()
        if key not in expected:
            unknown.append(key)
            continue
        minute, part = expected[key]
        fields = client.hkeys(key)
        if part != "traffic":
            seen.update(int(part.split()[1]) * PART + int(f) for f in fields if f != b"n")
        found.append(
            {
                "key": key,
                "minute": minute,
                "part": part,
                "type": client.type(key).decode(),
                "encoding": client.object("encoding", key).decode(),
                "fields": len(fields),
                "bins": sum(1 for f in fields if f != b"n") if part != "traffic" else 0,
                "bytes": int(client.memory_usage(key, samples=0)),
                "ttl": int(client.ttl(key)),
            }
        )
    return found, unknown, seen


def summarise(keys: list[dict[str, Any]], seen: set[int], info: VersionInfo) -> dict[str, Any]:
    by_minute: dict[int, list[dict[str, Any]]] = {}
    for k in keys:
        by_minute.setdefault(k["minute"], []).append(k)
    totals = {m: sum(k["bytes"] for k in ks) for m, ks in by_minute.items()}
    touched = {m: sum(k["bins"] for k in ks) for m, ks in by_minute.items()}
    median = statistics.median(totals.values())
    example = min(sorted(totals), key=lambda m: abs(totals[m] - median))  # the minute nearest the median
    layout = Layout.of(info.monitoring or {})
    never = [
        f"{name} bin {j}"
        for i, name in enumerate(layout.names)
        for j in range(layout.widths[i])
        if layout.offsets[i] + j not in seen
    ]
    bin_bytes = [sum(k["bytes"] for k in ks if k["part"] != "traffic") for ks in by_minute.values()]
    return {
        "minutes": len(by_minute),
        "keys_per_minute": sorted(Counter(len(ks) for ks in by_minute.values()).items()),
        "bytes_per_minute": {"median": median, "min": min(totals.values()), "max": max(totals.values())},
        "example_minute": example,
        "example_parts": [
            {n: k[n] for n in ("part", "type", "encoding", "fields", "bytes", "ttl")}
            for k in sorted(by_minute[example], key=lambda k: (k["part"] == "traffic", k["part"]))
        ],
        "bins_in_spec": layout.size,
        "features": layout.features,
        "bins_touched_per_minute": {"min": min(touched.values()), "max": max(touched.values())},
        "bins_never_touched": never,
        "bin_hash_bytes_per_bin_touched": statistics.median(
            b / max(touched[m], 1) for b, m in zip(bin_bytes, by_minute, strict=True)
        ),
        "ttl_s": {"min": min(k["ttl"] for k in keys), "max": max(k["ttl"] for k in keys)},
        "bytes_per_day": median * DAY_MINUTES,
        "mib_per_day": median * DAY_MINUTES / MIB,
    }


def report(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    s, t = figures["summary"], figures["traffic"]
    print(
        f"server: {figures['server']}; monitoring_bins {figures['monitoring_bins']}, flush every "
        f"{figures['monitoring_flush_s']} s, retention {figures['monitoring_retention_s']} s"
    )
    print(
        f"model {figures['model']} v{figures['version']}: {s['features']} features, {s['bins_in_spec']} bins "
        f"in the spec (digest {figures['digest']}); {PART} bins per hash part"
    )
    print(
        f"traffic: {args.minutes} minutes x {args.rows_per_minute} one-row jobs = {t['jobs']} jobs in "
        f"{t['model_calls']} model calls; by role {t['jobs_by_role']}; labels {t['labels']}; "
        f"{figures['drive_s']:.1f} s"
    )
    print(
        f"mon:* keys: {figures['keys']} over {s['minutes']} minutes; keys per minute "
        + ", ".join(f"{n} ({c} minutes)" for n, c in s["keys_per_minute"])
        + (f"; {len(figures['unknown_keys'])} unexpected keys" if figures["unknown_keys"] else "")
    )
    b = s["bytes_per_minute"]
    print(
        f"bytes per minute (MEMORY USAGE ... SAMPLES 0, summed): median {b['median']:,.0f}, "
        f"min {b['min']:,}, max {b['max']:,}"
    )
    print(f"one minute ({s['example_minute']}, the nearest the median):")
    for p in s["example_parts"]:
        print(
            f"  {p['part']:<8} {p['type']} {p['encoding']:<9} {p['fields']:>4} fields {p['bytes']:>6,} bytes "
            f"ttl {p['ttl']} s"
        )
    touched = s["bins_touched_per_minute"]
    print(
        f"bins touched per minute: {touched['min']}..{touched['max']} of {s['bins_in_spec']}; never touched "
        f"in any minute: {', '.join(s['bins_never_touched']) or 'none'}"
    )
    print(f"bin hashes: {s['bin_hash_bytes_per_bin_touched']:.2f} bytes per bin touched per minute (median)")
    print(f"TTL on the keys: {s['ttl_s']['min']}..{s['ttl_s']['max']} s")
    print(
        f"per version per day: {b['median']:,.0f} bytes/minute x {DAY_MINUTES} = {s['bytes_per_day']:,.0f} bytes "
        f"= {s['mib_per_day']:.2f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--minutes", type=int, default=10, help="minutes of traffic driven (one set of keys each)")
    parser.add_argument("--rows-per-minute", type=int, default=2000, help="one-row jobs per minute")
    parser.add_argument("--canary-share", type=float, default=0.2, help="share of the jobs in role canary")
    parser.add_argument("--seed", type=int, default=1, help="seed of the rng: rows drawn, roles and latencies")
    parser.add_argument(
        "--latency-ms",
        type=lambda v: tuple(float(x) for x in v.split(",")),
        default="2,200",
        help="low,high: each job's age at completion is log-uniform between them (its latency bucket)",
    )
    parser.add_argument("--json", type=Path, help="write the figures (and every key weighed) here")
    args = parser.parse_args()
    if args.minutes < 1 or args.rows_per_minute < 1 or not 0 <= args.canary_share <= 1:
        parser.error("--minutes and --rows-per-minute must be positive, --canary-share within [0, 1]")
    if len(args.latency_ms) != 2 or not 0 < args.latency_ms[0] <= args.latency_ms[1]:
        parser.error("--latency-ms takes low,high with 0 < low <= high")

    settings = Settings()
    with tempfile.TemporaryDirectory(prefix="bastion-monfoot-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis")
        try:
            client = sync_client(server.start())
            info, reference = demo_version(Path(tmp), settings, client)
            clock = Clock(START)
            monitor = Monitor(client, settings, clock=clock)
            started = time.perf_counter()
            traffic = drive(args, info, reference, monitor, clock)
            drive_s = time.perf_counter() - started
            keys, unknown, seen = weigh(client, info, args.minutes)
            server_info = client.info("server")
            client.close()
        finally:
            server.stop()
    if not keys:
        raise SystemExit("no mon:* keys were written")
    name = str(server_info.get("server_name", "redis"))
    version = server_info.get("valkey_version") or server_info.get("redis_version")
    figures: dict[str, Any] = {
        "server": f"{name} {version}",
        "model": info.model,
        "version": info.version,
        "digest": (info.monitoring or {}).get("digest"),
        "monitoring_bins": settings.monitoring_bins,
        "monitoring_flush_s": settings.monitoring_flush_s,
        "monitoring_retention_s": settings.monitoring_retention_s,
        "options": {k: v for k, v in vars(args).items() if k != "json"},
        "traffic": traffic,
        "drive_s": drive_s,
        "keys": len(keys),
        "unknown_keys": unknown,
        "summary": summarise(keys, seen, info),
    }
    report(args, figures)
    if args.json:
        figures["weighed"] = keys
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
