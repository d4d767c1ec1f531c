"""The configs a text version carries beside its ONNX graph and tokenizer (plain JSON objects).

``embedding``::

    {"pooling": "mean", "normalize": true, "max_length": 128, "add_special_tokens": true,
     "output": "last_hidden_state", "special_tokens": {"pad": "<|pad|>"}}

``generation``::

    {"max_context": 256, "special_tokens": {"bos": null, "eos": "<|eos|>", "pad": "<|pad|>"},
     "stop_tokens": ["<|end|>"], "chat_template": {"message": "...", "generation_prompt": "...",
     "pinned_system": null},
     "upstream": {"url": "http://10.0.0.7:8000/v1", "model": "...", "api_key_env": "...", "timeout_s": 60}}

``upstream`` (optional) makes the version an upstream one: generation is forwarded to that
OpenAI-compatible server (``bastion.text.upstream``; ``bastion.runtime.upstream`` at the worker).

``from_dict`` refuses unknown fields and wrong types with a ``ValueError`` whose message says which;
the registry turns it into its own error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bastion.text.chat import ChatTemplate
from bastion.text.tokenizer import SpecialTokens
from bastion.text.upstream import UpstreamConfig

POOLINGS = ("mean", "cls")
MAX_CONTEXT_LIMIT = 1 << 20


def _special(found: object) -> SpecialTokens:
    if found is None:
        return SpecialTokens()
    if not isinstance(found, Mapping) or set(found) - {"bos", "eos", "pad"}:
        raise ValueError("special_tokens must be an object with bos, eos and pad (each a string or null)")
    values = {k: found.get(k) for k in ("bos", "eos", "pad")}
    if any(v is not None and not isinstance(v, str) for v in values.values()):
        raise ValueError("each special token must be a string or null")
    return SpecialTokens(**values)


def _special_dict(special: SpecialTokens) -> dict[str, str | None]:
    return {"bos": special.bos, "eos": special.eos, "pad": special.pad}


def _check_fields(found: Mapping[str, Any], allowed: set[str], what: str) -> None:
    if not isinstance(found, Mapping):
        raise ValueError(f"the {what} config must be an object")
    unknown = set(found) - allowed
    if unknown:
        raise ValueError(f"unknown {what} config fields: {sorted(unknown)}")


def _int(found: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = found.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]")
    return value


def _bool(found: Mapping[str, Any], name: str, default: bool) -> bool:
    value = found.get(name, default)
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false")
    return value


@dataclass(frozen=True)
class EmbeddingConfig:
    pooling: str = "mean"
    normalize: bool = True
    max_length: int = 128
    add_special_tokens: bool = True
    output: str = "last_hidden_state"
    special: SpecialTokens = field(default_factory=SpecialTokens)

    @classmethod
    def from_dict(cls, found: Mapping[str, Any]) -> EmbeddingConfig:
        _check_fields(
            found, {"pooling", "normalize", "max_length", "add_special_tokens", "output", "special_tokens"}, "embedding"
        )
        pooling = found.get("pooling", "mean")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {list(POOLINGS)}")
        output = found.get("output", "last_hidden_state")
        if not isinstance(output, str):
            raise ValueError("output must be the name of the graph's hidden-state output")
        return cls(
            pooling=pooling,
            normalize=_bool(found, "normalize", True),
            max_length=_int(found, "max_length", 128, 1, MAX_CONTEXT_LIMIT),
            add_special_tokens=_bool(found, "add_special_tokens", True),
            output=output,
            special=_special(found.get("special_tokens")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_length": self.max_length,
            "add_special_tokens": self.add_special_tokens,
            "output": self.output,
            "special_tokens": _special_dict(self.special),
        }


@dataclass(frozen=True)
class GenerationConfig:
    max_context: int = 256
    special: SpecialTokens = field(default_factory=SpecialTokens)
    stop_tokens: tuple[str, ...] = ()
    chat_template: ChatTemplate | None = None
    upstream: UpstreamConfig | None = None  # set: an OpenAI-compatible server generates, not a graph

    @classmethod
    def from_dict(cls, found: Mapping[str, Any]) -> GenerationConfig:
        _check_fields(
            found, {"max_context", "special_tokens", "stop_tokens", "chat_template", "upstream"}, "generation"
        )
        stops = found.get("stop_tokens", [])
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop_tokens must be a list of token strings")
        template = found.get("chat_template")
        if template is not None and not isinstance(template, Mapping):
            raise ValueError("chat_template must be an object or null")
        special = _special(found.get("special_tokens"))
        if special.eos is None:
            raise ValueError("a generation config needs an eos special token")
        return cls(
            max_context=_int(found, "max_context", 256, 2, MAX_CONTEXT_LIMIT),
            special=special,
            stop_tokens=tuple(stops),
            chat_template=None if template is None else ChatTemplate.from_dict(template),
            upstream=None if found.get("upstream") is None else UpstreamConfig.from_dict(found["upstream"]),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_context": self.max_context,
            "special_tokens": _special_dict(self.special),
            "stop_tokens": list(self.stop_tokens),
            "chat_template": None if self.chat_template is None else self.chat_template.to_dict(),
        }
        if self.upstream is not None:
            out["upstream"] = self.upstream.to_dict()
        return out
