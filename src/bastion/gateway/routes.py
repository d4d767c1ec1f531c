"""Prediction routes: Bastion's v1 API and the Open Inference Protocol v2 (KServe, Triton, MLServer)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from bastion import metrics
from bastion.gateway import payloads
from bastion.gateway.auth import authenticate
from bastion.gateway.dispatch import resolve, run_sync, submit_async, timeout_s
from bastion.gateway.state import GatewayState
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


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


@router.post("/v1/models/{name}/predict", tags=["predict"], openapi_extra=_V1_BODY)
async def predict(name: str, request: Request) -> Response:
    """Run the model on the given rows and return its outputs (synchronous)."""
    with metrics.REQUEST_LATENCY.labels("v1_predict").time():
        state = _state(request)
        key = authenticate(request, state, "predict")
        version = resolve(state, name)
        wait = timeout_s(state, request.headers.get("x-bastion-timeout-ms"))
        doc = payloads.parse_json(await request.body(), request.headers.get("content-type"))
        tensors = payloads.v1_inputs(doc, version.signature, state.settings.max_rows)
        job_id, outputs = await run_sync(state, key, version, tensors, wait)
        return json_response(
            {"id": job_id, "model": version.model, "version": version.version, "outputs": outputs},
            headers={"X-Bastion-Model-Version": str(version.version)},
        )


@router.post("/v1/models/{name}/jobs", status_code=202, tags=["jobs"], openapi_extra=_V1_BODY)
async def submit_job(name: str, request: Request) -> Response:
    """Queue the rows as an asynchronous job; answer 202 with the job's id and links."""
    state = _state(request)
    key = authenticate(request, state, "jobs")
    version = resolve(state, name)
    doc = payloads.parse_json(await request.body(), request.headers.get("content-type"))
    tensors = payloads.v1_inputs(doc, version.signature, state.settings.max_rows)
    job_id = await submit_async(state, key, version, tensors)
    location = f"/v1/jobs/{job_id}"
    return json_response(
        {
            "id": job_id,
            "status": "queued",
            "model": version.model,
            "version": version.version,
            "links": {"self": location, "events": f"{location}/events"},
        },
        status_code=202,
        headers={"Location": location},
    )


@router.post("/v2/models/{name}/infer", tags=["open inference protocol"], openapi_extra=_V2_BODY)
async def infer(name: str, request: Request) -> Response:
    """Open Inference Protocol v2 inference."""
    with metrics.REQUEST_LATENCY.labels("v2_infer").time():
        state = _state(request)
        key = authenticate(request, state, "predict")
        version = resolve(state, name)
        wait = timeout_s(state, request.headers.get("x-bastion-timeout-ms"))
        doc = payloads.parse_json(await request.body(), request.headers.get("content-type"))
        tensors, wanted, request_id = payloads.v2_inputs(doc, version.signature, state.settings.max_rows)
        job_id, outputs = await run_sync(state, key, version, tensors, wait)
        body: dict[str, Any] = {
            "model_name": version.model,
            "model_version": str(version.version),
            "id": request_id or job_id,
            "outputs": payloads.v2_outputs(outputs, wanted),
        }
        return json_response(body, headers={"X-Bastion-Model-Version": str(version.version)})


@router.get("/v2/models/{name}", tags=["open inference protocol"])
async def model_metadata(name: str, request: Request) -> Response:
    """Open Inference Protocol model metadata: versions, inputs and outputs."""
    state = _state(request)
    authenticate(request, state, "models:read", "predict")
    version = resolve(state, name)
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


@router.get("/v2/models/{name}/ready", tags=["open inference protocol"])
async def model_ready(name: str, request: Request) -> Response:
    """200 when the model has a live version the gateway can route to."""
    state = _state(request)
    authenticate(request, state, "models:read", "predict")
    resolve(state, name)
    return json_response({"name": name, "ready": True})
