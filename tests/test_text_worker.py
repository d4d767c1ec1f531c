"""Text versions at the worker, on a real Redis with the demo text models run by onnxruntime:
embeddings batched across jobs of different lengths, streamed generations, cancellation and the
output guards."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from bastion import codec, snapshot
from bastion.artifacts.store import ArtifactStore
from bastion.constants import LANE_SYNC, job_key, queue_key
from bastion.demo import text_models
from bastion.guards import Guards, parse_policy, redact
from bastion.queue.envelope import Envelope
from bastion.queue.producer import Producer
from bastion.redisconn import async_client
from bastion.runtime.onnx import OnnxRuntime
from bastion.settings import Settings
from bastion.snapshot import Limits, TextInfo
from bastion.text import jobs
from bastion.text.batching import BatchedGeneration
from bastion.text.chat import Message
from bastion.text.config import EmbeddingConfig, GenerationConfig
from bastion.text.embedding import Encoder
from bastion.text.generation import SamplingParams
from bastion.text.session import open_session
from bastion.text.tokenizer import load_tokenizer
from bastion.worker.batching import run_batch
from bastion.worker.confine import Confinement, Landlock, confine
from bastion.worker.models import ModelCache
from bastion.worker.outguard import OutputGuard
from bastion.worker.service import Worker
from bastion.worker.text import EmbeddingModel, GenerationModel
from bastion.worker.text import load as load_text
from tests.support import wait_until

EMBED, CHAT, RANDOM = "demo-embed", "demo-chat", "demo-random"
EMBED_SIGNATURE = {
    "inputs": [
        {"name": "input_ids", "dtype": "int64", "shape": [None, None]},
        {"name": "attention_mask", "dtype": "int64", "shape": [None, None]},
    ],
    "outputs": [{"name": "embedding", "dtype": "float32", "shape": [None, text_models.ENCODER_HIDDEN]}],
}
CHAT_SIGNATURE = {
    "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [1, None]}],
    "outputs": [
        {"name": "text", "dtype": "uint8", "shape": [1, None]},
        {"name": "usage", "dtype": "int64", "shape": [1, 2]},
        {"name": "finish", "dtype": "int64", "shape": [1]},
    ],
    "rows_independent": False,
}


def _version(store: ArtifactStore, graph: bytes, task: str, signature: dict[str, Any]) -> dict[str, Any]:
    config = text_models.embedding_config() if task == jobs.TASK_EMBEDDING else text_models.generation_config()
    return {
        "sha256": store.put(graph),
        "signature": signature,
        "text": {"task": task, "tokenizer": store.put(text_models.tokenizer_json()), "config": config},
    }


def _publish(client: redis.Redis, store: ArtifactStore, guards: dict[str, Any] | None = None) -> None:
    """The snapshot the control plane would publish for the demo text models (routes to version 1)."""
    route = [{"version": 1, "weight": 100, "role": "primary"}]
    versions = {
        EMBED: _version(store, text_models.encoder_onnx(), jobs.TASK_EMBEDDING, EMBED_SIGNATURE),
        CHAT: _version(store, text_models.causal_lm_onnx(), jobs.TASK_GENERATION, CHAT_SIGNATURE),
        RANDOM: _version(store, text_models.causal_lm_onnx(lookup=False), jobs.TASK_GENERATION, CHAT_SIGNATURE),
    }
    models = {
        name: {"current": 1, "versions": {"1": v}, "routes": route, "guards": guards if name != EMBED else None}
        for name, v in versions.items()
    }
    snapshot.publish(client, {"keys": {}, "models": models})


def _enqueue(client: redis.Redis, job_id: str, model: str, blob: bytes, **kwargs: Any) -> None:
    env = Envelope(job_id, "acme", model, 1, LANE_SYNC, created_ms=int(time.time() * 1000), blob=blob, **kwargs)
    fields = env.fields()
    client.xadd(queue_key(model, LANE_SYNC), dict(zip(fields[::2], fields[1::2], strict=True)))  # type: ignore[arg-type]


def _worker(client: redis.Redis, tmp_path: Path, **settings: Any) -> Worker:
    s = Settings(data_dir=tmp_path, redis_url="redis://unused", **settings)
    worker = Worker(s, client, ModelCache(ArtifactStore(tmp_path / "artifacts"), OnnxRuntime()), "w1")
    assert worker.refresh(force=True)
    return worker


@pytest.fixture
def encoder() -> Encoder:
    config = EmbeddingConfig.from_dict(text_models.embedding_config())
    return Encoder(
        open_session(text_models.encoder_onnx()), load_tokenizer(text_models.tokenizer_json(), config.special), config
    )


@pytest.fixture
def running(redis_client: redis.Redis, tmp_path: Path) -> Iterator[Worker]:
    """A worker loop (the real one, in a thread) over the demo text models."""
    _publish(redis_client, ArtifactStore(tmp_path / "artifacts"), guards=GUARDS.get(tmp_path.name))
    worker = _worker(redis_client, tmp_path)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    yield worker
    worker.stop()
    thread.join(timeout=30)
    assert not thread.is_alive()


GUARDS: dict[str, dict[str, Any]] = {}  # test directory name → the guard policy its snapshot carries


def _field(client: redis.Redis, job_id: str, name: str) -> bytes:
    found: Any = client.hget(job_key(job_id), name)
    return bytes(found or b"")


def _status(client: redis.Redis, job_id: str) -> str:
    return _field(client, job_id, "status").decode()


def _outcome(client: redis.Redis, job_id: str) -> jobs.Completion:
    wait_until(lambda: _status(client, job_id) not in ("", "queued", "running"), 30, f"job {job_id} to end")
    assert _status(client, job_id) == "succeeded", client.hget(job_key(job_id), "error")
    return jobs.read_outputs(codec.decode(_field(client, job_id, "result")))


def _prompt(text: str = "Hi! Who are you?") -> bytes:
    config = GenerationConfig.from_dict(text_models.generation_config())
    tokenizer = load_tokenizer(text_models.tokenizer_json(), config.special)
    assert config.chat_template is not None
    ids = config.chat_template.encode(tokenizer, [Message("user", text)])
    return codec.encode({jobs.INPUT_IDS: np.asarray([ids], dtype=np.int64)})


def _read_stream(client: redis.Redis, job_id: str, timeout_s: float = 30) -> list[tuple[float, jobs.StreamEvent]]:
    """Every entry of ``s:{job}`` until its last, with the time each was seen."""
    seen: list[tuple[float, jobs.StreamEvent]] = []
    last = "0-0"
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        found: Any = client.xread({jobs.stream_key(job_id): last}, block=1000)
        for _, entries in found or ():
            for entry_id, fields in entries:
                last = entry_id
                seen.append((time.monotonic(), jobs.read_entry(fields)))
                if seen[-1][1].last:
                    return seen
    raise AssertionError(f"the stream of {job_id} did not end")


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": EMBED}) or 0.0


def _gen(**kwargs: Any) -> dict[str, Any]:
    return jobs.GenerationRequest(**kwargs).to_member()


# embeddings -------------------------------------------------------------------------------------
def test_embeddings_equal_onnxruntime_and_jobs_of_different_lengths_batch_together(
    redis_client: redis.Redis, tmp_path: Path, encoder: Encoder
) -> None:
    _publish(redis_client, ArtifactStore(tmp_path / "artifacts"))
    worker = _worker(redis_client, tmp_path, max_wait_ms=50)
    texts = {"short": ["Hi"], "long": ["Embeddings turn text into vectors; a chat model", "The quick brown fox"]}
    expected = {}
    for job_id, batch in texts.items():
        tokens = encoder.tokenize(batch)
        expected[job_id] = encoder.embed(batch)
        blob = codec.encode({jobs.INPUT_IDS: tokens.input_ids, jobs.ATTENTION_MASK: tokens.attention_mask})
        _enqueue(redis_client, job_id, EMBED, blob, rows=len(batch))
    widths = {k: encoder.tokenize(v).input_ids.shape[1] for k, v in texts.items()}
    assert widths["short"] < widths["long"]
    calls_before = _sample("bastion_worker_batch_jobs_count")
    jobs_before = _sample("bastion_worker_batch_jobs_sum")
    worker.step()  # one read: both jobs, one model call padded to the widest
    assert _sample("bastion_worker_batch_jobs_count") - calls_before == 1
    assert _sample("bastion_worker_batch_jobs_sum") - jobs_before == 2
    for job_id, want in expected.items():
        assert _status(redis_client, job_id) == "succeeded", redis_client.hget(job_key(job_id), "error")
        got = codec.decode(_field(redis_client, job_id, "result"))[jobs.EMBEDDING]
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_an_embedding_model_pads_jobs_to_the_widest_in_one_call(tmp_path: Path, encoder: Encoder) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    data = {
        "keys": {},
        "models": {
            EMBED: {
                "current": 1,
                "versions": {"1": _version(store, text_models.encoder_onnx(), jobs.TASK_EMBEDDING, EMBED_SIGNATURE)},
            }
        },
    }
    snap = snapshot.Snapshot.parse(snapshot.encode(data)[1])
    model = ModelCache(store, OnnxRuntime()).get(snap, EMBED, 1)
    assert getattr(model, "pad_values", None) == {jobs.INPUT_IDS: 0, jobs.ATTENTION_MASK: 0}
    texts = [["a"], ["Tokens are counted before a request is queued"], ["How are you today?", "Fine"]]
    blobs = []
    for batch in texts:
        tokens = encoder.tokenize(batch)
        blobs.append(codec.encode({jobs.INPUT_IDS: tokens.input_ids, jobs.ATTENTION_MASK: tokens.attention_mask}))
    calls: list[int] = []
    results = run_batch(model, blobs, observe=lambda inputs, outputs, rows=None: calls.append(len(rows or ())))
    assert calls == [3]  # one call for the three jobs
    for batch, blob in zip(texts, results, strict=True):
        np.testing.assert_allclose(codec.decode(blob)[jobs.EMBEDDING], encoder.embed(batch), atol=1e-5)


def test_a_text_version_whose_tokenizer_was_tampered_with_is_refused(
    redis_client: redis.Redis, tmp_path: Path, encoder: Encoder
) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    _publish(redis_client, store)
    path = store.path(store.put(text_models.tokenizer_json()))
    path.chmod(0o644)
    path.write_bytes(path.read_bytes().replace(b"<|pad|>", b"<|pAd|>", 1))
    worker = _worker(redis_client, tmp_path)
    tokens = encoder.tokenize(["Hi"])
    _enqueue(
        redis_client,
        "tampered",
        EMBED,
        codec.encode({"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}),
    )
    worker.step()
    assert _status(redis_client, "tampered") == "failed"
    assert b"integrity" in _field(redis_client, "tampered", "error")


# generation ------------------------------------------------------------------------------------
def test_a_streamed_generation_writes_its_chunks_one_by_one(redis_client: redis.Redis, running: Worker) -> None:
    _enqueue(redis_client, "chat1", CHAT, _prompt(), generation=_gen(max_tokens=200, temperature=0.0, stream=True))
    seen = _read_stream(redis_client, "chat1")
    events = [e for _, e in seen]
    deltas, end = events[:-1], events[-1]
    assert len(deltas) > 5  # chunk by chunk, as produced
    assert "".join(d.text for d in deltas) == text_models.SENTENCE
    counts = [d.completion_tokens for d in deltas]
    assert counts == sorted(counts) and counts[0] >= 1
    assert end.finish == jobs.FINISH_STOP and end.prompt_tokens > 0
    outcome = _outcome(redis_client, "chat1")
    assert outcome.text == text_models.SENTENCE and outcome.finish == jobs.FINISH_STOP
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (end.prompt_tokens, end.completion_tokens)
    assert redis_client.ttl(jobs.stream_key("chat1")) > 0


def test_generations_are_batched_and_a_non_streamed_one_writes_no_stream(
    redis_client: redis.Redis, running: Worker
) -> None:
    for i in range(3):
        _enqueue(
            redis_client, f"plain{i}", CHAT, _prompt(f"Question {i}?"), generation=_gen(max_tokens=200, temperature=0.0)
        )
    for i in range(3):
        outcome = _outcome(redis_client, f"plain{i}")
        assert outcome.text == text_models.SENTENCE and outcome.finish == jobs.FINISH_STOP
        assert not redis_client.exists(jobs.stream_key(f"plain{i}"))
    short = "max3"
    _enqueue(redis_client, short, CHAT, _prompt(), generation=_gen(max_tokens=3, temperature=0.0))
    outcome = _outcome(redis_client, short)
    assert outcome.finish == jobs.FINISH_LENGTH and outcome.completion_tokens == 3
    assert text_models.SENTENCE.startswith(outcome.text) and outcome.text


def test_a_cancel_flag_ends_the_generation_within_100_ms(redis_client: redis.Redis, running: Worker) -> None:
    _enqueue(
        redis_client, "long", RANDOM, _prompt(), generation=_gen(max_tokens=240, temperature=1.0, seed=7, stream=True)
    )
    last = "0-0"
    produced = 0
    while produced < 3:  # a few chunks in, the client goes away
        found: Any = redis_client.xread({jobs.stream_key("long"): last}, block=5000)
        assert found, "no chunk arrived"
        for _, entries in found:
            for entry_id, fields in entries:
                last = entry_id
                event = jobs.read_entry(fields)
                assert not event.last, "the generation ended before it could be cancelled"
                produced = event.completion_tokens
    redis_client.set(jobs.cancel_key("long"), b"1", ex=60)
    cancelled_at = time.monotonic()
    rest = _read_stream_from(redis_client, "long", last)
    ended_at, end = rest[-1]
    assert end.finish == jobs.FINISH_CANCELLED
    print(f"cancel latency {(ended_at - cancelled_at) * 1000:.1f} ms after {produced} tokens")
    assert ended_at - cancelled_at < 0.1, f"cancelled after {(ended_at - cancelled_at) * 1000:.0f} ms"
    produced = max([produced, *(e.completion_tokens for _, e in rest[:-1])])
    assert end.completion_tokens == produced < 240  # usage: the tokens produced so far
    outcome = _outcome(redis_client, "long")
    assert outcome.finish == jobs.FINISH_CANCELLED and outcome.completion_tokens == produced


def _read_stream_from(client: redis.Redis, job_id: str, last: str) -> list[tuple[float, jobs.StreamEvent]]:
    seen: list[tuple[float, jobs.StreamEvent]] = []
    while True:
        found: Any = client.xread({jobs.stream_key(job_id): last}, block=5000)
        assert found, "the stream stalled"
        for _, entries in found:
            for entry_id, fields in entries:
                last = entry_id
                seen.append((time.monotonic(), jobs.read_entry(fields)))
                if seen[-1][1].last:
                    return seen


# output guards ---------------------------------------------------------------------------------
@pytest.fixture
def guarded(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    GUARDS[tmp_path.name] = request.param


@pytest.mark.parametrize("guarded", [{"canary": "block", "output": {"blocked_terms": ["lookup table"]}}], indirect=True)
def test_a_canary_or_a_blocked_term_ends_the_generation_as_content_filter(
    guarded: None, redis_client: redis.Redis, running: Worker
) -> None:
    # The worker treats the marker as opaque: the demo model always says SENTENCE, so a marker
    # taken from it is "leaked" by every answer.
    marker = "tiny demo model"
    _enqueue(
        redis_client,
        "canary",
        CHAT,
        _prompt(),
        generation=_gen(max_tokens=200, temperature=0.0, stream=True, marker=marker),
    )
    events = [e for _, e in _read_stream(redis_client, "canary")]
    streamed = "".join(e.text for e in events[:-1])
    assert events[-1].finish == jobs.FINISH_FILTER
    assert "tiny" not in streamed and text_models.SENTENCE.startswith(streamed)
    outcome = _outcome(redis_client, "canary")
    assert outcome.finish == jobs.FINISH_FILTER and outcome.text == streamed
    assert outcome.completion_tokens < len(text_models.sentence_ids()) + 1

    _enqueue(redis_client, "term", CHAT, _prompt(), generation=_gen(max_tokens=200, temperature=0.0))
    outcome = _outcome(redis_client, "term")
    assert outcome.finish == jobs.FINISH_FILTER and outcome.text == ""
    _enqueue(
        redis_client, "term-stream", CHAT, _prompt(), generation=_gen(max_tokens=200, temperature=0.0, stream=True)
    )
    events = [e for _, e in _read_stream(redis_client, "term-stream")]
    streamed = "".join(e.text for e in events[:-1])
    assert events[-1].finish == jobs.FINISH_FILTER and "lookup" not in streamed


@pytest.mark.parametrize("guarded", [{"pii_out": "redact", "output": {"max_chars": 40}}], indirect=True)
def test_max_chars_cuts_the_answer(guarded: None, redis_client: redis.Redis, running: Worker) -> None:
    _enqueue(redis_client, "cut", CHAT, _prompt(), generation=_gen(max_tokens=200, temperature=0.0, stream=True))
    events = [e for _, e in _read_stream(redis_client, "cut")]
    streamed = "".join(e.text for e in events[:-1])
    assert events[-1].finish == jobs.FINISH_LENGTH
    assert streamed == text_models.SENTENCE[:40]
    assert _outcome(redis_client, "cut").text == streamed


@pytest.mark.parametrize("guarded", [{}], indirect=True)
def test_a_schema_mismatch_is_refused_not_failed(guarded: None, redis_client: redis.Redis, running: Worker) -> None:
    """An answer that does not match the client's schema ends content_filter with no text: a refusal,
    not a failure (a client asking for a schema the model cannot meet must not open the breaker)."""
    schema = {"type": "object", "required": ["answer"]}
    _enqueue(redis_client, "schema", CHAT, _prompt(), generation=_gen(max_tokens=200, temperature=0.0, schema=schema))
    wait_until(lambda: _status(redis_client, "schema") == "succeeded", 30, "the job to end")
    outcome = _outcome(redis_client, "schema")
    assert outcome.finish == jobs.FINISH_FILTER and outcome.text == ""


def test_a_streamed_answer_is_redacted_chunk_by_chunk_with_a_short_tail_held_back() -> None:
    guards = Guards.build(parse_policy({"pii_out": "redact"}))
    request = jobs.GenerationRequest(max_tokens=100, stream=True)
    answer = "Write to jane.doe@example.com or call +44 20 7946 0958 today, and ask for the rest of it please."
    guard = OutputGuard(guards, request)
    streamed = []
    for i in range(0, len(answer), 3):  # three characters a chunk, as tokens come
        piece, verdict = guard.feed(answer[i : i + 3])
        assert verdict is None
        streamed.append(piece)
        assert "jane" not in "".join(streamed) or "[EMAIL]" in "".join(streamed)
    assert any(streamed), "nothing was streamed before the end"
    ending = guard.finish(jobs.FINISH_STOP, 30)
    streamed.append(ending.tail)
    whole = "".join(streamed)
    assert whole == ending.text == redact(answer).text
    assert "example.com" not in whole and "7946" not in whole
    (pii,) = [r for r in ending.results if r.guard == "pii_out"]
    assert pii.decision == "redact" and sum(pii.counts.values()) == 2


def test_more_generations_than_the_batch_all_complete(redis_client: redis.Redis, tmp_path: Path) -> None:
    _publish(redis_client, ArtifactStore(tmp_path / "artifacts"))
    worker = _worker(redis_client, tmp_path, generation_batch=2)
    for i in range(5):
        _enqueue(redis_client, f"g{i}", CHAT, _prompt(f"Number {i}"), generation=_gen(max_tokens=200, temperature=0.0))
    give_up = time.monotonic() + 30
    while any(_status(redis_client, f"g{i}") != "succeeded" for i in range(5)) and time.monotonic() < give_up:
        worker.step()
        assert worker.generations.running <= 2 + worker.settings.max_batch
    for i in range(5):
        assert _outcome(redis_client, f"g{i}").text == text_models.SENTENCE


def test_a_redelivered_streamed_generation_fails_rather_than_stream_twice(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    _publish(redis_client, ArtifactStore(tmp_path / "artifacts"))
    worker = _worker(redis_client, tmp_path)
    first: Any = jobs.delta_fields("Hello", 1)
    redis_client.xadd(jobs.stream_key("again"), first)  # a dead worker's first chunk
    _enqueue(redis_client, "again", CHAT, _prompt(), generation=_gen(max_tokens=200, temperature=0.0, stream=True))
    worker.step()
    assert _status(redis_client, "again") == "failed"
    assert b"interrupted" in _field(redis_client, "again", "error")
    entries: Any = redis_client.xrange(jobs.stream_key("again"))
    events = [jobs.read_entry(f) for _, f in entries]
    assert [e.text for e in events[:-1]] == ["Hello"] and events[-1].error is not None


@pytest.mark.skipif(os.geteuid() != 0 or Landlock.abi() < 4, reason="needs root and Landlock ABI >= 4")
def test_a_confined_worker_loop_loads_and_runs_the_text_models(tmp_path: Path) -> None:
    """The sandbox a worker loop runs in (seccomp, Landlock, an unprivileged uid) lets the text
    runtime load its parts from bytes and run: tokenizer, encoder, decoder steps."""
    graphs = (text_models.encoder_onnx(), text_models.causal_lm_onnx(), text_models.tokenizer_json())
    (tmp_path / "artifacts").mkdir()
    unit = Confinement(uid=65530, read_paths=(tmp_path / "artifacts",), connect_ports=(6379,), hidden=(tmp_path,))
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            confine(unit)
            encoder_info = TextInfo(jobs.TASK_EMBEDDING, "x", text_models.embedding_config())
            chat_info = TextInfo(jobs.TASK_GENERATION, "x", text_models.generation_config())
            embed = load_text(encoder_info, graphs[0], graphs[2])
            chat = load_text(chat_info, graphs[1], graphs[2])
            assert isinstance(embed, EmbeddingModel) and isinstance(chat, GenerationModel)
            vector = embed.run({"input_ids": np.ones((1, 4), np.int64), "attention_mask": np.ones((1, 4), np.int64)})
            batch = BatchedGeneration(chat.decoder, chat.tokenizer, chat.config)
            batch.add("k", [3, 10, 11], SamplingParams(max_tokens=4, temperature=0.0))
            steps = sum(len(batch.step()) for _ in range(6))
            os.write(write_end, f"{vector['embedding'].shape[1]} {steps}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        said = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and said.split()[0] == str(text_models.ENCODER_HIDDEN), (status, said)
    assert int(said.split()[1]) >= 1


def test_a_finished_generation_gives_its_unused_tokens_back(
    redis_url: str, redis_client: redis.Redis, running: Worker
) -> None:
    limits = Limits(
        tenant_tokens_per_min=0.0, tenant_tokens_burst=1000.0, key_tokens_per_min=0.0, key_tokens_burst=800.0
    )
    blob = _prompt()
    prompt_tokens = codec.decode(blob)[jobs.INPUT_IDS].shape[1]
    env = Envelope(
        "budget",
        "acme",
        CHAT,
        1,
        LANE_SYNC,
        key_id="k1",
        rows=1,
        blob=blob,
        generation=_gen(max_tokens=200, temperature=0.0, stream=True),
    )

    async def enqueue() -> None:
        client = async_client(redis_url)
        try:
            producer = Producer(client, max_queue_sync=100, max_queue_batch=100, result_ttl_s=60)
            await producer.enqueue(env, limits=limits, tokens=prompt_tokens + 200)
        finally:
            await client.aclose()

    asyncio.run(enqueue())
    outcome = _outcome(redis_client, "budget")
    used = outcome.prompt_tokens + outcome.completion_tokens
    assert outcome.prompt_tokens == prompt_tokens and used < prompt_tokens + 200
    key_bucket = "rl:kt:k1"

    def level(key: str) -> float:
        return float(redis_client.hget(key, "tokens") or "nan")  # type: ignore[arg-type]

    wait_until(lambda: level(key_bucket) == 800 - used, 10, "the unused tokens to come back")
    assert level(f"rl:tt:acme:{CHAT}") == 1000 - used


def test_a_worker_process_serves_text_versions_confined_as_bastion_up_runs_it(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path, encoder: Encoder
) -> None:
    """The real ``bastion worker`` process (prefork master, confined loop where the host allows):
    an embedding and a streamed generation, then SIGTERM."""
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, log_level="warning")
    _publish(redis_client, ArtifactStore(settings.resolved_artifact_dir))
    env = {**os.environ, **settings.to_env(), "BASTION_WORKER_NAME": "proc-1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "worker.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bastion", "worker"], env=env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        tokens = encoder.tokenize(["Every prediction leaves a record", "Hi"])
        blob = codec.encode({jobs.INPUT_IDS: tokens.input_ids, jobs.ATTENTION_MASK: tokens.attention_mask})
        _enqueue(redis_client, "proc-embed", EMBED, blob, rows=2)
        _enqueue(
            redis_client, "proc-chat", CHAT, _prompt(), generation=_gen(max_tokens=200, temperature=0.0, stream=True)
        )
        events = [e for _, e in _read_stream(redis_client, "proc-chat", timeout_s=60)]
        assert "".join(e.text for e in events[:-1]) == text_models.SENTENCE, log.read_text()[-2000:]
        assert events[-1].finish == jobs.FINISH_STOP
        assert _outcome(redis_client, "proc-chat").text == text_models.SENTENCE
        got = codec.decode(_field(redis_client, "proc-embed", "result"))[jobs.EMBEDDING]
        np.testing.assert_allclose(got, encoder.embed(["Every prediction leaves a record", "Hi"]), atol=1e-5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]


# streamed output guards against obfuscation (review findings) ---------------------------------
def _stream_through(policy: dict[str, Any], answer: str, marker: str = "") -> tuple[str, str]:
    """Feed ``answer`` one character a chunk through the output guards of a streamed request:
    what the client would have received, and how the generation ended."""
    guard = OutputGuard(
        Guards.build(parse_policy(policy)), jobs.GenerationRequest(max_tokens=4096, stream=True, marker=marker)
    )
    sent, verdict = [], None
    for ch in answer:
        piece, verdict = guard.feed(ch)
        sent.append(piece)
        if verdict:
            break
    ending = guard.finish(verdict or jobs.FINISH_STOP, 10)
    return "".join(sent) + ending.tail, ending.finish


def _untag(text: str) -> str:
    return "".join(chr(ord(c) - 0xE0000) if 0xE0000 <= ord(c) <= 0xE007F else c for c in text)


def test_a_canary_smuggled_in_tag_characters_or_spread_out_never_streams_in_full() -> None:
    from bastion.guards.canary import new_marker

    filler = " and now some ordinary words to push the hold along." * 3
    marker = new_marker()
    tagged = "".join(chr(0xE0000 + ord(c)) for c in marker)
    streamed, finish = _stream_through({"canary": "block"}, "Sure. " + tagged + filler, marker)
    assert finish == jobs.FINISH_FILTER and marker not in _untag(streamed)
    marker = new_marker()
    streamed, finish = _stream_through({"canary": "block"}, "ref: " + (" " * 12).join(marker) + filler, marker)
    letters = "".join(c for c in streamed if c.isalnum())
    assert finish == jobs.FINISH_FILTER and "bst" not in letters.lower()


def test_an_answer_repeating_the_pinned_prompt_is_cut_before_any_of_the_prompt(tmp_path: Path) -> None:
    from bastion.guards.canary import new_marker, pin_system_prompt

    marker = new_marker()
    echo = pin_system_prompt(text_models.PINNED_SYSTEM, marker)
    streamed, finish = _stream_through({"canary": "block"}, echo, marker)
    assert finish == jobs.FINISH_FILTER
    assert "Bastion demo assistant" not in streamed and marker not in streamed


@pytest.mark.parametrize(
    "answer",
    [
        "ok " + ("\u200b" * 40).join("forbidden") + " then plenty of ordinary filler text follows to release the tail.",
        "ok secret" + "-" * 60 + "plan and then plenty of ordinary filler text follows here to release the tail.",
    ],
)
def test_a_blocked_term_spread_out_never_streams(answer: str) -> None:
    streamed, finish = _stream_through({"output": {"blocked_terms": ["forbidden", "secret plan"]}}, answer)
    plain = "".join(c for c in streamed if c.isalnum())
    assert finish == jobs.FINISH_FILTER
    assert "forbidden" not in plain and "secretplan" not in plain
