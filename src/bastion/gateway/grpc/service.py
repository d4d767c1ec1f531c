"""``inference.GRPCInferenceService``: the Open Inference Protocol's gRPC methods, each a translation
to the gateway's one pipeline (``gateway.pipeline``), as the HTTP routes are.

- ServerLive, ServerReady, ServerMetadata: public, like ``/v2/health/*`` and ``/v2``.
- ModelReady, ModelMetadata: scope ``models:read`` or ``predict``; the version the caller would be
  routed to (or the one it names), only versions its policy allows.
- ModelInfer: scope ``predict``; ``pipeline.predict`` with an ``Inbound`` built from the metadata
  (``authorization: Bearer ...``, ``idempotency-key``, ``traceparent``, ``x-bastion-subject``,
  ``x-bastion-timeout-ms``), ``model_version`` as the named version, and the call's deadline
  (``time_remaining``) as the wait. An Idempotency-Key fingerprints the path
  ``/inference.GRPCInferenceService/ModelInfer/<model>`` and the request's bytes as sent.
- ModelStreamInfer: the stream's credentials are checked once up front (a stream that may not
  predict ends at once with that status); then each request runs as a ModelInfer would, at most
  ``STREAM_WINDOW`` of them at a time (reading stops while the window is full, so one stream cannot
  queue unbounded work), answered in the order they came, a failure as that response's
  ``error_message`` (the stream goes on). With an ``idempotency-key`` on the stream, each request's
  key is ``<key>/<request id>``, so each request of the stream needs an id. The client's cancel
  ends the stream and every request of it still running here.

With tracing on, each unary call and each request of a stream runs under a SERVER span
(``rpc.system=grpc``) continuing the metadata's ``traceparent``; ModelInfer's trailing metadata
carries the span's ``traceparent`` beside ``x-request-id``.

Failures are counted by the abuse guard against the peer's address (``context.peer()``, an IPv6
address as its /64; ``x-forwarded-for`` from a trusted proxy, as on HTTP) and the key, under the
same client names as HTTP's (``a:<address>``, ``k:<key id>``): a client banned on one protocol is
banned on both, refused with RESOURCE_EXHAUSTED before its request is read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote

import grpc
from google.protobuf.message import DecodeError

from bastion import __version__, ids, logs, metrics, routing, tracing
from bastion.errors import InvalidInput, NotFound, RateLimited
from bastion.gateway import pipeline
from bastion.gateway.abuse import AbuseGuard
from bastion.gateway.auth import PREDICT, READ_MODELS, authenticate_header
from bastion.gateway.context import Call
from bastion.gateway.grpc import convert
from bastion.gateway.grpc import inference_pb2 as pb
from bastion.gateway.grpc.errors import Status, status_of
from bastion.gateway.inbound import READ_HEADERS, Inbound
from bastion.gateway.payloads import v2_tensor_metadata
from bastion.gateway.routes import version_number
from bastion.gateway.state import GatewayState
from bastion.httpserver import client_network

log = logs.get("bastion.gateway.grpc")

SERVICE = "inference.GRPCInferenceService"
INFER_PATH = f"/{SERVICE}/ModelInfer/"  # + model: what an idempotency key's request is fingerprinted with
STREAM_WINDOW = 16  # requests of one stream in flight at once
PLATFORM = "onnxruntime_onnx"
DEADLINE_MARGIN_S = 0.05  # the pipeline gives up this long before the call's deadline: its job is abandoned
_HEADERS = READ_HEADERS - {"content-type", "inference-header-content-length"}  # HTTP's only
# Codes that are the server's failure (a span's status ERROR), as OpenTelemetry's gRPC conventions say
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

Message = TypeVar("Message")


class Caller:
    """Who is calling, as the abuse guard counts it: the peer's address, then the key once known;
    the metadata the pipeline reads, and the request id."""

    __slots__ = ("address", "headers", "key_id", "request_id")

    def __init__(self, address: str, headers: dict[str, str], request_id: str) -> None:
        self.address = address
        self.headers = headers
        self.request_id = request_id
        self.key_id = ""

    @classmethod
    def of(cls, context: grpc.aio.ServicerContext, guard: AbuseGuard | None) -> Caller:
        found: dict[str, str] = {}
        forwarded = ""
        request_id = ""
        for key, value in context.invocation_metadata() or ():
            if key in _HEADERS:
                found.setdefault(key, value)
            elif key == "x-forwarded-for" and not forwarded:
                forwarded = value
            elif key == "x-request-id" and not request_id and request_id_ok(value):
                request_id = value
        host = peer_host(context.peer())
        if guard is None:
            address = client_network(host)
        else:  # the guard's own rule: a trusted proxy's x-forwarded-for, an IPv6 address as its /64
            address = guard.address(
                {"client": (host, 0), "headers": [(b"x-forwarded-for", forwarded.encode("latin-1"))]}
            )
        return cls("a:" + address, found, request_id or ids.hex_id())

    def next_of_stream(self) -> Caller:
        """The caller of the stream's next request: the same peer and metadata, its own id."""
        return Caller(self.address, self.headers, ids.hex_id())

    def on_key(self, key_id: str) -> None:
        self.key_id = key_id

    @property
    def clients(self) -> list[str]:
        return [self.address, "k:" + self.key_id] if self.key_id else [self.address]


def peer_host(peer: str) -> str:
    """The address in a gRPC peer string: ``ipv4:1.2.3.4:5``, ``ipv6:%5B::1%5D:5`` (gRPC escapes the
    brackets; an older one did not), else the string itself (``unix:...``), cut to 64 characters."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return unquote(rest).rpartition(":")[0].strip("[]").partition("%")[0]
    return peer[:64]


class _Traced:
    """A call's SERVER span while tracing is on (``begin``, then ``end`` with the status code)."""

    __slots__ = ("span", "token")

    def __init__(self, method: str, caller: Caller) -> None:
        self.span = tracing.continued(
            caller.headers.get("traceparent", ""),
            f"{SERVICE}/{method}",
            kind=tracing.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method},
        )
        self.token = tracing.enter(self.span)

    def end(self, code: grpc.StatusCode) -> None:
        tracing.leave(self.token)
        self.span.attributes["rpc.grpc.status_code"] = code.value[0]
        if code in _SERVER_FAULTS:
            self.span.fail(code.name)
        self.span.end()


def request_id_ok(value: str) -> bool:
    """A client's ``x-request-id`` taken as the request id (as on HTTP: 1 to 64 of ``A-Za-z0-9._-``)."""
    return 0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "._-") for c in value)


class InferenceService:
    """The methods, each ``async (request bytes, context) -> message`` (``server.methods`` serves
    them, deserialising nothing: a request that is not a valid message is this module's
    INVALID_ARGUMENT, counted as a failure, and the bytes are what an idempotency key fingerprints)."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self._series: dict[tuple[str, str], tuple[Any, Any]] = {}

    # plumbing ------------------------------------------------------------------------------
    def _observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """The gateway's request metrics: route ``grpc.<Method>``, status the gRPC code's name."""
        series = self._series.get((method, code.name))
        if series is None:  # bounded: methods × codes
            series = (
                metrics.REQUESTS.labels(f"grpc.{method}", code.name),
                metrics.REQUEST_LATENCY.labels(f"grpc.{method}"),
            )
            self._series[(method, code.name)] = series
        series[0].inc()
        series[1].observe(seconds)

    def _refuse_banned(self, caller: Caller) -> None:
        guard = self.state.abuse
        if guard is not None and (left := guard.banned_for(caller.address)):
            raise RateLimited(
                f"this client is blocked for {int(left) + 1} s after repeated failed requests", int(left) + 1
            )

    async def _failed(self, method: str, caller: Caller, exc: Exception) -> Status:
        """The status answering ``exc``, after the abuse guard counted it (and held it back)."""
        status = status_of(exc)
        if not status.expected:
            metrics.ERRORS.labels("grpc", "unexpected").inc()
            log.error("unexpected_error", method=method, error_type=type(exc).__name__, exc_info=exc)
        guard = self.state.abuse
        if status.strike and guard is not None:
            delay = await guard.strike(caller.clients)
            if delay:
                await asyncio.sleep(delay)
        return status

    async def _answer(
        self, method: str, context: grpc.aio.ServicerContext, work: Callable[[Caller], Awaitable[Message]]
    ) -> Message:
        """Run one unary method: request id and logs, the ban check, metrics, errors as statuses."""
        started = time.perf_counter()
        caller = Caller.of(context, self.state.abuse)
        token = logs.bind_request(caller.request_id)
        traced = _Traced(method, caller) if tracing.ON else None
        code = grpc.StatusCode.CANCELLED  # unless it ends otherwise
        try:
            try:
                self._refuse_banned(caller)
                answer = await work(caller)
            except Exception as exc:
                status = await self._failed(method, caller, exc)
                code = status.code
                await status.abort(context, caller.request_id)
            code = grpc.StatusCode.OK
            return answer
        finally:
            self._observe(method, code, time.perf_counter() - started)
            if traced is not None:
                traced.end(code)
            logs.clear_request(token)

    async def _authenticated(self, caller: Caller, scopes: tuple[str, ...]) -> Call:
        call = Call(caller.request_id)
        call.principal = await authenticate_header(
            caller.headers.get("authorization"), self.state, scopes, caller.on_key
        )
        call.choose_subject(caller.headers.get("x-bastion-subject"))
        return call

    async def _parse(self, caller: Caller, cls: type[Message], raw: bytes, scopes: tuple[str, ...]) -> Message:
        """``raw`` as a ``cls``; an undecodable one is INVALID_ARGUMENT once the caller is known
        (an anonymous caller's is UNAUTHENTICATED, as its valid request would be)."""
        try:
            return cls.FromString(raw)  # type: ignore[attr-defined, no-any-return]
        except DecodeError:
            await self._authenticated(caller, scopes)
            raise InvalidInput(f"the request is not a valid {cls.__name__} message") from None

    async def _version(self, caller: Caller, text: str, scopes: tuple[str, ...]) -> int | None:
        """A named version as a number (empty: None), as HTTP's ``/versions/{version}`` reads it; one
        that is not a positive integer is INVALID_ARGUMENT, once the caller is known."""
        if not text:
            return None
        try:
            return version_number(text)
        except InvalidInput:
            await self._authenticated(caller, scopes)
            raise

    # public --------------------------------------------------------------------------------
    async def ServerLive(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        async def work(_caller: Caller) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._answer("ServerLive", context, work)

    async def ServerReady(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        async def work(_caller: Caller) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=await self._ready())

        return await self._answer("ServerReady", context, work)

    async def _ready(self) -> bool:
        """As ``/readyz``: snapshot loaded, reply reader running, Redis answering, not draining."""
        state = self.state
        if state.draining or not state.snapshots.loaded or not state.replies.healthy:
            return False
        try:
            return bool(await state.redis.ping())
        except Exception:
            return False

    async def ServerMetadata(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        async def work(_caller: Caller) -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(name="bastion", version=__version__)

        return await self._answer("ServerMetadata", context, work)

    # models --------------------------------------------------------------------------------
    async def _routed(self, caller: Caller, raw: bytes, cls: Any) -> tuple[Call, Any]:
        request = await self._parse(caller, cls, raw, READ_MODELS)
        version = await self._version(caller, request.version, READ_MODELS)
        call = await self._authenticated(caller, READ_MODELS)
        pipeline.route(self.state, call, request.name, version)
        return call, request

    async def ModelReady(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        async def work(caller: Caller) -> pb.ModelReadyResponse:
            await self._routed(caller, raw, pb.ModelReadyRequest)
            return pb.ModelReadyResponse(ready=True)

        return await self._answer("ModelReady", context, work)

    async def ModelMetadata(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        async def work(caller: Caller) -> pb.ModelMetadataResponse:
            call, request = await self._routed(caller, raw, pb.ModelMetadataRequest)
            routes = self.state.snapshots.current.models.get(request.name)
            if routes is None:  # gone since it was routed
                raise NotFound(f"no model {request.name!r} is being served", model=request.name)
            signature = call.chosen.signature
            return pb.ModelMetadataResponse(
                name=request.name,
                versions=[str(v) for v in routing.reachable_versions(routes, call.allowed)],  # only its own
                platform=PLATFORM,
                inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in v2_tensor_metadata(signature, "inputs")],
                outputs=[
                    pb.ModelMetadataResponse.TensorMetadata(**t) for t in v2_tensor_metadata(signature, "outputs")
                ],
            )

        return await self._answer("ModelMetadata", context, work)

    # inference -----------------------------------------------------------------------------
    async def _infer(
        self,
        caller: Caller,
        request: pb.ModelInferRequest,
        raw: bytes,
        context: grpc.aio.ServicerContext,
        headers: dict[str, str],
    ) -> tuple[Call, pb.ModelInferResponse]:
        model = request.model_name
        version = await self._version(caller, request.model_version, PREDICT)
        remaining = context.time_remaining()
        deadline = None  # answered by the pipeline just before gRPC would cancel the call
        if remaining is not None:
            deadline = time.monotonic() + remaining - DEADLINE_MARGIN_S

        async def read() -> bytes:
            return raw

        inbound = Inbound(
            state=self.state,
            request_id=caller.request_id,
            model=model,
            path=INFER_PATH + model,
            headers=headers,
            read=read,
            decode=lambda _body, _headers: request,
            on_key=caller.on_key,
            version=version,
        )
        call, outputs, (wanted, raw_out) = await pipeline.predict(inbound, PREDICT, convert.inputs, deadline=deadline)
        chosen = call.chosen
        return call, convert.response(request, chosen.model, chosen.version, call.job_id, outputs, wanted, raw_out)

    async def ModelInfer(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        async def work(caller: Caller) -> pb.ModelInferResponse:
            request = await self._parse(caller, pb.ModelInferRequest, raw, PREDICT)
            call, answer = await self._infer(caller, request, raw, context, caller.headers)
            found = pipeline.response_headers(call)
            if call.span is not None:
                found["traceparent"] = call.span.traceparent
            context.set_trailing_metadata(
                (*((name.lower(), value) for name, value in found.items()), ("x-request-id", caller.request_id))
            )
            return answer

        return await self._answer("ModelInfer", context, work)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        caller = Caller.of(context, self.state.abuse)
        token = logs.bind_request(caller.request_id)
        try:
            self._refuse_banned(caller)
            await self._authenticated(caller, PREDICT)
        except Exception as exc:
            status = await self._failed("ModelStreamInfer", caller, exc)
            self._observe("ModelStreamInfer", status.code, 0.0)
            await status.abort(context, caller.request_id)
        finally:
            logs.clear_request(token)
        room = asyncio.Semaphore(STREAM_WINDOW)  # requests started and not yet answered
        started: asyncio.Queue[asyncio.Task[pb.ModelStreamInferResponse] | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read_stream(requests, context, caller, room, started))
        try:
            while (task := await started.get()) is not None:
                yield await task
                room.release()
            await reader  # its error, if reading the stream failed
        finally:
            reader.cancel()
            while not started.empty():  # the client went away: what it sent is not answered
                pending = started.get_nowait()
                if pending is not None:
                    pending.cancel()

    async def _read_stream(
        self,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
        stream: Caller,
        room: asyncio.Semaphore,
        started: asyncio.Queue[asyncio.Task[pb.ModelStreamInferResponse] | None],
    ) -> None:
        """Start each request of the stream as it comes, while the window has room."""
        try:
            async for raw in requests:
                await room.acquire()
                started.put_nowait(asyncio.create_task(self._stream_one(raw, context, stream.next_of_stream())))
        finally:
            started.put_nowait(None)

    async def _stream_one(
        self, raw: bytes, context: grpc.aio.ServicerContext, caller: Caller
    ) -> pb.ModelStreamInferResponse:
        """One request of a stream, answered as ModelInfer would; a failure as its error_message."""
        begun = time.perf_counter()
        token = logs.bind_request(caller.request_id)
        traced = _Traced("ModelStreamInfer", caller) if tracing.ON else None
        code = grpc.StatusCode.CANCELLED
        try:
            try:
                self._refuse_banned(caller)
                request = await self._parse(caller, pb.ModelInferRequest, raw, PREDICT)
                headers = caller.headers
                key = headers.get("idempotency-key")
                if key is not None:
                    if not 0 < len(request.id) <= 128:
                        raise InvalidInput(
                            "with an idempotency-key on a stream, each request needs an id of 1 to 128 characters"
                        )
                    headers = {**headers, "idempotency-key": f"{key}/{request.id}"}
                _, answer = await self._infer(caller, request, raw, context, headers)
                code = grpc.StatusCode.OK
                return pb.ModelStreamInferResponse(infer_response=answer)
            except Exception as exc:
                status = await self._failed("ModelStreamInfer", caller, exc)
                code = status.code
                return pb.ModelStreamInferResponse(error_message=status.message)
        finally:
            self._observe("ModelStreamInfer", code, time.perf_counter() - begun)
            if traced is not None:
                traced.end(code)
            logs.clear_request(token)
