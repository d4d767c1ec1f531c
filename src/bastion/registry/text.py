"""Text versions: a tokenizer and a task (``embedding`` or ``generation``) beside the ONNX graph.

At registration the version's ``text`` metadata section (``{"task": …, "config": {…}}``) is parsed
as the task's config (``bastion.text.config``), the tokens it names are looked up in the tokenizer
(``named_tokens``; the lookup runs in the sandboxed check, with the tokenizer's own check), and the
graph must fit the task (``check_graph``): an encoder with int64 ``input_ids`` and
``attention_mask`` (``token_type_ids`` allowed) and the rank-3 hidden-state output the config
names, or the decoder-with-past layout ``bastion.text.generation.Decoder`` reads (its own checks,
run on the graph's declared inputs and outputs).

The signature stored for a text version is the queue's contract (``bastion.text.jobs``), not the
graph's (``queue_signature``): gateways validate and workers answer in those tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bastion.artifacts.text_check import TokenizerReport
from bastion.errors import InvalidArtifact, InvalidInput
from bastion.signature import Signature, TensorSpec
from bastion.text import jobs
from bastion.text.config import EmbeddingConfig, GenerationConfig
from bastion.text.generation import Decoder

TextConfig = EmbeddingConfig | GenerationConfig
# artifact, its size limit, tokenizer, the tokenizer's size limit, tokens to look up
TextCheck = Callable[[bytes, int, bytes, int, list[str]], tuple[Signature, TokenizerReport]]
TokenizerCheck = Callable[[bytes, int, list[str]], TokenizerReport]  # tokenizer, its byte limit, tokens named

_ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "float64": "tensor(double)"}
_FLOATS = ("float32", "float16", "float64")
_EMBEDDING_INPUTS = ("input_ids", "attention_mask")
_GENERATION_EXTRA = ("position_ids",)
_CACHE_PREFIXES = ("past_key_values.", "present.")


def parse_config(task: str, config: dict[str, Any]) -> TextConfig:
    """The task's config, or ``InvalidInput`` saying what is wrong with it."""
    try:
        if task == jobs.TASK_EMBEDDING:
            return EmbeddingConfig.from_dict(config)
        if task == jobs.TASK_GENERATION:
            return GenerationConfig.from_dict(config)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"the {task} config is invalid: {exc}") from None
    raise InvalidInput(f"the text task must be one of {list(jobs.TASKS)}, not {task!r}")


def named_tokens(config: TextConfig) -> list[str]:
    """Every token the config names (special and stop tokens): each must be in the tokenizer."""
    special = config.special
    found = [t for t in (special.bos, special.eos, special.pad) if t is not None]
    if isinstance(config, GenerationConfig):
        found += list(config.stop_tokens)
    return list(dict.fromkeys(found))


def check_tokens(report: TokenizerReport) -> None:
    if report.missing:
        missing = ", ".join(repr(t[:64]) for t in report.missing[:10])
        raise InvalidInput(f"the text config names tokens the tokenizer does not have: {missing}")


def check_graph(signature: Signature, config: TextConfig) -> None:
    """``InvalidArtifact`` when the graph does not fit the task."""
    inputs = {s.name: s for s in signature.inputs}
    outputs = {s.name: s for s in signature.outputs}
    if isinstance(config, EmbeddingConfig):
        _check_ids(inputs, _EMBEDDING_INPUTS, ("token_type_ids",), "an embedding model")
        hidden = outputs.get(config.output)
        if hidden is None:
            raise InvalidArtifact(
                f"the embedding model has no output {config.output!r} (the config's 'output'); "
                f"it has {sorted(outputs)[:10]}"
            )
        if len(hidden.shape) != 3 or hidden.dtype not in _FLOATS:
            raise InvalidArtifact(
                f"the embedding model's output {config.output!r} must be float hidden states "
                f"[batch, sequence, hidden], not {hidden.dtype} of rank {len(hidden.shape)}"
            )
        return
    caches = [s for s in (*signature.inputs, *signature.outputs) if s.name.startswith(_CACHE_PREFIXES)]
    for spec in caches:
        if len(spec.shape) != 4:
            raise InvalidArtifact(
                f"a generation model's {spec.name!r} must be [batch, heads, sequence, head_dim], "
                f"not of rank {len(spec.shape)}"
            )
    Decoder(_Session(signature))  # the generation runtime's own checks of the decoder-with-past layout
    ids = {n: s for n, s in inputs.items() if not n.startswith("past_key_values.")}
    _check_ids(ids, _EMBEDDING_INPUTS, _GENERATION_EXTRA, "a generation model")
    logits = outputs["logits"]
    if len(logits.shape) != 3 or logits.dtype not in _FLOATS:
        raise InvalidArtifact("a generation model's logits must be float [batch, sequence, vocab]")


def _check_ids(inputs: dict[str, TensorSpec], needed: Sequence[str], allowed: Sequence[str], what: str) -> None:
    missing = [n for n in needed if n not in inputs]
    if missing:
        raise InvalidArtifact(f"{what} needs int64 inputs {list(needed)}; it lacks {missing}")
    unknown = sorted(set(inputs) - set(needed) - set(allowed))
    if unknown:
        raise InvalidArtifact(f"{what} takes only {[*needed, *allowed][:8]} as inputs, not {unknown[:10]}")
    for spec in inputs.values():
        if spec.dtype != "int64" or len(spec.shape) != 2:
            raise InvalidArtifact(
                f"{what}'s input {spec.name!r} must be int64 [batch, sequence], "
                f"not {spec.dtype} of rank {len(spec.shape)}"
            )


def queue_signature(signature: Signature, config: TextConfig) -> Signature:
    """The signature stored for a text version: what its jobs carry on the queue."""
    ids = TensorSpec(jobs.INPUT_IDS, "int64", (None, None))
    if isinstance(config, EmbeddingConfig):
        hidden = next(s for s in signature.outputs if s.name == config.output).shape[-1]
        return Signature(
            (ids, TensorSpec(jobs.ATTENTION_MASK, "int64", (None, None))),
            (TensorSpec(jobs.EMBEDDING, "float32", (None, hidden)),),
            rows_independent=True,
        )
    return Signature(
        (TensorSpec(jobs.INPUT_IDS, "int64", (1, None)),),
        (
            TensorSpec(jobs.TEXT, "uint8", (1, None)),
            TensorSpec(jobs.USAGE, "int64", (1, 2)),
            TensorSpec(jobs.FINISH, "int64", (1,)),
        ),
        rows_independent=False,
    )


@dataclass(frozen=True, slots=True)
class _Arg:
    """A graph input or output as an onnxruntime session describes it (what ``Decoder`` reads)."""

    name: str
    shape: list[int | str]
    type: str


class _Session:
    """The declared inputs and outputs of a graph, in the shape of an onnxruntime session's
    ``get_inputs``/``get_outputs``: ``Decoder``'s layout checks need no session (nor its memory)."""

    def __init__(self, signature: Signature) -> None:
        self._inputs = [_arg(s) for s in signature.inputs]
        self._outputs = [_arg(s) for s in signature.outputs]

    def get_inputs(self) -> list[_Arg]:
        return self._inputs

    def get_outputs(self) -> list[_Arg]:
        return self._outputs


def _arg(spec: TensorSpec) -> _Arg:
    shape: list[int | str] = [d if d is not None else f"d{i}" for i, d in enumerate(spec.shape)]
    return _Arg(spec.name, shape, _ONNX_TYPES.get(spec.dtype, f"tensor({spec.dtype})"))


def stored_text(task: str, tokenizer_sha256: str, tokenizer_bytes: int, config: TextConfig) -> dict[str, Any]:
    """The ``text`` section of a version's stored metadata."""
    return {"task": task, "tokenizer": tokenizer_sha256, "tokenizer_bytes": tokenizer_bytes, "config": config.to_dict()}


def snapshot_text(meta: dict[str, Any]) -> dict[str, Any] | None:
    """What the snapshot carries of a version's text section (``bastion.snapshot.TextInfo``)."""
    text = meta.get("text")
    if not isinstance(text, dict) or not text.get("tokenizer"):
        return None
    return {"task": text["task"], "tokenizer": text["tokenizer"], "config": text.get("config") or {}}
