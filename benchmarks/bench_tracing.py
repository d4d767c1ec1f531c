"""Predict throughput with tracing off and on (exporting to a receiver in this process), in one run.

    .venv/bin/python benchmarks/bench_tracing.py [--duration 10] [--concurrency 64] [--rounds 1] [--json PATH]
    .venv/bin/python benchmarks/bench_tracing.py --paired --duration 15      # side by side: a busy machine
    .venv/bin/python benchmarks/bench_tracing.py --src /tmp/base/src --modes off      # another checkout's code
    .venv/bin/python benchmarks/bench_tracing.py --baseline-src /tmp/base/src          # A/B in one run
    .venv/bin/python benchmarks/bench_tracing.py --micro      # the tracing code's own CPU time, no stack

Each mode starts ``bastion up --gateways 2 --workers 1`` (``bench_predict.BastionStack``: a fresh
data directory, free ports, the demo model), gives it ``--warmup-s`` of load, then runs
``loadgen.py`` (pinned to one CPU) at ``--concurrency`` against ``POST /v1/models/breast-cancer/predict``
for ``--duration`` seconds, and stops it. Modes:

- ``off``: no ``OTEL_*`` variable (tracing off, the default);
- ``on``: ``OTEL_TRACES_EXPORTER=otlp`` and ``OTEL_EXPORTER_OTLP_ENDPOINT`` naming the OTLP/HTTP
  receiver this script runs on 127.0.0.1 (it decodes every export with opentelemetry-proto and
  counts the spans per process, so an "on" run that exported nothing shows);
- ``base`` (only with ``--baseline-src``): tracing off, running the code under that ``src/``.

``--paired`` runs the modes at the same time instead, each with its own stack and load generator:
on a machine other work keeps busy, runs one after the other see different loads and their ratio
is noise, while stacks running side by side share the same load (each gets a share of the CPU,
so their req/s are lower than a run alone, but their ratio is the ratio of their costs). Their
start order alternates by round, and the median of the per-round ratios is printed beside the
ratio of the medians.

``--src`` runs every mode on the code under that ``src/`` (``PYTHONPATH``), as bench_edges.py's
option does. ``--rounds N`` repeats the modes, alternating their order; the medians and the ratios
to ``off`` (and to ``base``) are printed. The machine is shared: compare figures of one run only.
``--otel NAME=VALUE`` adds a variable to mode ``on`` (a sampler, say). Arguments this script does
not know go to ``bastion up``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_predict as bp  # noqa: E402 - after the path set-up above

OTEL_NAMES = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class Receiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1 that decodes each export and counts its spans."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.lock = threading.Lock()
        self.spans: dict[str, int] = {}
        self.exports = 0
        self.bytes = 0
        receiver = self
        answer = ExportTraceServiceResponse().SerializeToString()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a collector

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                request = ExportTraceServiceRequest.FromString(body)
                counted: dict[str, int] = {}
                for resource_spans in request.resource_spans:
                    process = next(
                        (
                            a.value.string_value
                            for a in resource_spans.resource.attributes
                            if a.key == "bastion.process"
                        ),
                        "?",
                    )
                    counted[process] = counted.get(process, 0) + sum(len(s.spans) for s in resource_spans.scope_spans)
                with receiver.lock:
                    receiver.exports += 1
                    receiver.bytes += len(body)
                    for process, n in counted.items():
                        receiver.spans[process] = receiver.spans.get(process, 0) + n
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_: Any) -> None:
                return None

        self.server = ThreadingHTTPServer((bp.HOST, 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{bp.HOST}:{self.server.server_address[1]}"

    def take(self) -> dict[str, Any]:
        """What arrived since the last call (and reset)."""
        with self.lock:
            found = {"exports": self.exports, "bytes": self.bytes, "spans": dict(self.spans)}
            self.spans, self.exports, self.bytes = {}, 0, 0
        return found

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _environment(mode: str, args: argparse.Namespace, receiver: Receiver) -> None:
    """Set this process's environment (which bastion up inherits, BASTION_* aside) for ``mode``."""
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        del os.environ[name]
    src = args.baseline_src if mode == "base" else args.src
    if src:
        os.environ["PYTHONPATH"] = str(Path(src).resolve())
    else:
        os.environ.pop("PYTHONPATH", None)
    if mode == "on":
        os.environ["OTEL_TRACES_EXPORTER"] = "otlp"
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.url
        for setting in getattr(args, "otel", None) or []:
            name, _, value = setting.partition("=")
            os.environ[name.strip()] = value.strip()


def run_mode(
    mode: str, args: argparse.Namespace, extra: list[str], receiver: Receiver, body_file: Path
) -> dict[str, Any]:
    _environment(mode, args, receiver)
    stack = bp.BastionStack(2, 1, extra, args.keep_data)
    try:
        target = stack.start()
        bp.check_predict(target, body_file.read_bytes().strip())
        bp.run_loadgen(target, body_file, 16, args.warmup_s, 0.0, args.loadgen_cpu)
        receiver.take()
        before, started = bp.cpu_seconds(target.pid), time.monotonic()
        result = bp.run_loadgen(target, body_file, args.concurrency, args.duration, 1.0, args.loadgen_cpu)
        result["server_cpu"] = bp.cpu_shares(before, bp.cpu_seconds(target.pid), time.monotonic() - started)
        rate = max(result["requests_per_s"], 1e-9)  # CPU per request: steadier than req/s on a shared machine
        result["cpu_us_per_request"] = {k: round(v * 1e6 / rate) for k, v in result["server_cpu"].items()}
        result["cpu_us_per_request"]["all"] = round(sum(result["server_cpu"].values()) * 1e6 / rate)
        time.sleep(0.5)  # the last batches of spans (the exporters send every 5 s or per 512 spans)
        result["received"] = receiver.take()
    finally:
        stack.stop()
        _environment("off", argparse.Namespace(src=None, baseline_src=None), receiver)
    result["mode"] = mode
    return result


def run_paired(
    modes: list[str], args: argparse.Namespace, extra: list[str], receiver: Receiver, body_file: Path
) -> list[dict[str, Any]]:
    """All ``modes`` at the same time, each its own stack and load generator: they see the same
    machine load, so the ratios of their req/s hold on a busy machine where runs one after the
    other do not (each gets a share of the CPU: the figures are not comparable with a run alone)."""
    stacks: dict[str, tuple[bp.BastionStack, bp.Target]] = {}
    body = body_file.read_bytes().strip()
    try:
        for mode in modes:
            _environment(mode, args, receiver)
            stack = bp.BastionStack(2, 1, extra, args.keep_data)
            stacks[mode] = (stack, stack.start())
            bp.check_predict(stacks[mode][1], body)
        _environment("off", argparse.Namespace(src=None, baseline_src=None), receiver)
        results: dict[str, dict[str, Any]] = {}

        def load(mode: str, seconds: float, concurrency: int, measure: bool) -> None:
            target = stacks[mode][1]
            before, started = bp.cpu_seconds(target.pid), time.monotonic()
            found = bp.run_loadgen(target, body_file, concurrency, seconds, 1.0 if measure else 0.0, args.loadgen_cpu)
            if measure:
                found["server_cpu"] = bp.cpu_shares(before, bp.cpu_seconds(target.pid), time.monotonic() - started)
                rate = max(found["requests_per_s"], 1e-9)
                found["cpu_us_per_request"] = {k: round(v * 1e6 / rate) for k, v in found["server_cpu"].items()}
                found["cpu_us_per_request"]["all"] = round(sum(found["server_cpu"].values()) * 1e6 / rate)
                found["mode"] = mode
                results[mode] = found

        for seconds, concurrency, measure in ((args.warmup_s, 16, False), (args.duration, args.concurrency, True)):
            if measure:
                receiver.take()
            threads = [threading.Thread(target=load, args=(m, seconds, concurrency, measure)) for m in stacks]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        time.sleep(0.5)
        received = receiver.take()
    finally:
        for stack, _ in stacks.values():
            stack.stop()
    for mode, found in results.items():  # only mode on exports
        found["received"] = received if mode == "on" else {"spans": {}}
    return [results[mode] for mode in modes]


# in-process costs ----------------------------------------------------------------------------
_SCOPE = {
    "type": "http",
    "method": "POST",
    "path": f"/v1/models/{bp.MODEL}/predict",
    "headers": [(b"host", b"x"), (b"authorization", b"Bearer x"), (b"content-type", b"application/json")],
}


async def _answer(_scope: Any, _receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def _receive() -> Any:
    return {"type": "http.request", "body": b""}


async def _send(_message: Any) -> None:
    return None


async def _requests(app: Any, n: int) -> float:
    """CPU us per request through ``app`` (an ASGI app answering at once)."""
    started = time.process_time()
    for _ in range(n):
        await app(dict(_SCOPE), _receive, _send)
    return (time.process_time() - started) / n * 1e6


def _pipeline_steps(n: int) -> float:
    """CPU us per request of a gateway span as the pipeline fills it (started and ended here)."""
    from bastion import tracing

    started = time.process_time()
    for i in range(n):
        span = tracing.start("POST", kind=tracing.SERVER, attributes={"http.request.method": "POST"})
        span.attributes["bastion.model"] = bp.MODEL
        span.event("authenticated")
        found = span.attributes
        found["bastion.tenant"], found["bastion.version"], found["bastion.role"] = "acme", 1, "primary"
        found["bastion.job_id"] = f"{i:022d}"
        span.event("enqueued", {"bastion.cost_units": 0.5})
        span.event("replied", {"bastion.status": "succeeded"})
        span.end()
    return (time.process_time() - started) / n * 1e6


def _batches(k: int, n: int) -> float:
    """CPU us per job of the worker's spans for ``n`` batches of ``k`` jobs."""
    from bastion import tracing
    from bastion.queue.consumer import Outcome
    from bastion.queue.envelope import Job
    from bastion.worker.spans import BatchSpans

    parents = [tracing.start("x").traceparent for _ in range(k)]
    jobs = [Job(job_id=f"j{i}", tenant="t", model=bp.MODEL, version=1, lane="sync") for i in range(k)]
    outcomes = [Outcome(job, "succeeded") for job in jobs]
    started = time.process_time()
    for _ in range(n):
        for job, parent in zip(jobs, parents, strict=True):
            job.traceparent = parent
        spans = BatchSpans(bp.MODEL, 1, jobs, "w")
        spans.model_call(k).end()
        spans.reply(k).end()
        spans.end(outcomes, [])
    return (time.process_time() - started) / n / k * 1e6


def _encode(spans: list[Any]) -> float:
    """CPU us per span of encoding ``spans`` as OTLP, 512 a request (as the exporter sends them)."""
    from bastion import otlp

    resource = otlp.resource("bench")
    started = time.process_time()
    for i in range(0, len(spans), 512):
        otlp.encode_request(resource, spans[i : i + 512])
    return (time.process_time() - started) / max(1, len(spans)) * 1e6


def micro(repeats: int = 5) -> dict[str, float]:
    """The tracing code's own CPU time (``time.process_time``, best of ``repeats``) in this
    process, without a stack: what a request adds in the gateway and a job in the worker,
    recording and encoding (the export's HTTP round trip, once per 512 spans, aside)."""
    import asyncio

    from bastion import tracing

    finished: list[tracing.Span] = []

    class Keep:  # stands in for the exporter: keeps what ends
        def add(self, span: tracing.Span) -> None:
            finished.append(span)

    traced = tracing.TraceRequests(_answer)
    found: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        found.setdefault(name, []).append(value)

    tracing._exporter, tracing.ON = Keep(), True
    try:
        for _ in range(repeats):
            note(
                "gateway middleware us/request",
                asyncio.run(_requests(traced, 5000)) - asyncio.run(_requests(_answer, 5000)),
            )
            note("gateway span us/request", _pipeline_steps(5000))
            finished.clear()
            _pipeline_steps(2048)
            note("gateway encode us/request", _encode(list(finished)))
            for k in (1, 8):
                finished.clear()
                note(f"worker record us/job (batches of {k})", _batches(k, 4000 // k))
                note(f"worker encode us/job (batches of {k})", _encode(list(finished)) * (k + 3) / k)
    finally:
        tracing._exporter, tracing.ON = None, False
    return {name: round(min(values), 2) for name, values in found.items()}


def _print_run(i: int, found: dict[str, Any]) -> None:
    spans = found["received"]["spans"]
    print(
        f"round {i + 1} {found['mode']:<4} {found['requests_per_s']:>7.0f} req/s  p50 {found['p50_ms']:.1f} ms  "
        f"p99 {found['p99_ms']:.1f} ms  errors {found.get('errors', 0)}  spans {spans or 'none'}  "
        f"cpu {bp._cpu_text(found['server_cpu'])}  us/request {found['cpu_us_per_request']}",
        flush=True,
    )


def _parse() -> tuple[argparse.Namespace, list[str], list[str]]:
    """The options, the arguments for bastion up, and the modes to run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    parser.add_argument("--concurrency", type=int, default=64, help="connections (default 64)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each mode, alternating order (default 1)")
    parser.add_argument("--modes", default="", help="comma-separated: off, on, base (default off,on [+base])")
    parser.add_argument("--src", default=None, help="run the code under this src/ (PYTHONPATH)")
    parser.add_argument("--baseline-src", default=None, help="add mode 'base': tracing off, the code under this src/")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured load before each run (default 2)")
    parser.add_argument("--loadgen-cpu", type=int, default=0, help="CPU the load generator is pinned to (default 0)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--keep-data", action="store_true", help="keep bastion's data directories (logs)")
    parser.add_argument(
        "--otel", action="append", metavar="NAME=VALUE", help="another OTEL_* variable for mode on (repeatable)"
    )
    parser.add_argument("--micro", action="store_true", help="only the tracing code's CPU time in this process")
    parser.add_argument("--paired", action="store_true", help="run the modes at the same time (a busy machine)")
    args, extra = parser.parse_known_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] or (
        ["base", "off", "on"] if args.baseline_src else ["off", "on"]
    )
    if set(modes) - {"off", "on", "base"} or ("base" in modes and not args.baseline_src):
        parser.error("modes are off, on and base (base needs --baseline-src)")
    return args, extra, modes


def _print_ratios(runs: list[dict[str, Any]], modes: list[str], medians: dict[str, float], args: Any) -> None:
    """Each mode against ``off`` and ``base``: the ratio of the medians; paired, also each round's
    ratio (its stacks shared one load) and their median."""
    for reference in ("off", "base"):
        for mode in modes:
            if mode != reference and reference in medians and medians[reference] > 0:
                print(f"ratio {mode} / {reference}: {medians[mode] / medians[reference]:.3f}")
                if args.paired:  # each round's stacks shared one load: the median of per-round ratios
                    rate = {(r["round"], r["mode"]): r["requests_per_s"] for r in runs}
                    per_round = [
                        rate[(i, mode)] / rate[(i, reference)] for i in range(args.rounds) if rate[(i, reference)] > 0
                    ]
                    shown = ", ".join(f"{x:.3f}" for x in per_round)
                    print(f"  per round: {shown}; median {statistics.median(per_round):.3f}")


def main() -> int:
    args, extra, modes = _parse()
    if args.micro:
        for name, value in micro().items():
            print(f"{name:<40} {value:>7.2f}")
        return 0
    receiver = Receiver()
    body_file = Path(tempfile.mkdtemp(prefix="bastion-bench-tracing-")) / "body.json"
    body_file.write_bytes(bp.SAMPLE.read_bytes())
    runs: list[dict[str, Any]] = []
    try:
        for i in range(args.rounds):
            order = modes if i % 2 == 0 else list(reversed(modes))
            # paired: the start order alternates too (the stack started first may get a better share)
            for found in run_paired(order, args, extra, receiver, body_file) if args.paired else ():
                found["round"] = i
                runs.append(found)
                _print_run(i, found)
            for mode in order if not args.paired else ():
                found = run_mode(mode, args, extra, receiver, body_file)
                runs.append(found)
                _print_run(i, found)
    finally:
        receiver.stop()
    medians = {m: statistics.median(r["requests_per_s"] for r in runs if r["mode"] == m) for m in modes}
    print()
    for mode in modes:
        print(f"{mode:<4}: median {medians[mode]:.0f} req/s at concurrency {args.concurrency}")
    cpu = {m: statistics.median(r["cpu_us_per_request"]["all"] for r in runs if r["mode"] == m) for m in modes}
    for mode in modes:
        print(f"{mode:<4}: median server CPU {cpu[mode]:.0f} us per request")
    _print_ratios(runs, modes, medians, args)
    print(
        f"(load average now {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs; extra bastion up args: {extra or 'none'})"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"runs": runs, "medians": medians, "config": vars(args) | {"json": None}}, indent=2, default=str)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except bp.BenchError as exc:
        print(f"bench_tracing: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("bench_tracing: interrupted", file=sys.stderr)
        sys.exit(130)
