"""The registry on real SQL databases: SQLite and PostgreSQL (every test runs on both)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion import demo
from bastion.artifacts.store import ArtifactStore
from bastion.errors import Conflict, InvalidArtifact, InvalidInput, NotFound, PayloadTooLarge
from bastion.registry import db
from bastion.registry.service import Registry

# A pickle stream that would import os.system when unpickled; here it is only bytes.
PICKLE = (
    b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x02id\x94\x85\x94R\x94."
)


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Iterator[Registry]:
    engine = db.engine_for(database_url)
    db.migrate(engine)
    db.migrate(engine)  # idempotent
    yield Registry(db.session_factory(engine), ArtifactStore(tmp_path / "artifacts"), max_upload_bytes=1 << 20)
    engine.dispose()


def test_register_derives_the_signature_and_numbers_versions(registry: Registry) -> None:
    first = registry.register_version("breast-cancer", demo.model_bytes(), created_by="alice")
    second = registry.register_version("breast-cancer", demo.model_bytes())
    assert (first["version"], second["version"]) == (1, 2)
    assert first["signature"]["inputs"] == [{"name": "input", "dtype": "float32", "shape": [None, 30]}]
    assert {o["name"] for o in first["signature"]["outputs"]} == {"label", "probabilities"}
    assert len(first["sha256"]) == 64
    model = registry.get_model("breast-cancer")
    assert model["current_version"] == 2


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (PICKLE, "pickle"),
        (b"PK\x03\x04" + b"\x00" * 100, "zip"),
        (b"", "empty"),
        (b"this is not a model at all", "ONNX"),
        (b"\x08\x07" + b"\xff" * 50, "ONNX"),
    ],
)
def test_non_onnx_artifacts_are_refused_by_content(registry: Registry, data: bytes, says: str) -> None:
    with pytest.raises(InvalidArtifact, match=f"(?i){says}"):
        registry.register_version("evil", data)
    with pytest.raises(NotFound):
        registry.get_model("evil")


def test_zip_wrapped_pickle_is_refused(registry: Registry) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", PICKLE)
    with pytest.raises(InvalidArtifact, match="zip"):
        registry.register_version("evil", buf.getvalue())


def test_oversized_artifact_is_refused(registry: Registry) -> None:
    registry.max_upload_bytes = 100
    with pytest.raises(PayloadTooLarge, match="limit"):
        registry.register_version("big", demo.model_bytes())


def test_model_names_are_checked(registry: Registry) -> None:
    with pytest.raises(InvalidInput):
        registry.register_version("../etc", demo.model_bytes())


def test_keys_create_list_revoke_and_snapshot(registry: Registry) -> None:
    row, plaintext = registry.create_key("acme", "ci", ["predict"])
    assert plaintext.startswith("bst_")
    assert registry.key_by_secret(plaintext)["tenant"] == "acme"  # type: ignore[index]
    snap = registry.snapshot()
    assert plaintext not in str(snap)
    assert [k["id"] for k in snap["keys"].values()] == [row.id]
    registry.revoke_key(row.id)
    assert registry.key_by_secret(plaintext) is None
    assert registry.snapshot()["keys"] == {}
    assert registry.list_keys("acme")[0]["revoked"] is True
    with pytest.raises(InvalidInput):
        registry.create_key("acme", "bad", ["root"])
    with pytest.raises(NotFound):
        registry.revoke_key("nope")


def test_external_data_pointing_outside_the_artifact_is_refused(registry: Registry) -> None:
    """An initializer whose bytes live in '../../etc/passwd' is refused whatever the path."""
    import onnx
    from onnx import helper

    weight = helper.make_tensor("w", onnx.TensorProto.FLOAT, [1], [1.0])
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 1])],
        initializer=[weight],
    )
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    with pytest.raises(InvalidArtifact, match="external tensor data"):
        registry.register_version("traversal", data)


def test_a_named_version_is_immutable(registry: Registry) -> None:
    """A second upload to an existing version is a conflict; the first one is untouched."""
    first = registry.register_version("pinned", demo.model_bytes(), version=5)
    with pytest.raises(Conflict, match="already registered; versions are immutable"):
        registry.register_version("pinned", b"\x08\x07" + demo.model_bytes()[2:], version=5)
    with pytest.raises(Conflict):
        registry.register_version("pinned", demo.model_bytes(), version=5)
    assert registry.get_model("pinned")["versions"] == [first]
    assert registry.register_version("pinned", demo.model_bytes())["version"] == 6
    with pytest.raises(InvalidInput):
        registry.register_version("pinned", demo.model_bytes(), version=0)
