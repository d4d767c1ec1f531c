"""The Open Inference Protocol v2 over HTTP as its reference clients speak it (``tritonclient.http``,
KServe's): JSON bodies with or without a ``Content-Type``, and the binary tensor data extension.

A request with ``Inference-Header-Content-Length: N`` is framed: its first N bytes are the JSON
header, the rest the raw little-endian data of the inputs that carry
``parameters.binary_data_size``, back to back in the order of ``inputs``; the sizes must account
for every byte after the header. Binary inputs go through ``signature.from_raw``: the same size,
shape, finiteness and row checks as JSON data. The body as a whole is bounded by the body-size
limit before it gets here.

An output asked for with ``parameters.binary_data`` (or every output, under the request's
``parameters.binary_data_output``) goes back as raw bytes after the JSON header, described by its
``parameters.binary_data_size``; the response then carries ``Inference-Header-Content-Length``
and ``Content-Type: application/octet-stream``. Without binary outputs it is plain JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from starlette.responses import Response
from starlette.types import Scope

from bastion import jsonbody
from bastion.errors import InvalidInput, JobFailed, UnsupportedMedia
from bastion.gateway.payloads import V2Request, v2_output, v2_request
from bastion.responses import json_response
from bastion.signature import Signature, to_raw

HEADER_LENGTH = "inference-header-content-length"  # as the pipeline's headers name it (lower case)
BINARY_TYPE = "application/octet-stream"
_MAX_LENGTH_DIGITS = 12


@dataclass(frozen=True, slots=True)
class Body:
    """A request body split at its JSON header: the document and the bytes after it (``framed``:
    the request used the binary extension)."""

    doc: Any
    binary: bytes = b""
    framed: bool = False


def refuse_encoded(scope: Scope) -> None:
    """A compressed body (``Content-Encoding``, e.g. tritonclient's ``request_compression_algorithm``)
    is refused with 415: it is never inflated, so no small body can expand past the size limit."""
    for name, value in scope["headers"]:
        if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            raise UnsupportedMedia(
                f"compressed request bodies (Content-Encoding: {value.decode('latin-1')[:20]}) are not supported; "
                "send the body uncompressed"
            )


def decode(body: bytes, headers: Mapping[str, str]) -> Body:
    """Split and parse a ``/v2/.../infer`` body (the pipeline's ``decode`` step): JSON sent as
    ``application/json`` or with no ``Content-Type`` at all; with ``Inference-Header-Content-Length``
    also as ``application/octet-stream``. Any other type is a 415."""
    content_type = headers.get("content-type")
    length = headers.get(HEADER_LENGTH)
    if content_type is not None and not jsonbody.is_json(content_type):
        if length is None or content_type.split(";", 1)[0].strip().lower() != BINARY_TYPE:
            raise UnsupportedMedia(
                "the body must be JSON ('Content-Type: application/json', or none), or JSON followed by binary "
                "tensors ('Inference-Header-Content-Length' and 'Content-Type: application/octet-stream')"
            )
    if length is None:
        return Body(jsonbody.loads(body))
    size = header_length(length, len(body))
    return Body(jsonbody.loads(body[:size]), body[size:], framed=True)


def header_length(text: str, total: int) -> int:
    """The JSON header's length from ``Inference-Header-Content-Length``, within the body."""
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > _MAX_LENGTH_DIGITS:
        raise InvalidInput("Inference-Header-Content-Length must be a number of bytes")
    size = int(text)
    if size > total:
        raise InvalidInput(f"Inference-Header-Content-Length is {size} bytes but the body has only {total}")
    return size


def attach(body: Body) -> list[bytes | None]:
    """Each input's binary data, by position in ``inputs`` (None: sent as JSON ``data``), cut from
    the bytes after the header in order; the declared sizes must add up to exactly those bytes."""
    doc = body.doc
    items = doc.get("inputs") if isinstance(doc, dict) else None
    found: list[bytes | None] = []
    if not isinstance(items, list):
        return found  # no inputs to cut for: the document's own error comes next
    binary = body.binary
    offset = 0
    for index, item in enumerate(items):
        params = item.get("parameters") if isinstance(item, dict) else None
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is None:
            found.append(None)
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"inputs[{index}].parameters.binary_data_size must be a non-negative number of bytes")
        if offset + size > len(binary):
            raise InvalidInput(
                f"inputs[{index}] declares {size} bytes of binary data but only {len(binary) - offset} remain "
                f"after the JSON header: the binary data is truncated"
            )
        found.append(binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise InvalidInput(
            f"the inputs' binary_data_size add up to {offset} bytes but {len(binary)} bytes follow the JSON header"
        )
    return found


def parse(body: Body, signature: Signature, max_rows: int) -> tuple[dict[str, np.ndarray], V2Request]:
    """The pipeline's ``parse`` step: the tensors and the validated request."""
    request = v2_request(body.doc, signature, max_rows, attach(body) if body.framed else None)
    return request.tensors, request


def response(
    outputs: dict[str, np.ndarray], request: V2Request, head: dict[str, Any], headers: dict[str, str]
) -> Response:
    """The inference response: ``head`` (model name, version, id) with the outputs asked for, as
    JSON, or as a JSON header followed by the binary outputs."""
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in request.answer(outputs):
        value = outputs.get(name)
        if value is None:
            raise JobFailed(f"the model returned no output {name!r}")
        if binary:
            datatype, shape, raw = to_raw(value)
            described.append(
                {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(raw)}}
            )
            blobs.append(raw)
        else:
            described.append(v2_output(name, value))
    body = {**head, "outputs": described}
    if not blobs:
        return json_response(body, headers=headers)
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(
        b"".join([header, *blobs]),
        media_type=BINARY_TYPE,
        headers={**headers, "Inference-Header-Content-Length": str(len(header))},
    )
