"""Prediction routes: Bastion's v1 API and the Open Inference Protocol v2 (KServe, Triton, MLServer)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.routing import Route

from bastion import routing
from bastion.errors import InvalidInput
from bastion.gateway import feedback, inbound, oip, payloads, pipeline
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
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string"},
                                    "data": {"type": "array"},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                            },
                        },
                        "parameters": {"type": "object"},
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
    """Open Inference Protocol v2 inference (JSON, or the binary tensor data extension)."""
    oip.refuse_encoded(request.scope)
    return await _infer(inbound.from_http(request, oip.decode))


async def infer_version(request: Request) -> Response:
    """Open Inference Protocol v2 inference on a version the caller names: only one that takes
    traffic and that policy lets the caller reach."""
    oip.refuse_encoded(request.scope)
    arrival = inbound.from_http(request, oip.decode)
    arrival.version = version_number(request.path_params["version"])
    return await _infer(arrival)


async def _infer(arrival: inbound.Inbound) -> Response:
    call, outputs, (request,) = await pipeline.predict(arrival, PREDICT, oip.parse)
    head: dict[str, Any] = {
        "model_name": call.chosen.model,
        "model_version": str(call.chosen.version),
        "id": request.request_id or call.job_id,
    }
    return oip.response(outputs, request, head, pipeline.response_headers(call))


def version_number(text: str) -> int:
    """A version named in a path (``/versions/{version}``): a positive integer, else 400."""
    if not (0 < len(text) <= 9 and text.isascii() and text.isdigit()) or int(text) == 0:
        raise InvalidInput(f"a model version is a positive integer, got {text[:20]!r}")
    return int(text)


def _v1(doc: Any, signature: Any, max_rows: int) -> tuple[Any]:
    return (payloads.v1_inputs(doc, signature, max_rows),)


async def _routed(request: Request, name: str, version: str | None = None) -> Call:
    """The version this caller would be routed to for ``name``, or the ``version`` it names if it
    may reach it (404/403/503 as a prediction would)."""
    state = pipeline.state_of(request)
    call = Call(request.scope.get("state", {}).get("request_id", ""))
    number = None if version is None else version_number(version)
    call.principal = await authenticate(request, state, *READ_MODELS)
    call.choose_subject(None)
    pipeline.route(state, call, name, number)
    return call


async def _metadata(request: Request, name: str, version: str | None = None) -> Response:
    call = await _routed(request, name, version)
    state = pipeline.state_of(request)
    routes = state.snapshots.current.models[name]
    versions = routing.reachable_versions(routes, call.allowed)  # never a version this caller cannot reach
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


_OIP = "open inference protocol"


@router.get("/v2/models/{name}", tags=[_OIP], openapi_extra=declares(READ_MODELS))
async def model_metadata(name: str, request: Request) -> Response:
    """Open Inference Protocol model metadata: the versions this caller can reach, inputs and outputs
    (of the version it would be routed to)."""
    return await _metadata(request, name)


@router.get("/v2/models/{name}/versions/{version}", tags=[_OIP], openapi_extra=declares(READ_MODELS))
async def model_version_metadata(name: str, version: str, request: Request) -> Response:
    """Open Inference Protocol metadata of one version: only one that takes traffic and that policy
    lets this caller reach (else 404 / 403, whether or not it exists)."""
    return await _metadata(request, name, version)


@router.get("/v2/models/{name}/ready", tags=[_OIP], openapi_extra=declares(READ_MODELS))
async def model_ready(name: str, request: Request) -> Response:
    """200 when the model has a live version the gateway can route to."""
    await _routed(request, name)
    return json_response({"name": name, "ready": True})


@router.get("/v2/models/{name}/versions/{version}/ready", tags=[_OIP], openapi_extra=declares(READ_MODELS))
async def model_version_ready(name: str, version: str, request: Request) -> Response:
    """200 when this version takes traffic and this caller may reach it."""
    await _routed(request, name, version)
    return json_response({"name": name, "ready": True})


# The POST routes are plain Starlette routes: they parse their own bodies, so FastAPI's
# dependency and body machinery (about a tenth of the gateway's CPU per request) is skipped.
# Their OpenAPI entries are written out in ``OPENAPI_PATHS`` instead.
FAST_ROUTES = [
    Route("/v1/models/{name}/predict", predict, methods=["POST"]),
    Route("/v1/models/{name}/jobs", submit_job, methods=["POST"]),
    Route("/v2/models/{name}/infer", infer, methods=["POST"]),
    Route("/v2/models/{name}/versions/{version}/infer", infer_version, methods=["POST"]),
    Route("/v1/predictions/{id}/feedback", feedback.give_feedback, methods=["POST"]),
]

_NAME = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 64}}]
_VERSION = [{"name": "version", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 9}}]
_HEADER_LENGTH = [
    {
        "name": "Inference-Header-Content-Length",
        "in": "header",
        "required": False,
        "description": "the binary tensor data extension: the length of the JSON header; binary tensors follow it",
        "schema": {"type": "integer", "minimum": 0},
    }
]
_CODES = (400, 401, 403, 404, 413, 415, 429, 502, 503, 504)
_PROBLEM = {
    "description": "a problem (RFC 9457)",
    "content": {"application/problem+json": {"schema": {"type": "object"}}},
}
_OIP_ERROR = {
    "description": "an Open Inference Protocol error",
    "content": {
        "application/json": {
            "schema": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
        }
    },
}
_ERRORS = {str(code): _PROBLEM for code in _CODES}
_FEEDBACK_ERRORS = {str(code): _PROBLEM for code in (400, 401, 403, 404, 409, 413, 415, 429, 503)}
_PREDICTION_ID = [
    {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "the prediction's id: the ``id`` its response carried",
        "schema": {"type": "string", "maxLength": 64},
    }
]
_OIP_ERRORS = {str(code): _OIP_ERROR for code in _CODES}
_SECURITY: list[dict[str, list[str]]] = [{"apiKey": []}]


def _operation(
    summary: str,
    tag: str,
    body: dict[str, Any],
    ok: str,
    op_id: str,
    scopes: tuple[str, ...],
    parameters: list[dict[str, Any]] = _NAME,
    errors: dict[str, Any] = _ERRORS,
) -> dict[str, Any]:
    return {
        **declares(scopes),
        "summary": summary,
        "operationId": op_id,
        "tags": [tag],
        "parameters": parameters,
        "security": _SECURITY,
        **body,
        "responses": {
            ok: {"description": "success", "content": {"application/json": {"schema": {"type": "object"}}}},
            **errors,
        },
    }


OPENAPI_PATHS: dict[str, Any] = {
    "/v1/models/{name}/predict": {"post": _operation("Predict (sync)", "predict", _V1_BODY, "200", "predict", PREDICT)},
    "/v1/models/{name}/jobs": {"post": _operation("Submit an async job", "jobs", _V1_BODY, "202", "submit_job", JOBS)},
    "/v2/models/{name}/infer": {
        "post": _operation(
            "Open Inference Protocol v2 inference",
            _OIP,
            _V2_BODY,
            "200",
            "infer",
            PREDICT,
            [*_NAME, *_HEADER_LENGTH],
            _OIP_ERRORS,
        )
    },
    "/v2/models/{name}/versions/{version}/infer": {
        "post": _operation(
            "Open Inference Protocol v2 inference on a named version",
            _OIP,
            _V2_BODY,
            "200",
            "infer_version",
            PREDICT,
            [*_NAME, *_VERSION, *_HEADER_LENGTH],
            _OIP_ERRORS,
        )
    },
    "/v1/predictions/{id}/feedback": {
        "post": _operation(
            "Label a prediction with its true class or value (live accuracy)",
            "feedback",
            feedback.OPENAPI,
            "201",
            "give_feedback",
            feedback.FEEDBACK,
            _PREDICTION_ID,
            _FEEDBACK_ERRORS,
        )
    },
}
OPENAPI_PATHS["/v1/predictions/{id}/feedback"]["post"]["responses"]["200"] = {
    "description": 'an earlier label replaced ("replace": true)',
    "content": {"application/json": {"schema": {"type": "object"}}},
}
