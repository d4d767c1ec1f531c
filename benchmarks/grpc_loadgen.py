"""A closed-loop gRPC load generator for ``inference.GRPCInferenceService/ModelInfer`` (loopback).

``C`` callers each send one fixed, pre-serialised ``ModelInferRequest`` (built with tritonclient's
own messages, raw_input_contents as tritonclient sends them), wait for its response and send the
next one at once. Each caller has its own channel (its own HTTP/2 connection: gRPC's subchannel
sharing is off), so the connections spread over the gateway processes as ``loadgen.py``'s HTTP
connections do. Requests and responses stay bytes (no protobuf work in the client); every
response's status is checked.

Requests that *complete* inside the measurement window (after the warm-up) are counted, as in
``loadgen.py``, whose result fields this prints (as one JSON object), ``statuses`` keyed by gRPC
code name (``OK`` counted where loadgen counts 200)::

    python benchmarks/grpc_loadgen.py --port 8002 --key bst_... -c 16 -d 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import grpc
import numpy as np
from loadgen import LoadResult, _uvloop_installed, summarize
from tritonclient.grpc import service_pb2

HOST = "127.0.0.1"
INFER = "/inference.GRPCInferenceService/ModelInfer"
SAMPLE_ROW = [17.99, 10.38, 122.8, 1001.0, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871, 1.095, 0.9053, 8.589]
SAMPLE_ROW += [153.4, 0.006399, 0.04904, 0.05373, 0.01587, 0.03003, 0.006193, 25.38, 17.33, 184.6, 2019.0]
SAMPLE_ROW += [0.1622, 0.6656, 0.7119, 0.2654, 0.4601, 0.1189]


def infer_request(model: str = "breast-cancer", rows: int = 1) -> bytes:
    """The demo sample as tritonclient would send it: one FP32 [rows, 30] input, raw contents."""
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="FP32", shape=[rows, 30])
    request.raw_input_contents.append(np.tile(np.array(SAMPLE_ROW, dtype="<f4"), (rows, 1)).tobytes())
    return request.SerializeToString()


async def run_load(
    port: int,
    payload: bytes,
    metadata: tuple[tuple[str, str], ...],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
    timeout_s: float = 10.0,
) -> LoadResult:
    """Drive ``concurrency`` callers at 127.0.0.1:``port`` and measure the window."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(f"{HOST}:{port}", options=options) for _ in range(concurrency)]
    await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 10) for c in channels))
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    window_start = time.perf_counter() + warmup_s
    window_end = window_start + duration_s

    async def caller(channel: grpc.aio.Channel) -> None:
        call = channel.unary_unary(INFER)  # no serialisers: bytes in, bytes out
        while (sent := time.perf_counter()) < window_end:
            try:
                await call(payload, metadata=metadata, timeout=timeout_s)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    errors[code.lower()] += 1
            done = time.perf_counter()
            if window_start <= done <= window_end:
                latencies.append(done - sent)
                statuses[code] += 1

    await asyncio.sleep(max(window_start - time.perf_counter(), 0))
    cpu_at_start = time.process_time()
    tasks = [asyncio.create_task(caller(c)) for c in channels]
    await asyncio.sleep(max(window_end - time.perf_counter(), 0))
    cpu_s = time.process_time() - cpu_at_start
    await asyncio.wait(tasks, timeout=timeout_s + 5)
    for channel in channels:
        await channel.close()
    return summarize(
        concurrency, duration_s, warmup_s, latencies, statuses.get("OK", 0), dict(statuses), dict(errors), cpu_s
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--port", type=int, required=True, help="gRPC port on 127.0.0.1")
    parser.add_argument("--key", required=True, help="API key (sent as 'authorization: Bearer <key>')")
    parser.add_argument("--rows", type=int, default=1, help="rows per request (default 1)")
    parser.add_argument("--concurrency", "-c", type=int, default=16, help="callers, one channel each (default 16)")
    parser.add_argument("--duration", "-d", type=float, default=8.0, help="measured seconds (default 8)")
    parser.add_argument("--warmup", "-w", type=float, default=1.0, help="unmeasured seconds first (default 1)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, seconds (default 10)")
    parser.add_argument("--cpu", type=int, help="pin this process to this CPU before starting")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    metadata = (("authorization", f"Bearer {args.key}"),)
    kwargs: dict[str, Any] = {"concurrency": args.concurrency, "duration_s": args.duration, "warmup_s": args.warmup}
    load = run_load(args.port, infer_request(rows=args.rows), metadata, timeout_s=args.timeout, **kwargs)
    if _uvloop_installed():
        import uvloop

        result = uvloop.run(load)
    else:
        result = asyncio.run(load)
    out = asdict(result)
    out["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
