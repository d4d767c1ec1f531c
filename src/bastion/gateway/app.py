"""Build the gateway's ASGI app from settings (and turn tracing on when the ``OTEL_*``
environment asks for it: ``bastion.tracing``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from redis.exceptions import RedisError
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from bastion import logs, tracing
from bastion.asgi import new_app
from bastion.gateway import health, jobs, openai, routes
from bastion.gateway.abuse import AbuseGuard, AbuseMiddleware
from bastion.gateway.breakers import Breakers, Policy
from bastion.gateway.evidence import Backlog
from bastion.gateway.grpc import server as grpc_server
from bastion.gateway.jobwatch import JobWatch
from bastion.gateway.replies import ReplyRouter
from bastion.gateway.snapshots import SnapshotWatcher
from bastion.gateway.state import GatewayState
from bastion.gateway.textmodels import TextModels
from bastion.gateway.textstream import ChunkRouter
from bastion.middleware import RequestId
from bastion.queue.calls import Pricing
from bastion.queue.durability import Durability
from bastion.queue.producer import Producer
from bastion.redisconn import async_client
from bastion.security import tls
from bastion.security.oidc import JwksCache, OidcConfig
from bastion.settings import Settings

log = logs.get("bastion.gateway")


def _jwks(settings: Settings) -> JwksCache | None:
    if not settings.oidc_issuer or not settings.oidc_audience:
        return None
    config = OidcConfig(
        issuer=settings.oidc_issuer,
        audience=settings.oidc_audience,
        algorithms=tuple(a.strip() for a in settings.oidc_algorithms.split(",") if a.strip()),
        jwks_url=settings.oidc_jwks_url,
        cache_s=settings.oidc_jwks_cache_s,
        min_refetch_s=min(10.0, settings.oidc_jwks_cache_s),
        https_only=settings.require_tls,
    )
    return JwksCache(config, httpx.AsyncClient(timeout=5.0, follow_redirects=False))


def create_app(settings: Settings, listener: tls.ServerTLS | None = None) -> FastAPI:
    """The gateway app; ``listener``: the HTTPS context the gRPC port follows too (reloads included)."""
    gateway_id = settings.gateway_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = async_client(
            settings.require_redis_url(),
            max_connections=settings.redis_max_connections,
            tls=tls.files_of(settings),
            socket_connect_timeout=1,
            socket_timeout=5,
            health_check_interval=0,
        )
        durability = Durability(settings.durability, settings.durability_replicas, settings.durability_timeout_ms)
        with contextlib.suppress(RedisError, OSError):  # Redis away at start: the check waits for the next start
            await durability.check(client)
        snapshots = SnapshotWatcher(client, settings.snapshot_refresh_s)
        chunks = ChunkRouter(client, gateway_id)
        state = GatewayState(
            settings=settings,
            gateway_id=gateway_id,
            redis=client,
            producer=Producer(
                client,
                max_queue_sync=settings.max_queue_sync,
                max_queue_batch=settings.max_queue_batch,
                max_queue_shadow=settings.max_queue_shadow,
                result_ttl_s=settings.result_ttl_s,
                pricing=Pricing(settings.cost_per_row_default, settings.cost_per_row_floor),
                durability=durability,
            ),
            replies=ReplyRouter(client, gateway_id),
            snapshots=snapshots,
            jobwatch=JobWatch(client, snapshots, lambda: state.draining),
            jwks=_jwks(settings),
            abuse=AbuseGuard(client, settings),
            breakers=Breakers(Policy.from_settings(settings)),
            backlog=Backlog(client, settings.audit_max_backlog, enabled=settings.decision_log),
            text=TextModels(settings.max_tokenizer_bytes),
            chunks=chunks,
        )
        app.state.gateway = state
        await state.snapshots.start()
        await state.replies.start()
        await chunks.start()
        await state.jobwatch.start()
        if state.backlog is not None:
            await state.backlog.start()
        if state.abuse is not None:
            await state.abuse.start()
        rpc = await grpc_server.start(state, listener) if settings.grpc_port else None  # same state, same loop
        log.info("gateway_started", gateway_id=gateway_id)
        try:
            yield
        finally:
            state.draining = True
            if rpc is not None:  # calls in flight finish while the replies are still read
                await grpc_server.stop(rpc)
            if state.background:  # let queued shadow copies reach Redis
                await asyncio.wait(state.background, timeout=5)
            await state.jobwatch.stop()
            if state.backlog is not None:
                await state.backlog.stop()
            await chunks.stop()
            await state.replies.stop()
            if state.abuse is not None:
                await state.abuse.stop()
            await state.snapshots.stop()
            await client.aclose()
            if state.jwks is not None:
                await state.jwks.http.aclose()
            log.info("gateway_stopped", gateway_id=gateway_id)
            tracing.shutdown()

    app = new_app(
        "Bastion gateway", lifespan, docs_enabled=settings.docs_enabled, max_body_bytes=settings.max_body_bytes
    )
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:  # off unless configured: no Access-Control-* header is ever sent otherwise
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Bastion-Subject", "X-Bastion-Timeout-Ms"],
            expose_headers=[
                "X-Bastion-Model-Version",
                "X-Bastion-Fallback",
                "X-Bastion-Fallback-Reason",
                "X-Bastion-Cache",
                "Idempotent-Replayed",
                "RateLimit",
                "RateLimit-Policy",
                "Retry-After",
            ],
        )
    app.add_middleware(AbuseMiddleware)  # outermost: a banned client is refused before anything else
    if tracing.configure("gateway"):  # just inside RequestId: the trace id joins the request's log lines
        at = next(i for i, m in enumerate(app.user_middleware) if getattr(m, "cls", None) is RequestId) + 1
        app.user_middleware.insert(at, Middleware(tracing.TraceRequests))
    app.router.routes.extend(openai.ROUTES)  # the OpenAI-compatible front door (plain routes too)
    app.router.routes.extend(routes.FAST_ROUTES)
    app.include_router(routes.router)
    app.include_router(jobs.router)
    app.include_router(health.router)
    _document(app)
    return app


def _document(app: FastAPI) -> None:
    """Add the plain Starlette routes and the API-key scheme to the generated OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("paths", {}).update(routes.OPENAPI_PATHS)
            schema["paths"].update(openai.OPENAPI_PATHS)
            schema.setdefault("components", {})["securitySchemes"] = {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a Bastion API key (bst_...), or a JWT from the configured OIDC issuer",
                }
            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
