"""The demo text models, built in code at ``bastion up`` time: no torch, no download, no pickle.

- ``tokenizer_json()``: a byte-level BPE tokenizer (GPT-2's byte alphabet, merges learnt in code from
  the small corpus below by a deterministic pair count), as a Hugging Face ``tokenizers`` JSON.
- ``encoder_onnx()``: a tiny BERT-style encoder (2 post-norm layers, hidden 128, 4 heads) with seeded
  random weights (``shape=MINILM_SHAPE``: the same at all-MiniLM-L6-v2's size, for benchmarks). Its
  vectors are deterministic but **not semantically meaningful**: it was never trained. It exists so
  that ``/v1/embeddings`` answers out of the box.
- ``causal_lm_onnx()``: a tiny GPT-2-style decoder with past key/values (2 pre-norm layers, hidden 64,
  4 heads). Its weights are seeded random, then *set by hand* so that the next token is, in effect, a
  lookup on the current token: each token of ``SENTENCE`` has its own orthogonal embedding direction,
  and the output projection maps that direction to the sentence's next token (the last one to
  ``<|eos|>``); every other token's embedding is orthogonal to those directions, and a bias on the
  output makes the sentence's first token the default. So greedy decoding of any prompt (a chat
  prompt ends with the assistant marker and a newline) says ``SENTENCE`` and stops. The attention and
  MLP blocks are real and random, small beside the lookup: the graph is a true decoder run by
  onnxruntime with a true KV cache, it just was not trained.

Everything is deterministic: the same seed gives the same bytes (the registry keys artifacts by
sha256). The graphs use opset 17 and IR version 8, so onnxruntime 1.17 and later load them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from typing import Any

import numpy as np
import onnx
import tokenizers
from onnx import TensorProto, helper, numpy_helper
from tokenizers import pre_tokenizers

OPSET = 17
IR_VERSION = 8
ENCODER_NAME = "demo-embed"
CHAT_NAME = "demo-chat"
ENCODER_SEED = 17
LM_SEED = 42

PAD, EOS, BOS = "<|pad|>", "<|eos|>", "<|bos|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (PAD, EOS, BOS, SYSTEM, USER, ASSISTANT, END)

SENTENCE = "Hello! I'm Bastion's tiny demo model; my weights are a lookup table, so this sentence is all you get."
PINNED_SYSTEM = "You are the Bastion demo assistant. Answer politely."
N_MERGES = 400

ENCODER_HIDDEN, ENCODER_HEADS, ENCODER_LAYERS, ENCODER_FF, ENCODER_MAX_LENGTH = 128, 4, 2, 256, 128
LM_HIDDEN, LM_HEADS, LM_LAYERS, LM_FF, LM_MAX_CONTEXT = 64, 4, 2, 256, 256

CORPUS = (
    "Bastion serves machine learning models and language models to untrusted clients, safely and at scale.",
    "The gateway checks every request, the worker runs the model, and the control plane keeps the registry.",
    "A model never meets the internet: it runs in an isolated worker that accepts no connections.",
    "Every prediction leaves a tamper-evident record in the decision log.",
    "Embeddings turn text into vectors; a chat model turns a conversation into the next message.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
    "How are you today? I am fine, thank you. What would you like to know about this system?",
    "Tokens are counted before a request is queued and settled with the real usage afterwards.",
    "Please summarise the following text in one sentence, and answer in English.",
    "Numbers such as 1, 2, 3, 10, 42, 100 and 2026 appear in text too.",
)


# -- the tokenizer --------------------------------------------------------------------------------


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters (what ByteLevel uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _words(lines: tuple[str, ...]) -> Counter[tuple[str, ...]]:
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words: Counter[tuple[str, ...]] = Counter()
    for line in lines:
        for word, _ in split.pre_tokenize_str(line):
            words[tuple(word)] += 1
    return words


def _learn_merges(words: Counter[tuple[str, ...]], n_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges by count, ties broken by the pair's text: the same corpus, the same merges."""
    merges: list[tuple[str, str]] = []
    current = dict(words)
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in current.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        merged: dict[tuple[str, ...], int] = {}
        for word, count in current.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        current = merged
    return merges


@cache
def tokenizer_json() -> bytes:
    """The demo tokenizer as ``tokenizers`` JSON bytes (pad = id 0, eos = 1, bos = 2, then the chat
    markers, then the 256 bytes, then one token per merge)."""
    merges = _learn_merges(_words(CORPUS + (SENTENCE,) * 20), N_MERGES)
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    for _, char in sorted(_byte_alphabet().items()):
        vocab[char] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    document: dict[str, Any] = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": vocab[t],
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for t in SPECIAL_TOKENS
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _vocab() -> dict[str, int]:
    found: dict[str, int] = json.loads(tokenizer_json())["model"]["vocab"]
    return found


def sentence_ids() -> list[int]:
    """The ids of ``SENTENCE`` under the demo tokenizer (computed with the library, as at run time)."""
    inner = tokenizers.Tokenizer.from_str(tokenizer_json().decode("utf-8"))
    return list(inner.encode(SENTENCE, add_special_tokens=False).ids)


def embedding_config() -> dict[str, Any]:
    return {
        "pooling": "mean",
        "normalize": True,
        "max_length": ENCODER_MAX_LENGTH,
        "add_special_tokens": False,
        "output": "last_hidden_state",
        "special_tokens": {"bos": None, "eos": None, "pad": PAD},
    }


def generation_config() -> dict[str, Any]:
    return {
        "max_context": LM_MAX_CONTEXT,
        "special_tokens": {"bos": None, "eos": EOS, "pad": PAD},
        "stop_tokens": [END],
        "chat_template": {
            "message": "<|{role}|>\n{content}<|end|>\n",
            "generation_prompt": "<|assistant|>\n",
            "pinned_system": PINNED_SYSTEM,
        },
    }


# -- ONNX graph building --------------------------------------------------------------------------


class _Graph:
    """A list of nodes and initialisers with generated, stable names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, value: np.ndarray) -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, *inputs: str, hint: str = "", outputs: int = 1, **attrs: Any) -> Any:
        names = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def output(self, op_type: str, *inputs: str, name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def i64(self, *values: int) -> str:
        return self.const("i64", np.array(values, dtype=np.int64))

    def scalar(self, value: int) -> str:
        return self.const("i64", np.array(value, dtype=np.int64))

    def f32(self, value: float) -> str:
        return self.const("f32", np.array(value, dtype=np.float32))


class _Weights:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)


def _layer_norm(g: _Graph, x: str, hidden: int) -> str:
    scale = g.const("ln_scale", np.ones(hidden, dtype=np.float32))
    bias = g.const("ln_bias", np.zeros(hidden, dtype=np.float32))
    out: str = g.op("LayerNormalization", x, scale, bias, axis=-1, epsilon=1e-5)
    return out


def _linear(g: _Graph, w: _Weights, x: str, n_in: int, n_out: int, std: float) -> str:
    weight = g.const("w", w.normal((n_in, n_out), std))
    bias = g.const("b", np.zeros(n_out, dtype=np.float32))
    out: str = g.op("Add", g.op("MatMul", x, weight), bias)
    return out


def _gelu(g: _Graph, x: str) -> str:
    erf = g.op("Erf", g.op("Mul", x, g.f32(1 / np.sqrt(2))))
    out: str = g.op("Mul", g.op("Mul", x, g.f32(0.5)), g.op("Add", erf, g.f32(1.0)))
    return out


def _mlp(g: _Graph, w: _Weights, x: str, hidden: int, ff: int, std: float) -> str:
    return _linear(g, w, _gelu(g, _linear(g, w, x, hidden, ff, std)), ff, hidden, std)


def _split_heads(g: _Graph, x: str, heads: int, head_dim: int) -> str:
    out: str = g.op("Transpose", g.op("Reshape", x, g.i64(0, 0, heads, head_dim)), perm=[0, 2, 1, 3])
    return out


def _attention(
    g: _Graph,
    w: _Weights,
    x: str,
    bias: str,
    dims: tuple[int, int],
    std: float,
    past: tuple[str, str] | None = None,
) -> tuple[str, str, str]:
    """Multi-head self-attention; with ``past``, keys and values are appended to the cached ones.
    Returns the output and the (full) keys and values."""
    hidden, heads = dims
    head_dim = hidden // heads
    qkv = _linear(g, w, x, hidden, 3 * hidden, std)
    q, k, v = g.op("Split", qkv, g.i64(hidden, hidden, hidden), axis=-1, outputs=3)
    q, k, v = (_split_heads(g, t, heads, head_dim) for t in (q, k, v))
    if past is not None:
        k = g.op("Concat", past[0], k, axis=2)
        v = g.op("Concat", past[1], v, axis=2)
    scores = g.op("Mul", g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), g.f32(1 / np.sqrt(head_dim)))
    weights = g.op("Softmax", g.op("Add", scores, bias), axis=-1)
    merged = g.op("Reshape", g.op("Transpose", g.op("MatMul", weights, v), perm=[0, 2, 1, 3]), g.i64(0, 0, hidden))
    return _linear(g, w, merged, hidden, hidden, std), k, v


def _model(g: _Graph, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> bytes:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="bastion.demo.text_models",
        producer_version="1",
    )
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString(deterministic=True)
    return data


def _int_input(name: str, *dims: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, list(dims))


def _float_value(name: str, *dims: str | int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


def _seq_len(g: _Graph, tensor: str) -> str:
    """Dimension 1 of ``tensor`` as an int64 scalar."""
    out: str = g.op("Squeeze", g.op("Shape", tensor, start=1, end=2), g.i64(0))
    return out


@dataclass(frozen=True)
class EncoderShape:
    hidden: int = ENCODER_HIDDEN
    heads: int = ENCODER_HEADS
    layers: int = ENCODER_LAYERS
    ff: int = ENCODER_FF
    max_length: int = ENCODER_MAX_LENGTH


DEMO_SHAPE = EncoderShape()
# The size of all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, MLP 1536), with the demo vocabulary:
# what a benchmark that wants "an encoder of MiniLM's size" can build without downloading one.
MINILM_SHAPE = EncoderShape(hidden=384, heads=12, layers=6, ff=1536, max_length=256)


@cache
def encoder_onnx(seed: int = ENCODER_SEED, shape: EncoderShape = DEMO_SHAPE) -> bytes:
    """The demo BERT-style encoder: ``input_ids``, ``attention_mask`` → ``last_hidden_state``;
    ``shape=MINILM_SHAPE`` builds the same design at MiniLM-L6's size (44 MB, about 0.5 s)."""
    vocab, hidden = len(_vocab()), shape.hidden
    w, g = _Weights(seed), _Graph()
    tokens = g.op("Gather", g.const("token_embedding", w.normal((vocab, hidden), 1.0)), "input_ids", axis=0)
    positions = g.op("Range", g.scalar(0), _seq_len(g, "input_ids"), g.scalar(1))
    pos_table = g.const("position_embedding", w.normal((shape.max_length, hidden), 0.1))
    h = _layer_norm(g, g.op("Add", tokens, g.op("Gather", pos_table, positions, axis=0)), hidden)
    keep = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.i64(1, 2))
    bias = g.op("Where", keep, g.f32(0.0), g.f32(-1e9))  # [batch, 1, 1, seq]
    for _ in range(shape.layers):
        attended, _, _ = _attention(g, w, h, bias, (hidden, shape.heads), 0.1)
        h = _layer_norm(g, g.op("Add", h, attended), hidden)
        mlp = _mlp(g, w, h, hidden, shape.ff, 0.1)
        h = _layer_norm(g, g.op("Add", h, mlp), hidden)
    g.output("Identity", h, name="last_hidden_state")
    return _model(
        g,
        "demo_encoder",
        [_int_input("input_ids", "batch", "sequence"), _int_input("attention_mask", "batch", "sequence")],
        [_float_value("last_hidden_state", "batch", "sequence", hidden)],
    )


def _causal_bias(g: _Graph) -> str:
    """Attention bias ``[batch, 1, seq, past + seq]``: 0 where a query may look, -1e9 elsewhere (a
    later position, or a key the attention mask drops)."""
    seq, total = _seq_len(g, "input_ids"), _seq_len(g, "attention_mask")
    queries = g.op("Range", g.op("Sub", total, seq), total, g.scalar(1))  # absolute positions of the new tokens
    keys = g.op("Range", g.scalar(0), total, g.scalar(1))
    causal = g.op("LessOrEqual", g.op("Unsqueeze", keys, g.i64(0)), g.op("Unsqueeze", queries, g.i64(1)))
    keep = g.op("Unsqueeze", g.op("Cast", "attention_mask", to=TensorProto.BOOL), g.i64(1, 2))
    out: str = g.op("Where", g.op("And", causal, keep), g.f32(0.0), g.f32(-1e9))
    return out


def _lm_tables(w: _Weights, vocab: int, lookup: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token embedding, output projection and output bias; with ``lookup``, wired to say SENTENCE."""
    hidden = LM_HIDDEN
    embedding = w.normal((vocab, hidden), 1.0)
    head = w.normal((hidden, vocab), 0.02 if lookup else 0.3)
    head_bias = np.zeros(vocab, dtype=np.float32)
    if not lookup:
        return embedding, head, head_bias
    ids = sentence_ids()
    if len(set(ids)) != len(ids):
        raise ValueError("the demo sentence must tokenize to distinct tokens")
    # one orthonormal, zero-mean direction per sentence token (layer norm keeps them as they are)
    basis = w.normal((hidden, len(ids)), 1.0).astype(np.float64)
    basis -= basis.mean(axis=0, keepdims=True)
    directions = np.linalg.qr(basis)[0].T  # [len(ids), hidden], orthonormal rows, each zero-mean
    others = embedding.astype(np.float64)
    others -= others @ directions.T @ directions  # every other token: nothing along those directions
    embedding = others.astype(np.float32)
    following = [*ids[1:], _vocab()[EOS]]
    for token, direction, nxt in zip(ids, directions, following, strict=True):
        embedding[token] = (direction * np.sqrt(hidden)).astype(np.float32)
        head[:, nxt] += (5.0 * direction).astype(np.float32)
    head_bias[ids[0]] = 16.0  # sampled at temperature 1 too, another first token has odds below 1e-4
    return embedding, head, head_bias


@cache
def causal_lm_onnx(
    seed: int = LM_SEED, lookup: bool = True, *, context: int = LM_MAX_CONTEXT, endless: bool = False
) -> bytes:
    """The demo GPT-2-style decoder with past key/values (see the module docstring).

    Inputs ``input_ids`` [b, s], ``attention_mask`` [b, past + s], ``position_ids`` [b, s] and
    ``past_key_values.{i}.key|value`` [b, heads, past, head_dim]; outputs ``logits`` [b, s, vocab]
    and ``present.{i}.key|value`` [b, heads, past + s, head_dim]. ``lookup=False`` keeps the random
    weights as drawn (a plain untrained GPT-2, for tests that need the attention to matter).
    ``context`` is the longest sequence it takes (its position table); ``endless=True`` makes the
    end tokens (``<|eos|>``, ``<|end|>``) all but impossible, so a completion runs to its
    ``max_tokens`` (streaming, cancellation and token-budget tests and benchmarks need long ones).
    """
    vocab, hidden, heads = len(_vocab()), LM_HIDDEN, LM_HEADS
    head_dim = hidden // heads
    w, g = _Weights(seed), _Graph()
    embedding, head, head_bias = _lm_tables(w, vocab, lookup)
    if endless:
        head_bias = head_bias.copy()
        head_bias[[SPECIAL_TOKENS.index(EOS), SPECIAL_TOKENS.index(END)]] = -1e4
    std = 0.02 if lookup else 0.3
    tokens = g.op("Gather", g.const("token_embedding", embedding), "input_ids", axis=0)
    pos_table = g.const("position_embedding", w.normal((context, hidden), 0.01 if lookup else 0.5))
    h = g.op("Add", tokens, g.op("Gather", pos_table, "position_ids", axis=0))
    bias = _causal_bias(g)
    inputs = [
        _int_input("input_ids", "batch", "sequence"),
        _int_input("attention_mask", "batch", "total_sequence"),
        _int_input("position_ids", "batch", "sequence"),
    ]
    outputs = [_float_value("logits", "batch", "sequence", vocab)]
    for layer in range(LM_LAYERS):
        past = (f"past_key_values.{layer}.key", f"past_key_values.{layer}.value")
        inputs += [_float_value(name, "batch", heads, "past_sequence", head_dim) for name in past]
        attended, k, v = _attention(g, w, _layer_norm(g, h, hidden), bias, (hidden, heads), std, past)
        g.output("Identity", k, name=f"present.{layer}.key")
        g.output("Identity", v, name=f"present.{layer}.value")
        outputs += [
            _float_value(f"present.{layer}.{kind}", "batch", heads, "total_sequence", head_dim)
            for kind in ("key", "value")
        ]
        h = g.op("Add", h, attended)
        h = g.op("Add", h, _mlp(g, w, _layer_norm(g, h, hidden), hidden, LM_FF, std))
    projected = g.op("MatMul", _layer_norm(g, h, hidden), g.const("lm_head", head))
    g.output("Add", projected, g.const("lm_head_bias", head_bias), name="logits")
    return _model(g, "demo_causal_lm", inputs, outputs)
