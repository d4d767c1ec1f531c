"""The OpenAI-compatible front door: ``/v1/models``, ``/v1/embeddings``, ``/v1/chat/completions``
and ``/v1/completions``, so that the ``openai`` SDK and the tools built on it work unchanged.

Each route is a thin translation onto the shared pipeline (``pipeline.begin`` / ``run_sync`` /
``start_sync``), like the Open Inference Protocol's: the same keys and scopes (``predict``),
tenants, policy routing, canaries, breakers, idempotency, budgets and decision log. The model is
named in the JSON body, so the caller is authenticated first, then the body (already bounded by
the edge's size limit) is read and parsed, then the pipeline routes it. The version routing
chooses must be a text version of the route's task (``VersionInfo.text.task``).

Text becomes tokens here, before anything is queued: the version's tokenizer (``textmodels``),
the chat template with the model's pinned system prompt (and a per-request canary marker in it
when the model's canary guard is on), and the context check (a prompt and ``max_tokens`` that do
not fit are a 400, never cut). The model's input guards screen every message first: a ``block``
is a 400 whose ``code`` names the guard and never reaches a worker; ``redact`` replaces the text
that is tokenized. Admission reserves the prompt's tokens plus ``max_tokens`` (embeddings: the
inputs' tokens) from the token budgets.

Errors on these routes take OpenAI's shape (``openai_errors``); a streamed answer that fails
part-way ends with an error event in that shape.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from bastion import codec, jsonbody, logs, metrics, problems, routing
from bastion import openaierrors as openai_errors
from bastion.errors import BastionError, DeadlineExceeded, InvalidInput, JobFailed, NotFound, Unavailable
from bastion.gateway import inbound, oip, pipeline, textstream
from bastion.gateway.auth import PREDICT, authenticate, authenticate_header, declares
from bastion.gateway.breakers import Outcome
from bastion.gateway.context import Call
from bastion.gateway.openai_requests import (
    ChatRequest,
    CompletionRequest,
    Sampling,
    chat_request,
    completion_request,
    document,
    embedding_request,
    model_name,
)
from bastion.gateway.state import GatewayState
from bastion.gateway.textmodels import INLINE_CHARS, tokenize, tokenize_async
from bastion.guards import Decision, GuardResult, Guards, new_marker, pin_system_prompt
from bastion.responses import json_response
from bastion.text.chat import ChatTemplate, Message
from bastion.text.config import EmbeddingConfig, GenerationConfig
from bastion.text.generation import SamplingParams
from bastion.text.jobs import (
    ATTENTION_MASK,
    EMBEDDING,
    FINISH_CANCELLED,
    FINISH_LENGTH,
    INPUT_IDS,
    TASK_EMBEDDING,
    TASK_GENERATION,
    Completion,
    GenerationRequest,
    StreamEvent,
    cancel_key,
)
from bastion.text.tokenizer import TextTokenizer

log = logs.get("bastion.gateway.openai")

OWNED_BY = "bastion"
# codes of 400s that refuse what a text says (a guard's block, a prompt too long), not how it was sent
CONTENT_REFUSALS = frozenset({"injection", "pii_in", "control_tokens"})
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
# how a generation's finish reads in OpenAI's vocabulary: a cancelled one (the client left, the
# deadline passed) is cut short, as a length limit would cut it
_FINISH = {FINISH_CANCELLED: FINISH_LENGTH}


# errors -----------------------------------------------------------------------------------
def error_response(exc: BastionError) -> Response:
    """``exc`` in OpenAI's shape, with the status and headers it has anywhere else."""
    param, code = exc.extra.get("param"), exc.extra.get("code")
    return openai_errors.error(
        problems.status_of(exc),
        exc.detail,
        problems.headers_of(exc),
        param=param if isinstance(param, str) else None,
        code=code if isinstance(code, str) else None,
    )


def error_event(exc: BastionError) -> bytes:
    param, code = exc.extra.get("param"), exc.extra.get("code")
    found = openai_errors.body(
        problems.status_of(exc),
        exc.detail,
        param=param if isinstance(param, str) else None,
        code=code if isinstance(code, str) else None,
    )
    return b"data: " + orjson.dumps(found) + b"\n\n"


def shaped(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Answer every error of ``handler`` in OpenAI's shape; an unexpected one is a bare 500."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except BastionError as exc:
            metrics.ERRORS.labels("http", type(exc).__name__).inc()
            if exc.extra.get("code") in CONTENT_REFUSALS:
                # a decision on the text, not a broken or hostile request: no abuse strike (a tenant
                # relaying its users' prompts would otherwise be banned for what one of them wrote)
                request.state.no_strike = True
            return error_response(exc)
        except ClientDisconnect:
            raise
        except Exception as exc:
            metrics.ERRORS.labels("http", "internal").inc()
            log.exception("openai_route_failed", path=request.url.path, error_type=type(exc).__name__)
            return openai_errors.error(500, "internal error")

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


# arrival ----------------------------------------------------------------------------------
async def arrive(request: Request) -> tuple[inbound.Inbound, dict[str, Any]]:
    """Authenticate the caller, then read and parse the body, then build the pipeline's
    ``Inbound`` for the model the body names (the pipeline authenticates again: a lookup)."""
    state = pipeline.state_of(request)
    scope = request.scope
    headers = inbound.http_headers(scope)

    def on_key(key_id: str) -> None:
        request.state.key_id = key_id  # the abuse guard counts a failure against the key too

    await authenticate_header(headers.get("authorization"), state, PREDICT, on_key)
    oip.refuse_encoded(scope)
    body = await request.body()
    doc = document(jsonbody.parse_json(body, headers.get("content-type")))
    name = model_name(doc)

    async def read() -> bytes:
        return body

    arrival = inbound.Inbound(
        state=state,
        request_id=scope.get("state", {}).get("request_id", ""),
        model=name,
        path=scope["path"],
        headers=headers,
        read=read,
        decode=lambda _body, _headers: doc,
        on_key=on_key,
    )
    return arrival, doc


def text_config(state: GatewayState, call: Call, task: str) -> EmbeddingConfig | GenerationConfig:
    """The chosen version's config, when it is a text version of ``task``; else a 400."""
    version = call.chosen
    text = version.text
    if text is None or text.task != task:
        what = "an embedding" if task == TASK_EMBEDDING else "a text generation"
        raise InvalidInput(
            f"model {call.model!r} is not {what} model", param="model", code="model_not_supported", model=call.model
        )
    return state.text.config(version)


async def screen(
    state: GatewayState, call: Call, texts: Sequence[str], param: str, chars: int
) -> tuple[list[str], Guards | None]:
    """The model's input guards on the caller's texts: the texts to pass on (redacted per policy),
    or a 400 whose ``code`` names the guard that blocked them. Each decision is counted. Long
    texts are screened in a thread (redacting many values takes a while): the event loop serves on."""
    guards = state.text.guards(call.model, state.snapshots.current.models.get(call.model))
    if guards is None:
        return list(texts), None
    if chars <= INLINE_CHARS:
        out, results = guards.check_input(texts)
    else:
        out, results = await asyncio.to_thread(guards.check_input, texts)
    blocked: GuardResult | None = None
    call.guards = [result.to_dict() for result in results]
    for result in results:
        metrics.GUARD_DECISIONS.labels(call.model, result.guard, str(result.decision)).inc()
        metrics.GUARD_SECONDS.labels(result.guard).observe(result.latency_us / 1e6)
        if result.decision is Decision.REDACT:
            for kind, count in result.counts.items():
                metrics.PII_REDACTED.labels(call.model, result.guard, kind.split(":")[0]).inc(count)
        if result.blocked and blocked is None:
            blocked = result
    flagged = [r.guard for r in results if r.decision is Decision.FLAG]
    if flagged:
        log.info("guard_flagged", model=call.model, guards=flagged)
    if blocked is not None:
        log.info("guard_blocked", model=call.model, guard=blocked.guard, rules=list(blocked.rules)[:8])
        # the guard's name, not the rules that matched: those would tell an attacker which
        # obfuscation to try next (they are in the log and the metrics)
        raise InvalidInput(f"the request was refused by the {blocked.guard} guard", param=param, code=blocked.guard)
    return out, guards


def wait_of(state: GatewayState, arrival: inbound.Inbound, call: Call) -> float:
    return pipeline.timeout_s(state, arrival.headers.get("x-bastion-timeout-ms"), call.model)


# /v1/models -------------------------------------------------------------------------------
def _model_entry(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNED_BY}


@shaped
async def list_models(request: Request) -> Response:
    """The text models this caller may reach (the version policy would route it to is a text one)."""
    state = pipeline.state_of(request)
    call = Call(request.scope.get("state", {}).get("request_id", ""))
    call.principal = await authenticate(request, state, *PREDICT)
    call.choose_subject(None)
    key = call.key
    data = []
    for name, routes in sorted(state.snapshots.current.models.items()):
        try:
            routed = routing.choose(name, routes, call.subject, key.tenant, key.jurisdiction, key.consents)
        except BastionError:
            continue  # not for this caller (policy), or not serving now
        if routed.version.text is not None:
            data.append(_model_entry(name))
    return json_response({"object": "list", "data": data})


@shaped
async def retrieve_model(request: Request) -> Response:
    """One text model this caller may reach (404 otherwise, whether or not it exists)."""
    state = pipeline.state_of(request)
    name = request.path_params["name"]
    call = Call(request.scope.get("state", {}).get("request_id", ""))
    call.principal = await authenticate(request, state, *PREDICT)
    call.choose_subject(None)
    try:
        pipeline.route(state, call, name)
    except BastionError:
        raise NotFound(f"the model {name[:64]!r} does not exist or you do not have access to it") from None
    if call.chosen.text is None:
        raise NotFound(f"the model {name[:64]!r} is not a text model")
    return json_response(_model_entry(name))


# /v1/embeddings ---------------------------------------------------------------------------
@shaped
async def embeddings(request: Request) -> Response:
    """Embed a string or a list of strings with the model's encoder."""
    arrival, doc = await arrive(request)
    settings = arrival.state.settings
    asked = embedding_request(doc, max_inputs=settings.max_embedding_inputs, max_chars=settings.max_prompt_chars)
    state, call, _ = await pipeline.begin(arrival, PREDICT)
    with pipeline.breaker_call(state, call):
        config = text_config(state, call, TASK_EMBEDDING)
        assert isinstance(config, EmbeddingConfig)  # noqa: S101 - text_config checked the task
        if asked.dimensions is not None:
            _check_dimensions(call, asked.dimensions, None)
        texts, _ = await screen(state, call, asked.inputs, "input", asked.chars)
        tokenizer = await state.text.tokenizer(state.redis, call.chosen, config.special)
        batch = await tokenize_async(
            lambda: tokenizer.encode_batch(
                texts, max_length=config.max_length, add_special_tokens=config.add_special_tokens
            ),
            asked.chars,
        )
        lengths = batch.lengths
        for i, length in enumerate(lengths):
            if length == 0:
                raise InvalidInput(f"'input[{i}]' has no tokens under this model's tokenizer", param="input")
        tensors = {INPUT_IDS: batch.input_ids, ATTENTION_MASK: batch.attention_mask}
        call.rows = len(texts)
        prompt_tokens = sum(lengths)
        outputs = await pipeline.run_sync(state, call, tensors, wait_of(state, arrival, call), tokens=prompt_tokens)
    admission = call.admission
    if admission is not None and admission.replayed_job is None and not admission.cached:
        pipeline.copy_to_shadows(state, call, tensors, outputs)
    vectors = outputs.get(EMBEDDING)
    if not isinstance(vectors, np.ndarray) or vectors.ndim != 2 or len(vectors) != len(texts):
        raise JobFailed("the model returned no embedding for each input", job_id=call.job_id)
    if asked.dimensions is not None:
        _check_dimensions(call, asked.dimensions, int(vectors.shape[1]))
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    data: list[dict[str, Any]] = []
    for i, row in enumerate(vectors):
        value: Any = base64.b64encode(row.tobytes()).decode() if asked.encoding == "base64" else row
        data.append({"object": "embedding", "index": i, "embedding": value})
    body = {
        "object": "list",
        "data": data,
        "model": call.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return json_response(body, headers=_headers(call))


def _check_dimensions(call: Call, asked: int, found: int | None) -> None:
    """``dimensions`` must be the model's own (no truncation): known from the signature before the
    job runs when it declares them, else from the answer."""
    if found is None:
        spec = next((t for t in call.chosen.signature.outputs if t.name == EMBEDDING), None)
        last = spec.shape[-1] if spec is not None and spec.shape else None
        found = last if isinstance(last, int) and last > 0 else None
    if found is not None and found != asked:
        raise InvalidInput(f"this model's embeddings have {found} dimensions, not {asked}", param="dimensions")


# generation -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Prepared:
    """A generation job ready to queue: its prompt, its request and the tokens to reserve."""

    tensors: dict[str, np.ndarray]
    request: GenerationRequest
    prompt_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.request.max_tokens


def _generation_request(
    ids: list[int], sampling: Sampling, config: GenerationConfig, marker: str, param: str
) -> GenerationRequest:
    """Check the prompt and ``max_tokens`` fit the context (a 400 otherwise, never cut)."""
    room = config.max_context - len(ids)
    if room < 1:
        raise InvalidInput(
            f"the prompt has {len(ids)} tokens; this model's context is {config.max_context} tokens",
            param=param,
            code="context_length_exceeded",
        )
    max_tokens = sampling.max_tokens if sampling.max_tokens is not None else room
    if max_tokens > room:
        raise InvalidInput(
            f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: together they exceed this model's "
            f"context of {config.max_context} tokens (at most {room} tokens can be generated)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    params = SamplingParams(max_tokens, sampling.temperature, sampling.top_p, sampling.seed, sampling.stop)
    return GenerationRequest(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        stop=params.stop,
        stream=sampling.stream,
        marker=marker,
        schema=sampling.schema,
    )


def _canary(template: ChatTemplate | None, guards: Guards | None) -> tuple[ChatTemplate | None, str]:
    """The template with a fresh canary marker in its pinned system prompt, when the model's canary
    guard is on and it pins one (no pinned prompt: nothing to leak, no marker)."""
    if template is None or template.pinned_system is None or guards is None or guards.canary_action is None:
        return template, ""
    marker = new_marker()
    return replace(template, pinned_system=pin_system_prompt(template.pinned_system, marker)), marker


def _pinned_prefix(tokenizer: TextTokenizer, template: ChatTemplate | None) -> list[int]:
    """A raw completion's ids before the prompt: BOS, and the pinned system prompt as the chat
    template renders it (a prompt never replaces it)."""
    ids = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if template is not None and template.pinned_system is not None:
        before, after = template.message.split("{content}")
        ids += tokenizer.encode(before.replace("{role}", "system"), split_special=True)
        ids += tokenizer.encode(template.pinned_system)
        ids += tokenizer.encode(after.replace("{role}", "system"), split_special=True)
    return ids


async def _prepare(state: GatewayState, call: Call, asked: ChatRequest | CompletionRequest) -> Prepared:
    config = text_config(state, call, TASK_GENERATION)
    assert isinstance(config, GenerationConfig)  # noqa: S101 - text_config checked the task
    if isinstance(asked, ChatRequest):
        if config.chat_template is None:
            raise InvalidInput(
                f"model {call.model!r} has no chat template: use /v1/completions",
                param="model",
                code="model_not_supported",
            )
        texts, guards = await screen(state, call, [m.content for m in asked.messages], "messages", asked.chars)
        messages = [Message(m.role, text) for m, text in zip(asked.messages, texts, strict=True)]
        chat, marker = _canary(config.chat_template, guards)
        render = chat or config.chat_template
        tokenizer = await state.text.tokenizer(state.redis, call.chosen, config.special)
        ids = await tokenize_async(lambda: render.encode(tokenizer, messages), asked.chars)
        param = "messages"
    else:
        (prompt,), guards = await screen(state, call, [asked.prompt], "prompt", asked.chars)
        template, marker = _canary(config.chat_template, guards)
        tokenizer = await state.text.tokenizer(state.redis, call.chosen, config.special)
        prefix = tokenize(lambda: _pinned_prefix(tokenizer, template))
        ids = prefix + await tokenize_async(lambda: tokenizer.encode(prompt), asked.chars)
        param = "prompt"
    request = _generation_request(ids, asked.sampling, config, marker, param)  # (the context check first)
    if config.upstream is not None and not await tokenize_async(
        lambda: tokenizer.markers_survive_as_text(ids), asked.chars
    ):
        # the upstream gets the prompt as text and matches special tokens in it: a client's text
        # that reads as a role marker there would forge a turn (here it is plain text)
        raise InvalidInput(
            "the text holds the model's control tokens (role markers or an end of sequence); they are not "
            "accepted for this model",
            param=param,
            code="control_tokens",
        )
    call.rows = 1
    return Prepared({INPUT_IDS: np.asarray([ids], dtype=np.int64)}, request, len(ids))


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(reason: str) -> str:
    return _FINISH.get(reason, reason)


class Render:
    """The answer's JSON in the route's vocabulary: chat completions or text completions."""

    def __init__(self, chat: bool, call: Call) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + call.job_id
        self.model = call.model
        self.created = int(time.time())
        self.first = True

    def whole(self, completion: Completion) -> dict[str, Any]:
        finish = _finish(completion.finish)
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {"index": 0, "text": completion.text, "logprobs": None, "finish_reason": finish}
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": _usage(completion.prompt_tokens, completion.completion_tokens),
        }

    def chunk(self, text: str | None, finish: str | None, usage: bool, entry_id: str = "") -> bytes:
        if self.chat:
            delta: dict[str, Any] = {}
            if self.first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        self.first = False
        found: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if usage:
            found["usage"] = None
        # SSE's own id field: the chunk's stream entry (Redis's time of production); clients ignore it
        head = b"id: " + entry_id.encode() + b"\n" if entry_id else b""
        return head + b"data: " + orjson.dumps(found) + b"\n\n"

    def usage_chunk(self, prompt: int, completion: int) -> bytes:
        found: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": _usage(prompt, completion),
        }
        return b"data: " + orjson.dumps(found) + b"\n\n"


async def _generate(request: Request, chat: bool) -> Response:
    arrival, doc = await arrive(request)
    settings = arrival.state.settings
    asked: ChatRequest | CompletionRequest
    if chat:
        asked = chat_request(doc, max_messages=settings.max_messages, max_chars=settings.max_prompt_chars)
    else:
        asked = completion_request(doc, max_chars=settings.max_prompt_chars)
    state, call, _ = await pipeline.begin(arrival, PREDICT)
    if not asked.sampling.stream:
        with pipeline.breaker_call(state, call, timed=False):
            job = await _prepare(state, call, asked)
            outputs = await pipeline.run_sync(
                state,
                call,
                job.tensors,
                wait_of(state, arrival, call),
                tokens=job.tokens,
                generation=job.request.to_member(),
            )
        completion = textstream.completion_of(outputs, call.job_id)
        return json_response(Render(chat, call).whole(completion), headers=_headers(call))
    router = state.chunks
    sub: textstream.Subscription | None = None
    try:
        if router is None:
            raise Unavailable("this gateway cannot stream answers")
        job = await _prepare(state, call, asked)
        started = time.monotonic()
        queued = await pipeline.start_sync(
            state,
            call,
            codec.encode(job.tensors),
            wait_of(state, arrival, call),
            tokens=job.tokens,
            generation=job.request.to_member(),
        )
        try:
            if call.admission is None or call.admission.replayed_job is None:
                sub = await router.subscribe(queued.own_id)
        except BaseException:
            queued.close()
            state.spawn(_cancel(state, queued.own_id))
            raise
    except BaseException:
        state.breakers.record(call.permit, Outcome.IGNORED)
        raise
    relay = Relayed(state, call, queued, Render(chat, call), asked.sampling.include_usage, started)
    return textstream.EventStream(relay.events(router, sub), _headers(call), relay.close)


def _headers(call: Call) -> dict[str, str]:
    """The pipeline's response headers, and the job that answered (its id names the decision)."""
    return {**pipeline.response_headers(call), "X-Bastion-Job-Id": call.job_id}


async def _cancel(state: GatewayState, job_id: str) -> None:
    """Set the job's cancel flag: its worker ends the generation at its next step."""
    try:
        await state.redis.set(cancel_key(job_id), b"1", ex=state.settings.text_stream_ttl_s)
    except Exception as exc:  # the generation then runs to its end; the budget still settles
        log.warning("cancel_flag_failed", job_id=job_id, error_type=type(exc).__name__)


class Relayed:
    """One streamed answer: the SSE events, and what its end tells the breaker and the worker."""

    def __init__(
        self,
        state: GatewayState,
        call: Call,
        queued: pipeline.Queued,
        render: Render,
        include_usage: bool,
        started: float,
    ) -> None:
        self.state, self.call, self.queued, self.render = state, call, queued, render
        self.include_usage = include_usage
        self.started = started
        self.outcome = Outcome.IGNORED
        self.first_token_s: float | None = None
        self.ended = False  # the generation ended on its own (no cancel flag needed)

    async def events(
        self, router: textstream.ChunkRouter, sub: textstream.Subscription | None
    ) -> AsyncGenerator[bytes, None]:
        """The SSE events of the answer (``sub`` None: an Idempotency-Key replay, from its outcome)."""
        render = self.render
        queued = self.queued
        try:
            found: AsyncIterator[StreamEvent | None]
            if sub is None:
                found = textstream.from_reply(self.call, await queued.outcome(), [])
            else:
                found = textstream.relay(queued, router, sub, self.state.settings.stream_keepalive_s)
            async for event in found:
                if event is None:
                    yield KEEPALIVE
                    continue
                if event.text:
                    if self.first_token_s is None:  # the breaker's measure (the worker observes the metric)
                        self.first_token_s = time.monotonic() - self.started
                    yield render.chunk(event.text, None, self.include_usage, event.entry_id)
                if event.finish is not None:
                    self.ended = True
                    self.outcome = Outcome.OK
                    yield render.chunk(None if not render.first else "", _finish(event.finish), self.include_usage)
                    if self.include_usage:
                        yield render.usage_chunk(event.prompt_tokens, event.completion_tokens)
                    yield DONE
                    return
        except BastionError as exc:
            if isinstance(exc, JobFailed):
                self.ended, self.outcome = True, Outcome.FAILED
            elif isinstance(exc, DeadlineExceeded):
                self.outcome = Outcome.TIMEOUT
            metrics.ERRORS.labels("http", type(exc).__name__).inc()
            yield error_event(exc)
        except Exception as exc:  # a fault of ours: the client still gets an error event, not a cut stream
            metrics.ERRORS.labels("http", "internal").inc()
            log.exception("openai_stream_failed", job_id=self.queued.own_id, error_type=type(exc).__name__)
            yield error_event(Unavailable("internal error"))

    def close(self, disconnected: bool) -> None:
        """The answer is over (``disconnected``: the client left first): stop the generation at the
        worker unless it ended, and hand the breaker's permit back."""
        self.queued.close()
        if self.state.chunks is not None:  # the relay gives it up too; this covers one never started
            self.state.chunks.unsubscribe(self.queued.own_id)
        if not self.ended:
            self.state.spawn(_cancel(self.state, self.queued.own_id))
        if disconnected:
            self.outcome = Outcome.IGNORED
        self.state.breakers.record(self.call.permit, self.outcome, self.first_token_s)


@shaped
async def chat_completions(request: Request) -> Response:
    """Chat completion (``stream: true`` for server-sent events as tokens are produced)."""
    return await _generate(request, chat=True)


@shaped
async def completions(request: Request) -> Response:
    """Text completion of a prompt (``stream: true`` for server-sent events)."""
    return await _generate(request, chat=False)


ROUTES = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{name}", retrieve_model, methods=["GET"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
]

_TAG = "openai"
_ERROR = {
    "description": "an error in OpenAI's shape",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "message": {"type": "string"},
                            "type": {"type": "string"},
                            "param": {"type": ["string", "null"]},
                            "code": {"type": ["string", "null"]},
                        },
                    }
                },
            }
        }
    },
}
_ERRORS = {str(code): _ERROR for code in (400, 401, 403, 404, 413, 415, 429, 502, 503, 504)}
_JSON_OK = {"description": "success", "content": {"application/json": {"schema": {"type": "object"}}}}
_SSE_OK = {
    "description": "success: JSON, or with 'stream': true server-sent events ending in 'data: [DONE]'",
    "content": {
        "application/json": {"schema": {"type": "object"}},
        "text/event-stream": {"schema": {"type": "string"}},
    },
}


def _openapi(summary: str, op_id: str, ok: dict[str, Any], body: bool = True, **extra: Any) -> dict[str, Any]:
    found: dict[str, Any] = {
        **declares(PREDICT),
        "summary": summary,
        "operationId": op_id,
        "tags": [_TAG],
        "security": [{"apiKey": []}],
        "responses": {"200": ok, **_ERRORS},
        **extra,
    }
    if body:
        found["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object", "required": ["model"]}}},
        }
    return found


OPENAPI_PATHS: dict[str, Any] = {
    "/v1/models": {"get": _openapi("List the text models this key may use (OpenAI)", "openai_models", _JSON_OK, False)},
    "/v1/models/{name}": {
        "get": _openapi(
            "One text model (OpenAI)",
            "openai_model",
            _JSON_OK,
            False,
            parameters=[{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
        )
    },
    "/v1/embeddings": {"post": _openapi("Embeddings (OpenAI)", "openai_embeddings", _JSON_OK)},
    "/v1/chat/completions": {"post": _openapi("Chat completions (OpenAI)", "openai_chat", _SSE_OK)},
    "/v1/completions": {"post": _openapi("Text completions (OpenAI)", "openai_completions", _SSE_OK)},
}
