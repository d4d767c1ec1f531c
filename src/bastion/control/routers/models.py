"""Models and their versions: list, show, register (upload) a new immutable version."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.responses import Response

from bastion.control import changes
from bastion.control.plane import plane_of
from bastion.control.principals import needs, principal
from bastion.control.routers.deployments import route_primary
from bastion.errors import InvalidInput, PayloadTooLarge, UnsupportedMedia
from bastion.jsonbody import parse_json
from bastion.registry.metadata import MAX_REFERENCE_SAMPLE_BYTES
from bastion.responses import json_response

router = APIRouter()

_UPLOAD = {
    "required": True,
    "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["artifact"],
                "properties": {
                    "artifact": {"type": "string", "format": "binary", "description": "the ONNX file"},
                    "metadata": {"type": "string", "description": "VersionMetadata as JSON"},
                    "signature": {"type": "string", "description": "base64 Ed25519 over the sha256"},
                    "tokenizer": {
                        "type": "string",
                        "format": "binary",
                        "description": "a text version's Hugging Face tokenizers JSON (with the metadata's 'text')",
                    },
                },
            }
        },
    },
}


_MODES = {"type": "string", "enum": ["off", "flag", "block"]}
_PII_MODES = {"type": "string", "enum": ["off", "flag", "redact", "block"]}
_GUARDS = {
    "type": "object",
    "description": "a guard policy (docs/guards.md); every key is optional",
    "properties": {
        "injection": _MODES,
        "injection_threshold": {"type": "number", "minimum": 0, "maximum": 1},
        "pii_in": _PII_MODES,
        "pii_out": _PII_MODES,
        "pii_kinds": {"type": "array", "items": {"type": "string"}},
        "canary": _MODES,
        "output": {"type": "object"},
    },
    "additionalProperties": False,
}


@router.get("/models", tags=["models"], **needs("models:read"))
async def list_models(request: Request) -> Response:
    """Every model with its versions and the version that serves now."""
    return json_response({"models": await run_in_threadpool(plane_of(request).registry.list_models)})


@router.get("/models/{name}", tags=["models"], **needs("models:read"))
async def get_model(name: str, request: Request) -> Response:
    return json_response(await run_in_threadpool(plane_of(request).registry.get_model, name))


@router.post("/models/{name}/versions", status_code=201, tags=["models"], **needs("models:write", requestBody=_UPLOAD))
async def register_version(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
    description: str = Query(default="", max_length=4000),
    activate: bool | None = Query(default=None, description="unset: activate unless the model has gates"),
    version: int | None = Query(default=None, ge=1, le=1_000_000, description="name the version (409 if it exists)"),
    rows_independent: bool | None = Query(
        default=None, description="false when an output depends on other rows (e.g. softmax across the batch)"
    ),
    signature: str | None = Query(default=None, max_length=200, description="base64 Ed25519 over the sha256"),
    signer: str | None = Query(default=None, max_length=64, description="tenant whose public key verifies it"),
) -> Response:
    """Register a new, immutable version: the ONNX file as the raw body, or a multipart form with
    the file (``artifact``), its metadata (``metadata``, JSON), a detached ``signature`` and, for a
    text version, its ``tokenizer`` (a tokenizers JSON; the metadata's ``text`` section names the
    task and its config). An activated version is warmed up on the workers, then becomes the primary."""
    plane = plane_of(request)
    settings = plane.settings
    upload = await _upload(
        request,
        settings.max_upload_bytes,
        settings.max_metadata_bytes + MAX_REFERENCE_SAMPLE_BYTES,
        settings.max_tokenizer_bytes,
    )
    data, metadata, form_signature = upload.artifact, upload.metadata, upload.signature
    prepare = functools.partial(
        plane.registry.prepare_version,
        name,
        data,
        metadata=metadata,
        description=description,
        created_by=str(admin["id"]),
        activate=activate,
        rows_independent=rows_independent,
        version=version,
        artifact_signature=form_signature or signature,
        signer=signer,
        tokenizer=upload.tokenizer,
    )
    prepared = await run_in_threadpool(prepare)  # the slow checks, before the unit of work
    view = await changes.run(
        plane,
        admin,
        "version.register",
        ("model", name),
        functools.partial(plane.registry.add_version, prepared),
        detail=lambda v: {k: v[k] for k in ("version", "sha256", "stage", "verified", "signed_by")},
    )
    if view["stage"] == "production":
        view["warm"] = await route_primary(plane, admin, name, view["version"])
    return json_response(view, status_code=201)


@dataclass(frozen=True, slots=True)
class _Upload:
    artifact: bytes
    metadata: dict[str, Any] | None = None
    signature: str | None = None
    tokenizer: bytes | None = None


_FIELDS = ("artifact", "metadata", "signature", "tokenizer")


async def _upload(request: Request, limit: int, metadata_limit: int, tokenizer_limit: int) -> _Upload:
    """The artifact bytes, the metadata document (at most ``metadata_limit`` bytes of JSON before
    it is parsed: ``max_metadata_bytes`` plus room for a reference sample), the signature and a
    text version's tokenizer (at most ``tokenizer_limit`` bytes)."""
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type == "application/octet-stream":
        return _Upload(await request.body())
    if content_type != "multipart/form-data":
        raise UnsupportedMedia(
            "send the ONNX file as 'Content-Type: application/octet-stream', or a multipart/form-data form "
            "with 'artifact', 'metadata', 'signature' and (a text version) 'tokenizer'"
        )
    try:
        form = await request.form(max_files=2, max_fields=5, max_part_size=metadata_limit)
    except Exception as exc:  # python-multipart / Starlette raise several kinds for malformed forms
        if "maximum size" in str(exc):
            raise PayloadTooLarge(
                f"a form field ('metadata' or 'signature') is over {metadata_limit} bytes "
                "(max_metadata_bytes, plus room for a reference sample)"
            ) from exc
        raise InvalidInput("the multipart form is malformed or has too many parts") from exc
    unknown = sorted(set(form.keys()) - set(_FIELDS))
    if unknown:
        raise InvalidInput(f"unknown form fields {unknown}; send 'artifact', 'metadata', 'signature' and 'tokenizer'")
    repeated = sorted(k for k in _FIELDS if len(form.getlist(k)) > 1)
    if repeated:
        raise InvalidInput(f"the form sends {repeated} more than once; send each part once")
    artifact = form.get("artifact")
    if artifact is None or isinstance(artifact, str):
        raise InvalidInput("the form needs the ONNX file as the 'artifact' file field")
    data = await artifact.read()
    raw_meta = form.get("metadata")
    metadata = None
    if raw_meta is not None:
        # a field (max_part_size bounds it), or a file read no further than the limit
        raw = raw_meta.encode() if isinstance(raw_meta, str) else await raw_meta.read(metadata_limit + 1)
        if len(raw) > metadata_limit:
            raise PayloadTooLarge(
                f"the 'metadata' field is {len(raw)} bytes; the limit is {metadata_limit} "
                "(max_metadata_bytes, plus room for a reference sample)"
            )
        try:
            metadata = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput("the 'metadata' field is not valid JSON") from exc
        if not isinstance(metadata, dict):
            raise InvalidInput("the 'metadata' field is a JSON object")
    sig = form.get("signature")
    return _Upload(data, metadata, sig if isinstance(sig, str) else None, await _tokenizer(form, tokenizer_limit))


async def _tokenizer(form: FormData, limit: int) -> bytes | None:
    """The ``tokenizer`` part's bytes (a file or a field), refused (413) past ``limit``."""
    found = form.get("tokenizer")
    if found is None:
        return None
    raw = found.encode() if isinstance(found, str) else await found.read(limit + 1)
    if len(raw) > limit:
        raise PayloadTooLarge(
            f"the tokenizer is over {limit} bytes (max_tokenizer_bytes)", field="tokenizer", limit=limit
        )
    return raw


@router.get("/models/{name}/guards", tags=["models"], **needs("models:read"))
async def get_guards(name: str, request: Request) -> Response:
    """The model's guard policy (``bastion.guards``): injection screen, PII in and out, canary,
    output checks. A model that never had one shows every guard off."""
    return json_response(await run_in_threadpool(plane_of(request).registry.guards.get, name))


@router.put(
    "/models/{name}/guards",
    tags=["models"],
    **needs("models:write", requestBody={"required": True, "content": {"application/json": {"schema": _GUARDS}}}),
)
async def set_guards(
    name: str,
    request: Request,
    admin: dict[str, Any] = Depends(principal),  # noqa: B008 - FastAPI dependency
) -> Response:
    """Replace the model's guard policy (a key left out is off or its default; an unknown key or
    value is a 400 naming it). Gateways and workers apply it from the next snapshot."""
    plane = plane_of(request)
    policy = parse_json(await request.body(), request.headers.get("content-type"))
    change = functools.partial(plane.registry.guards.set, name, policy, str(admin["id"]))
    view = await changes.run(
        plane, admin, "guards.set", ("model", name), change, detail=lambda v: {"guards": v["guards"]}
    )
    return json_response(view)
