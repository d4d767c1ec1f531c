"""The OpenAI request bodies, checked: ``/v1/embeddings``, ``/v1/chat/completions``, ``/v1/completions``.

Each parser takes the decoded JSON document and returns a small frozen request, or raises
``InvalidInput`` naming the field at fault (``param``) in a message a client can act on. Nothing
here knows a model: the checks against the version (context, tokenizer) come after routing.

Fields OpenAI defines that Bastion does not implement (tools, logprobs, penalties, ``n`` > 1) are
refused with a 400 rather than ignored, so that a client never gets an answer computed other than
it asked; fields that change nothing (``user``, ``metadata``, ``store``, ``service_tier``) are
accepted. Unknown fields are refused, as OpenAI refuses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bastion.errors import InvalidInput
from bastion.guards.output import SchemaError, check_schema
from bastion.text.chat import Message
from bastion.text.generation import MAX_STOP_CHARS, MAX_STOPS

MAX_MODEL_CHARS = 256
MAX_SEED = 1 << 64
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
ENCODINGS = ("float", "base64")
_FORMAT = "response_format"
_TOO_LONG = "context_length_exceeded"

_INERT = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
_GENERATION_FIELDS = frozenset(
    {
        "model",
        "stream",
        "stream_options",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "n",
        "response_format",
        "frequency_penalty",
        "presence_penalty",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
    }
)
CHAT_FIELDS = _GENERATION_FIELDS | _INERT | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = _GENERATION_FIELDS | _INERT | {"prompt", "echo", "best_of", "suffix"}
EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


def invalid(message: str, param: str | None = None, code: str | None = None) -> InvalidInput:
    return InvalidInput(message, param=param, code=code)


@dataclass(frozen=True, slots=True)
class Sampling:
    """What a generation request asks for, checked (``max_tokens`` None: up to the context)."""

    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    schema: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: tuple[Message, ...]
    sampling: Sampling
    chars: int


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    model: str
    prompt: str
    sampling: Sampling
    chars: int


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    encoding: str
    dimensions: int | None
    chars: int


# shared -----------------------------------------------------------------------------------
def document(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise invalid("the body must be a JSON object")
    return doc


def model_name(doc: dict[str, Any]) -> str:
    """The ``model`` a body names (routing checks that it exists and that the caller may reach it)."""
    name = doc.get("model")
    if not isinstance(name, str) or not name:
        raise invalid("'model' is required: the name of the model to use (a string)", "model")
    if len(name) > MAX_MODEL_CHARS:
        raise invalid(f"'model' is longer than {MAX_MODEL_CHARS} characters", "model")
    return name


def _unknown(doc: Mapping[str, Any], known: frozenset[str]) -> None:
    for name in doc:
        if name not in known:
            raise invalid(f"unrecognized request argument supplied: {str(name)[:64]!r}", str(name)[:64])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(doc: Mapping[str, Any], name: str, default: float, low: float, high: float, *, open_low: bool) -> float:
    value = doc.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"'{name}' must be a number", name)
    number = float(value)
    below = number <= low if open_low else number < low
    if below or number > high or number != number:
        bounds = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
        raise invalid(f"'{name}' must be in {bounds}, got {number:g}", name)
    return number


def _refuse_set(doc: Mapping[str, Any], name: str, what: str, *, allowed: tuple[Any, ...] = (None, False)) -> None:
    """Refuse ``name`` unless it is absent, empty or one of ``allowed`` (what changes nothing)."""
    value = doc.get(name)
    if value is None or value == [] or value == {}:
        return
    if any(type(value) is type(a) and value == a for a in allowed):
        return
    raise invalid(f"'{name}' is not supported: {what}", name)


def _max_tokens(doc: Mapping[str, Any], fields: tuple[str, ...]) -> int | None:
    found: int | None = None
    for name in fields:
        value = doc.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise invalid(f"'{name}' must be a positive integer", name)
        found = value if found is None else min(found, value)
    return found


def _stream(doc: Mapping[str, Any]) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``."""
    stream = doc.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("'stream' must be true or false", "stream")
    options = doc.get("stream_options")
    if options is None:
        return bool(stream), False
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise invalid("'stream_options' must be an object with 'include_usage'", "stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise invalid("'stream_options.include_usage' must be true or false", "stream_options")
    if not stream:
        raise invalid("'stream_options' is only allowed with 'stream': true", "stream_options")
    return True, usage


def _seed(doc: Mapping[str, Any]) -> int | None:
    seed = doc.get("seed")
    if seed is None:
        return None
    if not _is_int(seed) or not -(1 << 63) <= seed < MAX_SEED:
        raise invalid("'seed' must be an integer", "seed")
    return int(seed) % MAX_SEED  # a negative seed names the same stream as its two's complement


def _unsupported(doc: Mapping[str, Any]) -> None:
    """Refuse what would change the answer but is not implemented (rather than ignore it)."""
    n = doc.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise invalid("only 'n': 1 is supported (one choice per request)", "n")
    for name in ("frequency_penalty", "presence_penalty"):
        value = doc.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise invalid(f"'{name}' must be a number", name)
        if value:
            raise invalid(f"'{name}' is not supported (only 0)", name)
    _refuse_set(doc, "logprobs", "token log probabilities are not returned")
    _refuse_set(doc, "top_logprobs", "token log probabilities are not returned", allowed=(0,))
    _refuse_set(doc, "logit_bias", "logit biases are not applied")
    for name in ("tools", "functions"):
        _refuse_set(doc, name, "this gateway does not call tools")
    for name in ("tool_choice", "function_call"):
        _refuse_set(doc, name, "this gateway does not call tools", allowed=("none",))


def _sampling(doc: dict[str, Any], max_tokens_fields: tuple[str, ...]) -> Sampling:
    stream, include_usage = _stream(doc)
    _unsupported(doc)
    return Sampling(
        max_tokens=_max_tokens(doc, max_tokens_fields),
        temperature=_number(doc, "temperature", 1.0, 0.0, 2.0, open_low=False),
        top_p=_number(doc, "top_p", 1.0, 0.0, 1.0, open_low=True),
        seed=_seed(doc),
        stop=_stops(doc.get("stop")),
        stream=stream,
        include_usage=include_usage,
        schema=_response_format(doc.get("response_format")),
    )


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    found = [value] if isinstance(value, str) else value
    if not isinstance(found, list) or not all(isinstance(s, str) for s in found):
        raise invalid("'stop' must be a string or a list of strings", "stop")
    if len(found) > MAX_STOPS or any(not 0 < len(s) <= MAX_STOP_CHARS for s in found):
        raise invalid(f"'stop' takes at most {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters", "stop")
    return tuple(found)


def _response_format(value: Any) -> dict[str, Any] | None:
    """The JSON schema the answer must match (``json_object``: any object); None for text."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise invalid("'response_format' must be an object with a 'type'", "response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise invalid("'response_format.type' must be 'text', 'json_object' or 'json_schema'", "response_format")
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if schema is None and isinstance(spec, dict):
        schema = {}
    if not isinstance(schema, dict):
        raise invalid("'response_format.json_schema.schema' must be a JSON schema (an object)", "response_format")
    try:
        check_schema(schema)
    except SchemaError as exc:
        raise invalid(
            f"'response_format.json_schema.schema' is not a valid JSON schema: {exc}", "response_format"
        ) from None
    except RecursionError:
        raise invalid("'response_format.json_schema.schema' is nested too deeply", _FORMAT) from None
    return schema


def _content(value: Any, index: int) -> str:
    where = f"messages[{index}].content"
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(f"'{where}' must be a string or a list of text parts", where)
    parts: list[str] = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise invalid(f"'{where}' may hold only text parts ({{'type': 'text', 'text': ...}})", where)
        parts.append(part["text"])
    return "".join(parts)


def _limit_chars(chars: int, max_chars: int, param: str) -> None:
    if chars > max_chars:
        raise invalid(
            f"the request carries {chars} characters of text; the limit is {max_chars}",
            param,
            "context_length_exceeded",
        )


# the routes' requests ---------------------------------------------------------------------
def chat_request(doc: Any, *, max_messages: int, max_chars: int) -> ChatRequest:
    doc = document(doc)
    name = model_name(doc)
    _unknown(doc, CHAT_FIELDS)
    found = doc.get("messages")
    if not isinstance(found, list) or not found:
        raise invalid("'messages' must be a non-empty list of messages", "messages")
    if len(found) > max_messages:
        raise invalid(f"'messages' holds {len(found)} messages; the limit is {max_messages}", "messages")
    messages: list[Message] = []
    chars = 0
    for i, item in enumerate(found):
        if not isinstance(item, dict):
            raise invalid(f"'messages[{i}]' must be an object with 'role' and 'content'", f"messages[{i}]")
        role = item.get("role")
        if not isinstance(role, str) or role not in ROLE_ALIASES:
            shown = role[:32] if isinstance(role, str) else role.__class__.__name__
            raise invalid(
                f"'messages[{i}].role' must be one of {sorted(ROLE_ALIASES)}, not {shown!r}", f"messages[{i}].role"
            )
        if item.get("tool_calls") or item.get("function_call"):
            raise invalid("this gateway does not call tools", f"messages[{i}].tool_calls")
        name_field = item.get("name")
        if name_field is not None and not isinstance(name_field, str):
            raise invalid(f"'messages[{i}].name' must be a string", f"messages[{i}].name")
        if "content" not in item:
            raise invalid(f"'messages[{i}].content' is required", f"messages[{i}].content")
        content = _content(item.get("content"), i)
        chars += len(content)
        _limit_chars(chars, max_chars, "messages")
        messages.append(Message(ROLE_ALIASES[role], content))
    return ChatRequest(name, tuple(messages), _sampling(doc, ("max_tokens", "max_completion_tokens")), chars)


def completion_request(doc: Any, *, max_chars: int) -> CompletionRequest:
    doc = document(doc)
    name = model_name(doc)
    _unknown(doc, COMPLETION_FIELDS)
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("'prompt' must be a string (one prompt per request; token arrays are not accepted)", "prompt")
    if not prompt:
        raise invalid("'prompt' must not be empty", "prompt")
    _limit_chars(len(prompt), max_chars, "prompt")
    _refuse_set(doc, "echo", "the prompt is not echoed")
    _refuse_set(doc, "suffix", "suffixes are not supported", allowed=("",))
    best_of = doc.get("best_of")
    if best_of is not None and (not _is_int(best_of) or best_of != 1):
        raise invalid("only 'best_of': 1 is supported", "best_of")
    return CompletionRequest(name, prompt, _sampling(doc, ("max_tokens",)), len(prompt))


def embedding_request(doc: Any, *, max_inputs: int, max_chars: int) -> EmbeddingRequest:
    doc = document(doc)
    name = model_name(doc)
    _unknown(doc, EMBEDDING_FIELDS)
    found = doc.get("input")
    if isinstance(found, str):
        found = [found]
    if not isinstance(found, list) or not found:
        raise invalid("'input' must be a string or a non-empty list of strings", "input")
    if len(found) > max_inputs:
        raise invalid(f"'input' holds {len(found)} strings; the limit is {max_inputs}", "input")
    chars = 0
    for i, text in enumerate(found):
        if not isinstance(text, str):
            raise invalid(
                f"'input[{i}]' must be a string (token arrays are not accepted: this model has its own tokenizer)",
                "input",
            )
        if not text:
            raise invalid(f"'input[{i}]' must not be empty", "input")
        chars += len(text)
        _limit_chars(chars, max_chars, "input")
    encoding = doc.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODINGS:
        raise invalid("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dimensions = doc.get("dimensions")
    if dimensions is not None and (not _is_int(dimensions) or dimensions < 1):
        raise invalid("'dimensions' must be a positive integer", "dimensions")
    if doc.get("user") is not None and not isinstance(doc.get("user"), str):
        raise invalid("'user' must be a string", "user")
    return EmbeddingRequest(name, tuple(found), str(encoding), dimensions, chars)
