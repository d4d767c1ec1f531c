"""What every finding's replay shares: the context, the measured windows and the verdict rules.

A replay is ``prepare`` (not measured: keys, models, payloads), a quiet baseline window, then
``attack`` while the stack's processes are sampled; the victim's latencies of both windows come
from its log. The verdict is PASS only when every check holds:

* unauthenticated replays (1, 2, 3, 7): the victim's p99 during the attack is at most 2x its
  baseline p99, with a floor of 5 ms under the baseline (a sub-millisecond baseline would turn
  scheduling noise into a failure) — the issue's rule; a tenant replay spends its own budget on a
  2-core machine, so its victim p99 is printed next to the baseline but is not a verdict;
* every replay: the victim gets no error, and no process of the stack was restarted;
* every replay: every process stays under ``PROCESS_BOUND_MB`` of its own RSS (the benchmark's
  bound: no setting of Bastion names one), and a process's children under ``CHILD_BOUND_MB``
  (the ONNX check subprocess's configured address-space limit);
* tenant replays (4, 5, 6) also: Redis has a ``maxmemory`` (FAIL "unbounded" otherwise) and its
  used memory stays under it;
* and the finding's own checks (refused, closed, capped...), listed with each finding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from edges.stack import Sampler, Stack, Window

P99_FACTOR = 2.0
P99_FLOOR_MS = 5.0
PROCESS_BOUND_MB = 1024.0
CHILD_BOUND_MB = 2048.0  # --artifact-check-memory-mb, passed explicitly (see bench_edges.BOUND_FLAGS)
MODEL = "breast-cancer"
PREDICT = f"/v1/models/{MODEL}/predict"


@dataclass
class Scale:
    """How hard each attack pushes; ``--quick`` shrinks it."""

    baseline_s: float = 5.0
    header_mb: int = 20
    header_conns: int = 4
    header_count: int = 20_000
    token_mb: int = 8
    slow_conns: int = 1000
    slow_s: float = 22.0
    admin_body_mb: int = 64
    job_s: float = 15.0
    job_threads: int = 4
    streams: int = 1000
    stream_hold_s: float = 8.0
    revoke_watch_s: float = 12.0
    bomb_mb: int = 48
    metadata_mb: int = 4
    netout_s: float = 8.0

    @classmethod
    def quick(cls) -> Scale:
        return cls(
            baseline_s=3.0,
            header_mb=10,
            header_count=10_000,
            token_mb=4,
            slow_conns=300,
            slow_s=18.0,
            admin_body_mb=32,
            job_s=8.0,
            streams=300,
            stream_hold_s=5.0,
            revoke_watch_s=10.0,
            bomb_mb=16,
            metadata_mb=2,
            netout_s=5.0,
        )


@dataclass
class Latency:
    count: int
    errors: int  # transport errors and timeouts
    non_200: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    def text(self) -> str:
        extra = f", {self.errors} errors" if self.errors else ""
        extra += f", {self.non_200} non-200" if self.non_200 else ""
        return f"p50 {self.p50_ms:.1f} / p99 {self.p99_ms:.1f} ms (n={self.count}{extra})"


def _rank(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


class VictimLog:
    """Reads the victim process's log: one line per response (scheduled time, latency, status)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def window(self, start: float, end: float) -> Latency:
        latencies: list[float] = []
        errors = non_200 = 0
        for line in self.path.read_text().splitlines():
            parts = line.split()
            if len(parts) != 3:
                continue
            scheduled, latency, status = float(parts[0]), float(parts[1]), int(parts[2])
            if not start <= scheduled < end:
                continue
            latencies.append(latency * 1000)
            errors += status == 0
            non_200 += status not in (0, 200)
        latencies.sort()
        return Latency(
            len(latencies),
            errors,
            non_200,
            _rank(latencies, 0.5),
            _rank(latencies, 0.99),
            latencies[-1] if latencies else math.nan,
        )


@dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    """What one attack returns: what the attacker got, its own checks, figures worth printing."""

    attacker: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def got(self, line: str) -> None:
        self.attacker.append(line)

    def check(self, what: str, ok: bool, detail: str = "") -> None:
        self.checks.append(Check(what, ok, detail))


@dataclass
class Context:
    stack: Stack
    admin: Any  # an AdminClient-like object (admin.py), built against the stack's admin URL
    scale: Scale
    victim: VictimLog
    victim_key: str
    sampler: Sampler
    idle_ops: float = 0.0  # Redis commands/s with only the victim running, measured at the start

    def new_key(self, tenant: str, label: str) -> tuple[str, str]:
        """A fresh standard-tier key (id, secret) of ``tenant``, once the gateways accept it."""
        made = self.admin.create_key(tenant, label, ["predict", "jobs"], "standard")
        wait_key(self.stack, made["key"])
        return str(made["id"]), str(made["key"])


def wait_key(stack: Stack, key: str, timeout_s: float = 20.0) -> None:
    """Until the gateways know ``key`` (a job lookup answers 404, not 401)."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=stack.gateway(), headers={"Authorization": f"Bearer {key}"}, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if client.get("/v1/jobs/edges-probe").status_code == 404:
                return
            time.sleep(0.2)
    raise RuntimeError("a new key was not accepted by the gateways within 20 s")


@dataclass
class Finding:
    number: int
    title: str
    kind: str  # "unauthenticated" or "tenant"
    scale: Callable[[Scale], str]
    attack: Callable[[Context, Any], Report]
    prepare: Callable[[Context], Any] | None = None


@dataclass
class Result:
    number: int
    title: str
    kind: str
    scale: str
    report: Report
    baseline: Latency
    during: Latency
    window: Window
    redis_before: dict[str, Any]
    redis_after: dict[str, Any]
    seconds: float
    settle_s: float
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def ratio(self) -> float:
        return self.during.p99_ms / max(self.baseline.p99_ms, P99_FLOOR_MS)


def _common_checks(result: Result) -> list[Check]:
    checks = []
    floor = max(result.baseline.p99_ms, P99_FLOOR_MS)
    moved = f"{result.baseline.p99_ms:.1f} -> {result.during.p99_ms:.1f} ms ({result.ratio:.2f}x of {floor:.1f})"
    if result.kind == "tenant":
        checks.append(
            Check("victim gets no error", result.during.errors == 0, f"{result.during.errors} errors; p99 {moved}")
        )
    else:
        checks.append(
            Check(
                f"victim p99 <= {P99_FACTOR:g}x baseline (floor {P99_FLOOR_MS:g} ms)",
                result.during.p99_ms <= P99_FACTOR * floor and result.during.errors == 0,
                f"{moved}, {result.during.errors} victim errors",
            )
        )
    own = result.window.peak_rss_mb
    worst = max(own, key=lambda name: own[name]) if own else "-"
    checks.append(
        Check(
            f"every process under {PROCESS_BOUND_MB:g} MB RSS",
            all(v <= PROCESS_BOUND_MB for v in own.values()),
            f"largest {worst} {own.get(worst, 0):.0f} MB",
        )
    )
    children = result.window.peak_child_rss_mb
    if any(children.values()):
        worst_child = max(children, key=lambda name: children[name])
        checks.append(
            Check(
                f"children of a process under {CHILD_BOUND_MB:g} MB RSS",
                all(v <= CHILD_BOUND_MB for v in children.values()),
                f"largest: children of {worst_child} {children[worst_child]:.0f} MB",
            )
        )
    checks.append(
        Check("no process restarted", not result.window.restarted, ", ".join(result.window.restarted) or "none")
    )
    if result.kind == "tenant":
        maxmemory = int(result.redis_after.get("maxmemory_config", 0))
        used = int(result.redis_after.get("used_memory", 0))
        if maxmemory:
            checks.append(
                Check(
                    "Redis under its maxmemory", used <= maxmemory, f"{used / 2**20:.1f} of {maxmemory / 2**20:.0f} MB"
                )
            )
        else:
            checks.append(Check("Redis under its maxmemory", False, "unbounded: maxmemory is not set"))
    return checks


def redis_ops(stack: Stack, seconds: float = 1.0) -> float:
    """Redis commands per second over the next ``seconds``."""
    before = int(stack.redis_info()["total_commands_processed"])
    time.sleep(seconds)
    return (int(stack.redis_info()["total_commands_processed"]) - before) / seconds


def settle(ctx: Context, timeout_s: float = 30.0) -> float:
    """Wait until Redis is back to the victim-only command rate (what a past attack left running
    on the server, e.g. streams whose clients are gone, must not count as this one's baseline);
    the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if redis_ops(ctx.stack) <= ctx.idle_ops * 1.3 + 200:
            break
    return time.monotonic() - started


def run(ctx: Context, finding: Finding) -> Result:
    """Prepare, settle, measure a quiet baseline, attack while sampling; the result with its verdict."""
    started = time.monotonic()
    state = finding.prepare(ctx) if finding.prepare is not None else None
    settled = settle(ctx)
    base_start = time.monotonic()
    time.sleep(ctx.scale.baseline_s)
    base_end = time.monotonic()
    before = ctx.stack.redis_info()
    ctx.sampler.start()
    attack_start = time.monotonic()
    try:
        report = finding.attack(ctx, state)
    finally:
        attack_end = time.monotonic()
        window = ctx.sampler.stop()
    after = ctx.stack.redis_info()
    time.sleep(0.6)  # the victim flushes its log every 0.25 s
    result = Result(
        finding.number,
        finding.title,
        finding.kind,
        finding.scale(ctx.scale),
        report,
        ctx.victim.window(base_start, base_end),
        ctx.victim.window(attack_start, attack_end),
        window,
        before,
        after,
        time.monotonic() - started,
        settled,
    )
    result.checks = [*report.checks, *_common_checks(result)]
    return result
