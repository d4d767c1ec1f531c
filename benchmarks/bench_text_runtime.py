"""In-process figures for the demo text models: no gateway, no queue, just onnxruntime and our loop.

    .venv/bin/python benchmarks/bench_text_runtime.py [--duration 2] [--threads 1] [--json PATH]

- build: seconds to build the demo tokenizer, encoder and causal LM from code (what ``bastion up``
  pays on first run), uncached;
- generation: time to first token (tokenize the chat prompt, prompt pass, first sampled token) and
  decode tokens/s, for the demo chat model's greedy answer and for its random-weight twin asked for
  200 tokens (the lookup model stops after its sentence);
- batched generation: tokens/s for 1, 8 and 32 concurrent generations stepped by
  ``BatchedGeneration`` (continuous batching);
- embeddings: embeddings/s for the demo encoder at batch 1, 8, 32 and 64 (one short sentence per
  text); the best batched figure is issue 17's Done-when 5 reference for this encoder; and the same
  for an untrained encoder of all-MiniLM-L6-v2's size (``MINILM_SHAPE``, built in code), the
  "encoder of similar size" Done-when 5 allows (``--no-minilm`` skips it).

Each figure is the median of repeated runs over ``--duration`` seconds. The machine may be shared:
compare figures from one run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from bastion.demo import text_models
from bastion.text.batching import BatchedGeneration
from bastion.text.chat import Message
from bastion.text.config import EmbeddingConfig, GenerationConfig
from bastion.text.embedding import Encoder
from bastion.text.generation import Decoder, Generation, SamplingParams
from bastion.text.session import open_session
from bastion.text.tokenizer import SpecialTokens, TextTokenizer, load_tokenizer

SENTENCES = [
    "Bastion serves machine learning models to untrusted clients.",
    "How do I rotate an API key without downtime?",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings turn text into vectors for search.",
    "Every prediction leaves a tamper-evident record.",
    "What is the weather like in Lisbon today?",
    "Tokens are counted before a request is queued.",
    "A model never meets the internet.",
]


def repeat(fn: Callable[[], object], duration: float) -> list[float]:
    """Seconds per call of ``fn``, over at least ``duration`` seconds and 3 calls."""
    fn()  # warm-up
    times: list[float] = []
    end = time.perf_counter() + duration
    while time.perf_counter() < end or len(times) < 3:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_build() -> dict[str, float]:
    start = time.perf_counter()
    text_models.tokenizer_json.__wrapped__()  # type: ignore[attr-defined]
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    text_models.encoder_onnx.__wrapped__()  # type: ignore[attr-defined]
    encoder_s = time.perf_counter() - start
    start = time.perf_counter()
    text_models.causal_lm_onnx.__wrapped__()  # type: ignore[attr-defined]
    lm_s = time.perf_counter() - start
    return {"tokenizer_s": tokenizer_s, "encoder_s": encoder_s, "causal_lm_s": lm_s}


def bench_generation(
    decoder: Decoder, tokenizer: TextTokenizer, config: GenerationConfig, prompt: str, max_tokens: int, duration: float
) -> dict[str, float]:
    assert config.chat_template is not None
    template = config.chat_template
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    firsts: list[float] = []
    rates: list[float] = []
    tokens = 0

    def once() -> None:
        nonlocal tokens
        start = time.perf_counter()
        ids = template.encode(tokenizer, [Message("user", prompt)])
        generation = Generation(decoder, tokenizer, config, ids, params)
        first = None
        for _ in generation:
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None
        firsts.append(first - start)
        tokens = generation.usage.completion_tokens
        if tokens > 1:
            rates.append((tokens - 1) / (end - first))

    repeat(once, duration)
    return {
        "completion_tokens": tokens,
        "ttft_ms_p50": statistics.median(firsts) * 1000,
        "decode_tokens_per_s": statistics.median(rates),
    }


def bench_batched(
    decoder: Decoder, tokenizer: TextTokenizer, config: GenerationConfig, concurrency: int, duration: float
) -> float:
    prompts = [tokenizer.encode(SENTENCES[i % len(SENTENCES)]) for i in range(concurrency)]
    params = SamplingParams(max_tokens=64, temperature=0.0)
    produced = 0

    def once() -> None:
        nonlocal produced
        engine = BatchedGeneration(decoder, tokenizer, config, max_batch=concurrency)
        for i, prompt in enumerate(prompts):
            engine.add(i, prompt, params)
        count = 0
        while engine.busy:
            for _, delta in engine.step():
                count += len(delta.token_ids)
        produced = count

    times = repeat(once, duration)
    return produced / statistics.median(times)


def bench_embeddings(encoder: Encoder, batch: int, duration: float) -> float:
    texts = [SENTENCES[i % len(SENTENCES)] + f" ({i})" for i in range(batch)]
    times = repeat(lambda: encoder.embed(texts), duration)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds measured per figure")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--no-minilm", action="store_true", help="skip the MiniLM-sized encoder")
    args = parser.parse_args()

    figures: dict[str, object] = {"build": bench_build()}
    config = GenerationConfig.from_dict(text_models.generation_config())
    tokenizer = load_tokenizer(text_models.tokenizer_json(), config.special)
    demo = Decoder(open_session(text_models.causal_lm_onnx(), intra_threads=args.threads))
    twin = Decoder(open_session(text_models.causal_lm_onnx(lookup=False), intra_threads=args.threads))
    no_eos = GenerationConfig(
        max_context=config.max_context, special=SpecialTokens(eos=text_models.END), chat_template=config.chat_template
    )
    figures["generation_demo"] = bench_generation(demo, tokenizer, config, "Hi! Who are you?", 64, args.duration)
    figures["generation_200"] = bench_generation(twin, tokenizer, no_eos, "Tell me a story.", 200, args.duration)
    figures["batched_tokens_per_s"] = {
        str(n): bench_batched(twin, tokenizer, no_eos, n, args.duration) for n in (1, 8, 32)
    }
    encoder = Encoder(
        open_session(text_models.encoder_onnx(), intra_threads=args.threads),
        tokenizer,
        EmbeddingConfig.from_dict(text_models.embedding_config()),
    )
    figures["embeddings_per_s"] = {str(n): bench_embeddings(encoder, n, args.duration) for n in (1, 8, 32, 64)}
    if not args.no_minilm:
        minilm = Encoder(
            open_session(text_models.encoder_onnx(shape=text_models.MINILM_SHAPE), intra_threads=args.threads),
            tokenizer,
            EmbeddingConfig.from_dict({**text_models.embedding_config(), "max_length": 256}),
        )
        figures["minilm_sized_embeddings_per_s"] = {
            str(n): bench_embeddings(minilm, n, args.duration) for n in (1, 8, 32, 64)
        }

    build = figures["build"]
    assert isinstance(build, dict)
    print(f"build: tokenizer {build['tokenizer_s']:.3f} s, encoder {build['encoder_s']:.3f} s, ", end="")
    print(f"causal LM {build['causal_lm_s']:.3f} s")
    for name in ("generation_demo", "generation_200"):
        found = figures[name]
        assert isinstance(found, dict)
        print(
            f"{name}: {found['completion_tokens']} tokens, time to first token {found['ttft_ms_p50']:.2f} ms (p50), "
            f"decode {found['decode_tokens_per_s']:.0f} tokens/s"
        )
    batched = figures["batched_tokens_per_s"]
    assert isinstance(batched, dict)
    print("batched generation (tokens/s): " + ", ".join(f"{n} at once {v:.0f}" for n, v in batched.items()))
    for name in ("embeddings_per_s", "minilm_sized_embeddings_per_s"):
        if name not in figures:
            continue
        embeddings = figures[name]
        assert isinstance(embeddings, dict)
        print(f"{name}: " + ", ".join(f"batch {n} {v:.0f}" for n, v in embeddings.items()))
        print(f"  best: {max(embeddings.values()):.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
