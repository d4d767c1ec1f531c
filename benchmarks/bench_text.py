"""Text serving through Bastion against the same models in process (issue 17, Done-when 2 and 5).

    .venv/bin/python benchmarks/bench_text.py [--requests 60] [--duration 10] [--concurrency 64]
        [--workers 1] [--threads 1] [--skip-embeddings] [--skip-streaming] [--json PATH]

Starts ``bastion up`` (``--gateways 1`` by default) in a temporary data directory, then:

- **time to first byte**: ``--requests`` sequential streaming chat requests to the demo chat
  model; the time from sending the request to the first SSE ``data:`` event carrying text,
  against the in-process time to first token of the same prompt (tokenize, prompt pass, first
  sampled token with ``bastion.text.generation``). Done-when 2 asks p50(gateway) ≤
  p50(in process) + 5 ms.
- **embeddings**: an untrained encoder of all-MiniLM-L6-v2's size (``MINILM_SHAPE``, built in
  code) registered as ``bench-embed``; ``/v1/embeddings`` with one string per request at
  ``--concurrency`` (closed loop, ``benchmarks/loadgen.py``), against in-process onnxruntime's best
  batched throughput for the same encoder (batches of 1 to 128 strings, ``--threads`` intra-op
  threads; the default is the number of CPUs). Done-when 5 asks ≥ 0.85×.

Figures are printed with their ratio; both sides are measured in this run, on this machine.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_predict import BastionStack
from loadgen import run_load_sync

from bastion.demo import text_models as demo
from bastion.settings import usable_cpus
from bastion.text.chat import Message
from bastion.text.config import EmbeddingConfig, GenerationConfig
from bastion.text.embedding import Encoder
from bastion.text.generation import Decoder, Generation, SamplingParams
from bastion.text.session import open_session
from bastion.text.tokenizer import load_tokenizer

PROMPT = "How do I rotate an API key without downtime?"
TEXT_CHUNK = re.compile(rb'"content":"[^"]')  # a chat chunk that carries text (the role chunk has none)
SENTENCE = "Bastion serves machine learning models to untrusted clients."


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# time to first token ------------------------------------------------------------------------
def in_process_ttft(requests: int) -> list[float]:
    config = GenerationConfig.from_dict(demo.generation_config())
    tokenizer = load_tokenizer(demo.tokenizer_json(), config.special)
    decoder = Decoder(open_session(demo.causal_lm_onnx()))
    assert config.chat_template is not None
    times = []
    for _ in range(requests + 5):
        start = time.perf_counter()
        ids = config.chat_template.encode(tokenizer, [Message("user", PROMPT)])
        for delta in Generation(decoder, tokenizer, config, ids, SamplingParams(max_tokens=64, temperature=0.0)):
            if delta.text:
                break
        times.append(time.perf_counter() - start)
    return times[5:]


def gateway_ttfb(port: int, headers: dict[str, str], requests: int, model: str) -> list[float]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "stream": True,
        "max_tokens": 64,
    }
    times = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as client:
        deadline = time.monotonic() + 60
        while client.post("/v1/chat/completions", json={**body, "stream": False}).status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit(f"{model} is not served")
            time.sleep(0.5)
        for _ in range(requests + 5):
            start = time.perf_counter()
            first = None
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise SystemExit(f"streaming chat failed: {response.status_code} {response.read()[:300]!r}")
                seen = b""
                for raw in response.iter_raw():  # bytes as they arrive: the first text chunk's time
                    if first is None:
                        seen += raw
                        if TEXT_CHUNK.search(seen):
                            first = time.perf_counter() - start
            if first is None:
                raise SystemExit("a streamed answer carried no text")
            times.append(first)
    return times[5:]


# embeddings -------------------------------------------------------------------------------
def in_process_embeddings(threads: int, duration: float) -> tuple[int, float]:
    """(best batch size, strings per second) for the MiniLM-sized encoder."""
    config = EmbeddingConfig.from_dict({**demo.embedding_config(), "max_length": demo.MINILM_SHAPE.max_length})
    tokenizer = load_tokenizer(demo.tokenizer_json(), config.special)
    encoder = Encoder(
        open_session(demo.encoder_onnx(shape=demo.MINILM_SHAPE), intra_threads=threads), tokenizer, config
    )
    best = (0, 0.0)
    for batch in (1, 8, 16, 32, 64, 128):
        texts = [SENTENCE] * batch
        encoder.embed(texts)
        done, end = 0, time.perf_counter() + duration / 6
        start = time.perf_counter()
        while time.perf_counter() < end:
            encoder.embed(texts)
            done += batch
        rate = done / (time.perf_counter() - start)
        print(f"  in process, batch {batch:>3}: {rate:8.1f} strings/s")
        if rate > best[1]:
            best = (batch, rate)
    return best


def register(stack: BastionStack, name: str, artifact: bytes, task: str, config: dict[str, Any]) -> None:
    """Register a text version of the demo tokenizer on the stack's admin API (no guard policy)."""
    endpoints = json.loads((stack.data_dir / "endpoints.json").read_text())
    admin_key = (stack.data_dir / "admin.key").read_text().strip()
    metadata = {"text": {"task": task, "config": config}}
    with httpx.Client(
        base_url=endpoints["control_url"], headers={"Authorization": f"Bearer {admin_key}"}, timeout=120
    ) as admin:
        made = admin.post(
            f"/admin/v1/models/{name}/versions",
            files={
                "artifact": ("model.onnx", artifact),
                "tokenizer": ("tokenizer.json", demo.tokenizer_json()),
                "metadata": (None, json.dumps(metadata)),
            },
        )
        if made.status_code not in (200, 201):
            raise SystemExit(f"registering {name} failed: {made.status_code} {made.text[:300]}")


def register_bench_encoder(stack: BastionStack) -> None:
    config = {**demo.embedding_config(), "max_length": demo.MINILM_SHAPE.max_length}
    register(stack, "bench-embed", demo.encoder_onnx(shape=demo.MINILM_SHAPE), "embedding", config)


def gateway_embeddings(port: int, headers: dict[str, str], concurrency: int, duration: float) -> dict[str, Any]:
    body = json.dumps({"model": "bench-embed", "input": SENTENCE}).encode()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as client:
        deadline = time.monotonic() + 60
        while True:
            answer = client.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
            if answer.status_code == 200:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"bench-embed is not served: {answer.status_code} {answer.text[:300]}")
            time.sleep(0.5)
    result = run_load_sync(
        port,
        "/v1/embeddings",
        {**headers, "Content-Type": "application/json"},
        body,
        concurrency=concurrency,
        duration_s=duration,
        warmup_s=2.0,
    )
    return dict(result.__dict__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60, help="streaming requests for time to first byte")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of embeddings load")
    parser.add_argument("--concurrency", type=int, default=64, help="embeddings requests in flight")
    parser.add_argument("--gateways", type=int, default=1, help="bastion up --gateways")
    parser.add_argument("--workers", type=int, default=1, help="bastion up --workers")
    parser.add_argument("--threads", type=int, default=usable_cpus(), help="in-process onnxruntime intra-op threads")
    parser.add_argument("--skip-embeddings", action="store_true")
    parser.add_argument("--skip-streaming", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {}
    stack = BastionStack(args.gateways, args.workers, [], keep_dir=False)
    target = stack.start()
    try:
        if not args.skip_streaming:
            register(stack, "bench-chat", demo.causal_lm_onnx(), "generation", demo.generation_config())
            local = in_process_ttft(args.requests)
            p50_local = statistics.median(local)
            figures["ttft"] = {"in_process_p50_ms": p50_local * 1000}
            # bench-chat: the demo chat model without guards (the transport's cost alone);
            # demo-chat: as bastion up registers it, whose PII-out guard holds back 48 characters
            for model, what in (("bench-chat", "no guards"), (demo.CHAT_NAME, "demo-chat's guards")):
                served = gateway_ttfb(target.port, target.headers, args.requests, model)
                p50_served = statistics.median(served)
                figures["ttft"][model] = {
                    "gateway_p50_ms": p50_served * 1000,
                    "gateway_p90_ms": _percentile(served, 0.9) * 1000,
                    "difference_ms": (p50_served - p50_local) * 1000,
                }
                print(
                    f"time to first token ({what}): in process p50 {p50_local * 1000:.2f} ms; first SSE text "
                    f"through the gateway p50 {p50_served * 1000:.2f} ms (p90 {_percentile(served, 0.9) * 1000:.2f});"
                    f" difference {(p50_served - p50_local) * 1000:+.2f} ms (Done-when 2: <= +5 ms)"
                )
        if not args.skip_embeddings:
            register_bench_encoder(stack)
            served_load = gateway_embeddings(target.port, target.headers, args.concurrency, args.duration)
            batch, local_rate = in_process_embeddings(args.threads, max(6.0, args.duration))
            rate = served_load["ok_per_s"]
            figures["embeddings"] = {
                "gateway_strings_per_s": rate,
                "gateway_p50_ms": served_load.get("p50_ms"),
                "gateway_statuses": served_load.get("statuses"),
                "in_process_best_strings_per_s": local_rate,
                "in_process_best_batch": batch,
                "ratio": rate / local_rate if local_rate else None,
            }
            print(
                f"embeddings: /v1/embeddings c={args.concurrency} {rate:.1f} strings/s "
                f"(statuses {served_load.get('statuses')}); in process best {local_rate:.1f} strings/s at batch "
                f"{batch} ({args.threads} threads); ratio {rate / local_rate:.3f} (Done-when 5: >= 0.85)"
            )
    finally:
        stack.stop()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
