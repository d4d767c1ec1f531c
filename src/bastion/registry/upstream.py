"""Upstream versions at registration: a generation version answered by an OpenAI-compatible server.

Such a version has a tokenizer and a generation config like any other (the gateway counts prompt
tokens and renders the chat template with them), but no ONNX graph: its artifact is its
*descriptor*, a small JSON object (``bastion.text.upstream.UpstreamConfig``)::

    {"url": "http://10.0.0.7:8000/v1", "model": "llama-3.1-8b-instruct",
     "api_key_env": "BASTION_UPSTREAM_KEY_VLLM", "timeout_s": 60}

so that the version's sha256 (immutable, in the decision log) pins where its answers come from.
The descriptor is checked here (``parse_descriptor``: ``InvalidInput`` for a URL that is not plain
``http(s)://host:port/path``, one carrying credentials, a query or a fragment, a model name out of
bounds, an ``api_key_env`` that is not a variable name or names one of Bastion's own settings, a
timeout out of bounds) and stored in the config as ``upstream`` (``check_upstream``); the config may
name the same upstream itself, never a different one. The key itself is never registered: the
workers read it from their environment. Which servers a worker may reach is the worker's setting
(``BASTION_UPSTREAM_HOSTS``), not the registry's.
"""

from __future__ import annotations

from dataclasses import replace

import orjson

from bastion.errors import InvalidInput
from bastion.registry import text as text_versions
from bastion.signature import Signature
from bastion.text.config import GenerationConfig
from bastion.text.upstream import UpstreamConfig

MAX_DESCRIPTOR_BYTES = 4096


def is_descriptor(data: bytes) -> bool:
    """Whether an uploaded artifact is a descriptor (a JSON object), not an ONNX graph (a protobuf,
    whose first byte is a field tag, never ``{``)."""
    return data[:64].lstrip().startswith(b"{")


def is_upstream(config: text_versions.TextConfig) -> bool:
    return isinstance(config, GenerationConfig) and config.upstream is not None


def parse_descriptor(data: bytes) -> UpstreamConfig:
    """The upstream a descriptor names; ``InvalidInput`` saying what is wrong with it."""
    if len(data) > MAX_DESCRIPTOR_BYTES:
        raise InvalidInput(f"an upstream descriptor is at most {MAX_DESCRIPTOR_BYTES} bytes of JSON")
    try:
        found = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InvalidInput("the upstream descriptor is not JSON") from None
    if not isinstance(found, dict):
        raise InvalidInput("the upstream descriptor must be a JSON object with url and model")
    try:
        return UpstreamConfig.from_dict(found)
    except ValueError as exc:
        raise InvalidInput(f"the upstream descriptor is invalid: {exc}") from None


def descriptor(upstream: UpstreamConfig) -> bytes:
    """The canonical descriptor of ``upstream`` (what the CLI uploads as the artifact)."""
    return orjson.dumps(upstream.to_dict(), option=orjson.OPT_SORT_KEYS)


def check_upstream(config: text_versions.TextConfig, data: bytes) -> GenerationConfig:
    """An upstream version's config, its ``upstream`` set from the artifact (the descriptor);
    ``InvalidInput`` when the task is not generation, the artifact is not a valid descriptor, or the
    config names another upstream than the artifact."""
    if not isinstance(config, GenerationConfig):
        raise InvalidInput("only a generation version can be answered by an upstream server")
    if not is_descriptor(data):
        raise InvalidInput("an upstream version's artifact is its descriptor (JSON with url and model), not a graph")
    found = parse_descriptor(data)
    if config.upstream is not None and config.upstream != found:
        raise InvalidInput("the config's upstream and the artifact's descriptor name different servers")
    return replace(config, upstream=found)


def queue_signature(config: GenerationConfig) -> Signature:
    """The stored signature of an upstream version: a generation version's queue contract."""
    return text_versions.queue_signature(Signature((), ()), config)
