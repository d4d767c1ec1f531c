"""Prediction routes: Bastion's v1 API and the Open Inference Protocol v2 (KServe, Triton, MLServer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.gateway import idempotency, payloads
from bastion.gateway.auth import JOBS, PREDICT, READ_MODELS, authenticate, declares
from bastion.gateway.breakers import Outcome, Permit
from bastion.gateway.dispatch import (
    breaker_call,
    copy_to_shadows,
    ratelimit_headers,
    resolve,
    route,
    run_sync,
    subject_of,
    submit_async,
    timeout_s,
)
from bastion.gateway.idempotency import Idempotency
from bastion.gateway.state import GatewayState
from bastion.queue.producer import Admission
from bastion.responses import json_response
from bastion.snapshot import KeyInfo, VersionInfo

router = APIRouter()

_V1_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "additionalProperties": False,
                    "properties": {
                        "inputs": {
                            "description": "rows for a single-input model, or an object of named arrays",
                            "oneOf": [{"type": "array"}, {"type": "object"}],
                        }
                    },
                },
                "example": {"inputs": [[17.99, 10.38, 122.8, 1001.0]]},
            }
        },
    }
}
_V2_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype", "data"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string"},
                                    "data": {"type": "array"},
                                },
                            },
                        },
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            }
        },
    }
}


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


@dataclass(slots=True)
class Admitted:
    state: GatewayState
    key: KeyInfo
    version: VersionInfo
    fallback: str  # why the fallback answers ('disabled', 'circuit-open'), or ''
    permit: Permit
    doc: Any
    subject: str
    idem: Idempotency | None

    def response_headers(self, admission: Admission) -> dict[str, str]:
        """Which version answered, whether (and why) it was the fallback, and what is left of the
        caller's budget."""
        headers = {"X-Bastion-Model-Version": str(self.version.version)}
        if self.fallback:
            headers["X-Bastion-Fallback"] = "true"
            headers["X-Bastion-Fallback-Reason"] = self.fallback
        if admission.replayed_job is not None:
            headers["Idempotent-Replayed"] = "true"
        if admission.cached:
            headers["X-Bastion-Cache"] = "hit"
        if admission.tenant_left is not None or admission.key_left is not None:
            headers.update(ratelimit_headers(self.key.limits, admission))
        return headers


async def _admit(request: Request, scopes: tuple[str, ...]) -> Admitted:
    """Authenticate, route to a version, then read and parse the body: in that order, so an
    unauthenticated or misdirected request never has its body read."""
    state = _state(request)
    key = await authenticate(request, state, *scopes)
    subject = subject_of(request.headers.get("x-bastion-subject"), key.tenant)
    choice = route(state, request.path_params["name"], subject, key)
    try:
        body = await request.body()
        doc = payloads.parse_json(body, request.headers.get("content-type"))
        idem = idempotency.from_request(request.headers.get("idempotency-key"), key.tenant, request.url.path, body)
    except BaseException:
        state.breakers.record(choice.permit, Outcome.IGNORED)
        raise
    return Admitted(state, key, choice.version, choice.fallback, choice.permit, doc, subject, idem)


async def predict(request: Request) -> Response:
    """Run the model on the given rows and return its outputs (synchronous)."""
    wait_header = request.headers.get("x-bastion-timeout-ms")
    a = await _admit(request, PREDICT)
    with breaker_call(a.state, a.permit) as call:
        wait = timeout_s(a.state, wait_header, a.version.model)
        tensors = payloads.v1_inputs(a.doc, a.version.signature, a.state.settings.max_rows)
        job_id, outputs, admission = await run_sync(a.state, a.key, a.version, tensors, wait, a.idem)
        call.ignored = admission.cached or admission.replayed_job is not None
    if admission.replayed_job is None and not admission.cached:
        copy_to_shadows(a.state, a.key, a.version.model, a.subject, job_id, tensors, outputs)
    return json_response(
        {
            "id": job_id,
            "model": a.version.model,
            "version": a.version.version,
            "outputs": payloads.v1_response_outputs(outputs),
        },
        headers=a.response_headers(admission),
    )


async def submit_job(request: Request) -> Response:
    """Queue the rows as an asynchronous job; answer 202 with the job's id and links."""
    a = await _admit(request, JOBS)
    a.state.breakers.record(a.permit, Outcome.IGNORED)  # an async job's outcome comes later, elsewhere
    tensors = payloads.v1_inputs(a.doc, a.version.signature, a.state.settings.max_rows)
    job_id, admission = await submit_async(a.state, a.key, a.version, tensors, a.idem)
    location = f"/v1/jobs/{job_id}"
    return json_response(
        {
            "id": job_id,
            "status": "queued",
            "model": a.version.model,
            "version": a.version.version,
            "links": {"self": location, "events": f"{location}/events"},
        },
        status_code=202,
        headers={"Location": location, **a.response_headers(admission)},
    )


async def infer(request: Request) -> Response:
    """Open Inference Protocol v2 inference."""
    wait_header = request.headers.get("x-bastion-timeout-ms")
    a = await _admit(request, PREDICT)
    with breaker_call(a.state, a.permit) as call:
        wait = timeout_s(a.state, wait_header, a.version.model)
        tensors, wanted, request_id = payloads.v2_inputs(a.doc, a.version.signature, a.state.settings.max_rows)
        job_id, outputs, admission = await run_sync(a.state, a.key, a.version, tensors, wait, a.idem)
        call.ignored = admission.cached or admission.replayed_job is not None
    if admission.replayed_job is None and not admission.cached:
        copy_to_shadows(a.state, a.key, a.version.model, a.subject, job_id, tensors, outputs)
    body: dict[str, Any] = {
        "model_name": a.version.model,
        "model_version": str(a.version.version),
        "id": request_id or job_id,
        "outputs": payloads.v2_outputs(outputs, wanted),
    }
    return json_response(body, headers=a.response_headers(admission))


@router.get("/v2/models/{name}", tags=["open inference protocol"], openapi_extra=declares(READ_MODELS))
async def model_metadata(name: str, request: Request) -> Response:
    """Open Inference Protocol model metadata: versions, inputs and outputs."""
    state = _state(request)
    key = await authenticate(request, state, *READ_MODELS)
    version, _ = resolve(state, name, key.tenant, key)
    versions = sorted(v for (m, v) in state.snapshots.current.versions if m == name)
    return json_response(
        {
            "name": name,
            "versions": [str(v) for v in versions],
            "platform": "onnxruntime_onnx",
            "inputs": payloads.v2_tensor_metadata(version.signature, "inputs"),
            "outputs": payloads.v2_tensor_metadata(version.signature, "outputs"),
        }
    )


@router.get("/v2/models/{name}/ready", tags=["open inference protocol"], openapi_extra=declares(READ_MODELS))
async def model_ready(name: str, request: Request) -> Response:
    """200 when the model has a live version the gateway can route to."""
    state = _state(request)
    key = await authenticate(request, state, *READ_MODELS)
    resolve(state, name, key.tenant, key)
    return json_response({"name": name, "ready": True})


# The three POST routes are plain Starlette routes: they parse their own bodies, so FastAPI's
# dependency and body machinery (about a tenth of the gateway's CPU per request) is skipped.
# Their OpenAPI entries are written out in ``OPENAPI_PATHS`` instead.
FAST_ROUTES = [
    Route("/v1/models/{name}/predict", predict, methods=["POST"]),
    Route("/v1/models/{name}/jobs", submit_job, methods=["POST"]),
    Route("/v2/models/{name}/infer", infer, methods=["POST"]),
]

_NAME = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}]
_PROBLEM = {
    "description": "a problem (RFC 9457)",
    "content": {"application/problem+json": {"schema": {"type": "object"}}},
}
_ERRORS = {str(code): _PROBLEM for code in (400, 401, 403, 404, 413, 415, 429, 502, 503, 504)}
_SECURITY: list[dict[str, list[str]]] = [{"apiKey": []}]


def _operation(
    summary: str, tag: str, body: dict[str, Any], ok: str, op_id: str, scopes: tuple[str, ...]
) -> dict[str, Any]:
    return {
        **declares(scopes),
        "summary": summary,
        "operationId": op_id,
        "tags": [tag],
        "parameters": _NAME,
        "security": _SECURITY,
        **body,
        "responses": {
            ok: {"description": "success", "content": {"application/json": {"schema": {"type": "object"}}}},
            **_ERRORS,
        },
    }


OPENAPI_PATHS: dict[str, Any] = {
    "/v1/models/{name}/predict": {"post": _operation("Predict (sync)", "predict", _V1_BODY, "200", "predict", PREDICT)},
    "/v1/models/{name}/jobs": {"post": _operation("Submit an async job", "jobs", _V1_BODY, "202", "submit_job", JOBS)},
    "/v2/models/{name}/infer": {
        "post": _operation(
            "Open Inference Protocol v2 inference", "open inference protocol", _V2_BODY, "200", "infer", PREDICT
        )
    },
}
