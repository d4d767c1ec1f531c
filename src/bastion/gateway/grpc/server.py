"""The gateway's gRPC server (``grpc.aio``, on the gateway's own event loop): its limits against
hostile clients, and its method table, read from the service's descriptor in ``inference.proto``.

Limits, from settings:

- ``grpc_max_message_bytes``: the largest message received or sent (RESOURCE_EXHAUSTED beyond,
  answered by gRPC before the message reaches the service);
- ``grpc_max_concurrent_streams``: calls one connection may have open at once (HTTP/2
  ``SETTINGS_MAX_CONCURRENT_STREAMS``);
- ``grpc_keepalive_min_s``: the least time between a client's pings; a client that pings more often
  is sent GOAWAY after ``MAX_PING_STRIKES`` strikes, and pings without a call in flight are refused;
- ``grpc_max_connection_idle_s``: a connection with no call for this long is closed;
- ``max_header_bytes``: the largest metadata, as for an HTTP request's head;
- ``max_connections``: calls in flight in this process (RESOURCE_EXHAUSTED beyond), as the HTTP
  side caps requests in flight (shared evenly by the process's ``ACCEPTORS`` servers).

Every gateway process binds the same port with ``SO_REUSEPORT`` (gRPC's default on Linux), so the
kernel spreads connections across them as it does the HTTP port's; ``bastion up`` first checks the
port is not held by anything else.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from bastion import logs, metrics
from bastion.gateway.grpc import inference_pb2 as pb
from bastion.gateway.grpc.service import SERVICE, InferenceService
from bastion.gateway.state import GatewayState
from bastion.security.tls import ServerTLS
from bastion.settings import Settings

log = logs.get("bastion.gateway.grpc")

MAX_PING_STRIKES = 2
STOP_GRACE_S = 5.0  # calls in flight at shutdown get this long to finish
# grpc.aio servers per gateway process, all on the one port (SO_REUSEPORT). One grpc.aio server
# accepts the next call of a method only once its event loop has taken the previous one, a few
# loop turns apart; under load that, not the CPU, bounded the calls a process took (about a third
# fewer at 64 concurrent callers than with 4 servers, on the 2-CPU development machine).
ACCEPTORS = 4


def options(settings: Settings) -> list[tuple[str, Any]]:
    ping_ms = int(settings.grpc_keepalive_min_s * 1000)
    return [
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        ("grpc.max_metadata_size", settings.max_header_bytes),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", ping_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", ping_ms),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.max_connection_idle_ms", int(settings.grpc_max_connection_idle_s * 1000)),
        ("grpc.so_reuseport", 1),
        # a connection's handshake (TLS, then HTTP/2's preface) within the head-read timeout, not gRPC's 120 s
        ("grpc.server_handshake_timeout_ms", int(settings.header_timeout_s * 1000)),
    ]


PUBLIC_METHODS = frozenset({"ServerLive", "ServerReady", "ServerMetadata"})  # as /v2/health: no credential
_ANONYMOUS = "an API key or token is required: send 'authorization: Bearer <key>' metadata"


def _refusal(method: str) -> Any:
    """The handler that refuses an anonymous call of ``method``, counted as every answered call is."""

    async def refuse(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        metrics.REQUESTS.labels(f"grpc.{method}", grpc.StatusCode.UNAUTHENTICATED.name).inc()
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _ANONYMOUS)

    # A handler that reads no message: the call ends before its request is even sent. For a unary
    # method too, since a request-streaming handler is free not to read.
    return grpc.stream_unary_rpc_method_handler(refuse)


_GUARDED = frozenset(
    m.name for m in pb.DESCRIPTOR.services_by_name[SERVICE.rpartition(".")[2]].methods if m.name not in PUBLIC_METHODS
)

_REFUSED = {method: _refusal(method) for method in _GUARDED}


class RefuseAnonymous(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """A call of a method that needs a credential and carries no ``authorization`` metadata is
    refused on its headers, before its message is read: a peer without a key cannot hold calls
    open (and their slots of ``maximum_concurrent_rpcs``) by never sending the message."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        service, _, method = details.method.lstrip("/").partition("/")
        if service == SERVICE and method in _GUARDED:  # (a method not served stays UNIMPLEMENTED)
            if not any(key == "authorization" for key, _ in details.invocation_metadata or ()):
                return _REFUSED[method]
        return await continuation(details)


def methods(service: InferenceService) -> dict[str, grpc.RpcMethodHandler]:
    """Every method of the service's descriptor, served by the method of ``service`` of that name:
    requests handed over as bytes (the service decodes them), responses serialised."""
    found: dict[str, grpc.RpcMethodHandler] = {}
    for method in pb.DESCRIPTOR.services_by_name[SERVICE.rpartition(".")[2]].methods:
        serve = getattr(service, method.name)
        serialize = getattr(pb, method.output_type.name).SerializeToString
        if method.client_streaming and method.server_streaming:
            found[method.name] = grpc.stream_stream_rpc_method_handler(serve, response_serializer=serialize)
        elif not method.client_streaming and not method.server_streaming:
            found[method.name] = grpc.unary_unary_rpc_method_handler(serve, response_serializer=serialize)
        else:
            raise RuntimeError(f"{method.full_name}: only unary and bidirectional methods are served")
    return found


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def credentials(listener: ServerTLS) -> grpc.ServerCredentials:
    """TLS from the listener's files; a reload (SIGHUP) reaches the next handshake: gRPC asks
    ``fetch`` before each one, which reads the files again only after a reload."""
    seen = [listener.reloads]

    def configuration() -> Any:
        cert, key = listener.files.cert, listener.files.key
        if cert is None or key is None:
            raise ValueError("gRPC over TLS needs BASTION_TLS_CERT and BASTION_TLS_KEY")
        return grpc.ssl_server_certificate_configuration([(key.read_bytes(), cert.read_bytes())])

    def fetch() -> Any:
        if listener.reloads == seen[0]:
            return None  # unchanged
        seen[0] = listener.reloads
        return configuration()

    return grpc.dynamic_ssl_server_credentials(configuration(), fetch, require_client_authentication=False)


async def start(state: GatewayState, listener: ServerTLS | None = None) -> list[grpc.aio.Server]:
    """Serve the service on ``grpc_port`` of ``host`` (``ACCEPTORS`` servers; over TLS with
    ``listener``); raise ``OSError`` when the port cannot be bound."""
    settings = state.settings
    service = InferenceService(state)
    where = address(settings.host, settings.grpc_port)
    servers: list[grpc.aio.Server] = []
    try:
        for _ in range(ACCEPTORS):
            server = grpc.aio.server(
                interceptors=[RefuseAnonymous()],
                options=options(settings),
                maximum_concurrent_rpcs=max(1, settings.max_connections // ACCEPTORS),
            )
            server.add_registered_method_handlers(SERVICE, methods(service))
            try:
                if listener is None:
                    server.add_insecure_port(where)
                else:
                    server.add_secure_port(where, credentials(listener))
            except RuntimeError as exc:  # gRPC's word for a port it could not bind
                log.error("grpc_port_in_use", address=where)
                raise OSError(f"cannot listen for gRPC on {where}: is the port taken? (--grpc-port)") from exc
            await server.start()
            servers.append(server)
    except BaseException:
        await stop(servers)
        raise
    log.info("grpc_started", address=where)
    return servers


async def stop(servers: list[grpc.aio.Server]) -> None:
    """Stop accepting calls; those in flight get ``STOP_GRACE_S`` to finish."""
    await asyncio.gather(*(server.stop(STOP_GRACE_S) for server in servers))
