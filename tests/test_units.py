"""Pure pieces: the tensor codec, signature validation, and the content-addressed store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bastion import codec
from bastion.artifacts.store import ArtifactStore
from bastion.errors import IntegrityError, InvalidInput
from bastion.signature import TensorSpec, to_tensor


def test_codec_round_trips_tensors_exactly() -> None:
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], dtype=np.int64)}
    back = codec.decode(codec.encode(tensors))
    assert set(back) == {"a", "b"}
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value)
        assert back[name].dtype == value.dtype


def test_codec_refuses_truncated_and_foreign_blobs() -> None:
    blob = codec.encode({"a": np.ones((4, 4), np.float32)})
    with pytest.raises(InvalidInput, match="truncated"):
        codec.decode(blob[:-3])
    with pytest.raises(InvalidInput, match="dtype"):
        codec.decode(b'[["a", "object", [1]]]\n' + b"\x00" * 8)


SPEC = TensorSpec("x", "float32", (None, 3))


def test_to_tensor_accepts_ints_for_floats_and_checks_rows() -> None:
    arr = to_tensor(SPEC, [[1, 2, 3]], max_rows=2)
    assert arr.dtype == np.float32
    with pytest.raises(InvalidInput, match="limit is 2"):
        to_tensor(SPEC, [[1, 2, 3]] * 3, max_rows=2)


def test_to_tensor_refuses_floats_for_ints_and_out_of_range() -> None:
    spec = TensorSpec("n", "int32", (None,))
    with pytest.raises(InvalidInput, match="int32"):
        to_tensor(spec, [1.5], max_rows=10)
    with pytest.raises(InvalidInput, match="out of range"):
        to_tensor(spec, [2**40], max_rows=10)


def test_store_verifies_digest_on_every_read(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    digest = store.put(b"model bytes")
    assert store.open(digest) == b"model bytes"
    path = store.path(digest)
    path.chmod(0o644)
    path.write_bytes(b"model bytez")
    with pytest.raises(IntegrityError, match="does not match"):
        store.open(digest)


def test_gateway_openapi_documents_every_public_route(tmp_path: Path) -> None:
    from bastion.gateway.app import create_app
    from bastion.settings import Settings

    schema = create_app(Settings(data_dir=tmp_path, docs_enabled=True)).openapi()
    paths = schema["paths"]
    for path in (
        "/v1/models/{name}/predict",
        "/v1/models/{name}/jobs",
        "/v1/jobs/{job_id}",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
        "/v2/models/{name}/versions/{version}",
        "/v2/models/{name}/versions/{version}/ready",
    ):
        assert path in paths, path
    oip_error = paths["/v2/models/{name}/versions/{version}/infer"]["post"]["responses"]["400"]
    assert "error" in oip_error["content"]["application/json"]["schema"]["required"]
    assert paths["/v1/models/{name}/predict"]["post"]["security"] == [{"apiKey": []}]
    assert "apiKey" in schema["components"]["securitySchemes"]


def test_an_unexpected_error_becomes_a_bare_problem_with_our_headers() -> None:
    """An exception no handler knows is logged and answered 500 problem+json, with no internals."""
    import asyncio

    from bastion.middleware import RequestId, RequestMetrics, SecurityHeaders

    async def broken_app(scope: object, receive: object, send: object) -> None:
        raise RuntimeError("secret internal detail /etc/bastion")

    app = SecurityHeaders(RequestId(RequestMetrics(broken_app)))
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "query_string": b""}
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    start, body = sent[0], sent[1]
    assert start["status"] == 500
    headers = dict(start["headers"])  # type: ignore[arg-type]
    assert headers[b"content-type"] == b"application/problem+json"
    assert b"x-request-id" in headers and b"x-content-type-options" in headers
    assert b"secret" not in body["body"] and b"RuntimeError" not in body["body"]  # type: ignore[operator]


def test_shadow_comparison_counts_agreeing_rows_and_absolute_differences() -> None:
    from bastion.worker.shadow import compare

    answer = codec.encode(
        {"label": np.array([0, 1, 1]), "p": np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]], np.float32)}
    )
    shadow = codec.encode(
        {"label": np.array([0, 0, 1]), "p": np.array([[0.8, 0.2], [0.6, 0.4], [0.4, 0.6]], np.float32)}
    )
    c = compare(answer, shadow)
    assert (c.rows, c.agree_rows, c.values) == (3, 2, 6)
    assert abs(c.abs_diff_sum - 1.0) < 1e-6


def test_cli_policy_rules_parse_every_kind() -> None:
    import typer

    from bastion.cli.deploy import rule as _rule

    assert _rule("EU=1,2") == {"jurisdiction": "EU", "allow": [1, 2]}
    assert _rule("tenant:acme=3") == {"tenant": "acme", "allow": [3]}
    assert _rule("without-consent:profiling=1") == {"without_consent": "profiling", "allow": [1]}
    for bad in ("EU", "nothing:x=1", "EU=a", "=1"):
        with pytest.raises(typer.BadParameter):
            _rule(bad)


def test_random_ids_are_distinct_and_a_forked_child_never_repeats_its_parents() -> None:
    import os

    from bastion import ids

    assert len({ids.hex_id() for _ in range(20_000)}) == 20_000
    ids.hex_id()  # the parent holds a block it has not used up
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, ",".join(ids.hex_id() for _ in range(64)).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = set(os.read(read, 1 << 16).decode().split(","))
    parent = {ids.hex_id() for _ in range(64)}
    assert len(child) == 64 and not child & parent
