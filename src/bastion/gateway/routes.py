"""Prediction routes: Bastion's v1 API and the Open Inference Protocol v2 (KServe, Triton, MLServer)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.gateway import inbound, payloads, pipeline
from bastion.gateway.auth import JOBS, PREDICT, READ_MODELS, authenticate, declares
from bastion.gateway.context import Call
from bastion.responses import json_response

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


async def predict(request: Request) -> Response:
    """Run the model on the given rows and return its outputs (synchronous)."""
    call, outputs, _ = await pipeline.predict(inbound.from_http(request), PREDICT, _v1)
    body = {
        "id": call.job_id,
        "model": call.chosen.model,
        "version": call.chosen.version,
        "outputs": payloads.v1_response_outputs(outputs),
    }
    return json_response(body, headers=pipeline.response_headers(call))


async def submit_job(request: Request) -> Response:
    """Queue the rows as an asynchronous job; answer 202 with the job's id and links."""
    call, job_id = await pipeline.submit(inbound.from_http(request), JOBS, _v1)
    location = f"/v1/jobs/{job_id}"
    return json_response(
        {
            "id": job_id,
            "status": "queued",
            "model": call.chosen.model,
            "version": call.chosen.version,
            "links": {"self": location, "events": f"{location}/events"},
        },
        status_code=202,
        headers={"Location": location, **pipeline.response_headers(call)},
    )


async def infer(request: Request) -> Response:
    """Open Inference Protocol v2 inference."""
    call, outputs, (wanted, request_id) = await pipeline.predict(
        inbound.from_http(request), PREDICT, payloads.v2_inputs
    )
    body: dict[str, Any] = {
        "model_name": call.chosen.model,
        "model_version": str(call.chosen.version),
        "id": request_id or call.job_id,
        "outputs": payloads.v2_outputs(outputs, wanted),
    }
    return json_response(body, headers=pipeline.response_headers(call))


def _v1(doc: Any, signature: Any, max_rows: int) -> tuple[Any]:
    return (payloads.v1_inputs(doc, signature, max_rows),)


async def _routed(request: Request, name: str) -> Call:
    """The version this caller would be routed to for ``name`` (404/403/503 as a prediction would)."""
    state = pipeline.state_of(request)
    call = Call(request.scope.get("state", {}).get("request_id", ""))
    call.principal = await authenticate(request, state, *READ_MODELS)
    call.choose_subject(None)
    pipeline.route(state, call, name)
    return call


@router.get("/v2/models/{name}", tags=["open inference protocol"], openapi_extra=declares(READ_MODELS))
async def model_metadata(name: str, request: Request) -> Response:
    """Open Inference Protocol model metadata: versions, inputs and outputs."""
    call = await _routed(request, name)
    state = pipeline.state_of(request)
    routes = state.snapshots.current.models[name]
    live = {r.version.version for r in routes.routes if r.role != "shadow"}
    if routes.fallback is not None:
        live.add(routes.fallback.version)
    versions = sorted(v for v in live if call.permits(v))  # never a version this caller cannot reach
    signature = call.chosen.signature
    return json_response(
        {
            "name": name,
            "versions": [str(v) for v in versions],
            "platform": "onnxruntime_onnx",
            "inputs": payloads.v2_tensor_metadata(signature, "inputs"),
            "outputs": payloads.v2_tensor_metadata(signature, "outputs"),
        }
    )


@router.get("/v2/models/{name}/ready", tags=["open inference protocol"], openapi_extra=declares(READ_MODELS))
async def model_ready(name: str, request: Request) -> Response:
    """200 when the model has a live version the gateway can route to."""
    await _routed(request, name)
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
