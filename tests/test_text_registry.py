"""Text versions in the registry (tokenizer + task), guard policies, and the tokenizers the
control plane keeps in Redis for gateways: a real control plane (a real process), real Redis,
real ONNX graphs and tokenizers (``bastion.demo.text_models``), real uploads over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from onnx import TensorProto, helper

from bastion import snapshot
from bastion.artifacts.store import ArtifactStore, sha256_hex
from bastion.control import tokenizers
from bastion.demo import text_models
from bastion.embedded.supervisor import DEMO_CHAT_GUARDS, register_text_demos
from bastion.errors import InvalidInput
from bastion.registry import db
from bastion.text.jobs import TASK_EMBEDDING, TASK_GENERATION, tokenizer_key

from .support import Stack, running

TOKENIZER_CAP = 16 << 10  # the stack's max_tokenizer_bytes: the demo tokenizer (about 11 KB) fits


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The control plane alone (and Redis): registration needs no worker and no gateway."""
    with running(
        tmp_path_factory.mktemp("text-registry"), workers=0, gateways=0, max_tokenizer_bytes=TOKENIZER_CAP
    ) as s:
        register_text_demos(s.admin)
        yield s


@pytest.fixture
def client(stack: Stack) -> Iterator[redis.Redis]:
    found = stack.redis_client()
    try:
        yield found
    finally:
        found.close()


def _published(stack: Stack) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(stack.published_snapshot())
    return data


def _upload(
    stack: Stack,
    model: str,
    artifact: bytes,
    *,
    tokenizer: bytes | None = None,
    text: dict[str, Any] | None = None,
) -> httpx.Response:
    files: dict[str, Any] = {"artifact": ("model.onnx", artifact, "application/octet-stream")}
    if tokenizer is not None:
        files["tokenizer"] = ("tokenizer.json", tokenizer, "application/json")
    data = {"metadata": json.dumps({"text": text} if text is not None else {})}
    return httpx.post(
        f"{stack.control_url}/admin/v1/models/{model}/versions",
        headers={"Authorization": f"Bearer {stack.admin_key}"},
        files=files,
        data=data,
        timeout=60,
    )


def _embedding() -> dict[str, Any]:
    return {"task": TASK_EMBEDDING, "config": text_models.embedding_config()}


def _generation() -> dict[str, Any]:
    return {"task": TASK_GENERATION, "config": text_models.generation_config()}


# registration --------------------------------------------------------------------------------
def test_the_demo_text_models_register_with_the_queue_signature(stack: Stack) -> None:
    embed = stack.admin.version(text_models.ENCODER_NAME, 1)
    assert embed["stage"] == "production"
    assert embed["signature"] == {
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": [None, None]},
            {"name": "attention_mask", "dtype": "int64", "shape": [None, None]},
        ],
        "outputs": [{"name": "embedding", "dtype": "float32", "shape": [None, 128]}],
        "rows_independent": True,
    }
    tokenizer = text_models.tokenizer_json()
    assert embed["metadata"]["text"] == {
        "task": "embedding",
        "tokenizer": sha256_hex(tokenizer),
        "tokenizer_bytes": len(tokenizer),
        "config": text_models.embedding_config() | {"special_tokens": {"bos": None, "eos": None, "pad": "<|pad|>"}},
    }
    chat = stack.admin.version(text_models.CHAT_NAME, 1)
    assert chat["signature"] == {
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [1, None]}],
        "outputs": [
            {"name": "text", "dtype": "uint8", "shape": [1, None]},
            {"name": "usage", "dtype": "int64", "shape": [1, 2]},
            {"name": "finish", "dtype": "int64", "shape": [1]},
        ],
        "rows_independent": False,
    }
    assert chat["metadata"]["text"]["task"] == "generation"
    assert chat["metadata"]["text"]["config"]["chat_template"]["pinned_system"] == text_models.PINNED_SYSTEM
    # the tokenizer is kept in the artifact store, content-addressed, for workers
    stored = stack.root / "artifacts" / sha256_hex(tokenizer)[:2] / sha256_hex(tokenizer)
    assert stored.read_bytes() == tokenizer


def test_the_snapshot_carries_text_and_guards(stack: Stack) -> None:
    parsed = snapshot.Snapshot.parse(stack.published_snapshot())
    sha = sha256_hex(text_models.tokenizer_json())
    embed = parsed.versions[(text_models.ENCODER_NAME, 1)]
    assert embed.text is not None and (embed.text.task, embed.text.tokenizer) == ("embedding", sha)
    assert embed.text.config["output"] == "last_hidden_state"
    chat = parsed.versions[(text_models.CHAT_NAME, 1)]
    assert chat.text is not None and chat.text.task == "generation"
    assert chat.text.config["stop_tokens"] == ["<|end|>"]
    guards = parsed.models[text_models.CHAT_NAME].guards
    assert guards is not None
    assert {k: guards[k] for k in DEMO_CHAT_GUARDS} == DEMO_CHAT_GUARDS
    assert guards["pii_in"] == "off"
    assert parsed.models[text_models.ENCODER_NAME].guards is None  # never set: every guard off
    assert parsed.versions[("breast-cancer", 1)].text is None  # a tensor model


def test_the_tokenizer_is_in_redis_and_goes_when_its_version_leaves_the_snapshot(
    stack: Stack, client: redis.Redis
) -> None:
    shared = sha256_hex(text_models.tokenizer_json())
    assert client.get(tokenizer_key(shared)) == text_models.tokenizer_json()
    # the same tokenizer, written otherwise: another digest
    other = json.dumps(json.loads(text_models.tokenizer_json()), ensure_ascii=False).encode()
    assert sha256_hex(other) != shared and len(other) <= TOKENIZER_CAP
    first = stack.admin.register("embed-lifecycle", text_models.encoder_onnx(), tokenizer=other, text=_embedding())
    assert client.get(tokenizer_key(sha256_hex(other))) == other
    assert client.sismember(tokenizers.TOKENIZERS_KEY, sha256_hex(other))
    stack.admin.register(
        "embed-lifecycle", text_models.encoder_onnx(), tokenizer=text_models.tokenizer_json(), text=_embedding()
    )
    stack.admin.set_stage("embed-lifecycle", first["version"], "retired")
    versions = _published(stack)["models"]["embed-lifecycle"]["versions"]
    assert str(first["version"]) not in versions
    assert client.get(tokenizer_key(sha256_hex(other))) is None
    assert not client.sismember(tokenizers.TOKENIZERS_KEY, sha256_hex(other))
    assert client.get(tokenizer_key(shared)) == text_models.tokenizer_json()  # still named


def test_a_lost_tokenizer_key_is_written_again_at_the_next_publish(stack: Stack, client: redis.Redis) -> None:
    shared = sha256_hex(text_models.tokenizer_json())
    client.delete(tokenizer_key(shared))
    stack.admin.set_guards(text_models.ENCODER_NAME, {})  # any published change
    assert client.get(tokenizer_key(shared)) == text_models.tokenizer_json()


def test_an_older_publisher_never_prunes_a_newer_snapshots_tokenizers(
    redis_client: redis.Redis, tmp_path: Path
) -> None:
    store = ArtifactStore(tmp_path)
    a, b = store.put(b'{"a": 1}'), store.put(b'{"b": 2}')
    tokenizers.before_publish(redis_client, store, [a, b])
    redis_client.set("snap:serial", "20")
    tokenizers.after_publish(redis_client, store, 10, [a])  # serial 10 is no longer the published one
    assert redis_client.get(tokenizer_key(b)) == b'{"b": 2}'
    tokenizers.after_publish(redis_client, store, 20, [a])
    assert redis_client.get(tokenizer_key(b)) is None
    assert redis_client.smembers(tokenizers.TOKENIZERS_KEY) == {a.encode()}
    redis_client.delete(tokenizer_key(a))
    tokenizers.after_publish(redis_client, store, 20, [a])  # named and missing: written again
    assert redis_client.get(tokenizer_key(a)) == b'{"a": 1}'


# refusals -------------------------------------------------------------------------------------
def _problem(response: httpx.Response, status: int, says: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert says.lower() in response.json()["detail"].lower(), response.json()["detail"]


def test_a_tokenizer_without_a_text_section_is_refused(stack: Stack) -> None:
    response = _upload(stack, "bad-text", text_models.encoder_onnx(), tokenizer=text_models.tokenizer_json())
    _problem(response, 400, "'text' section")


def test_a_text_section_without_a_tokenizer_is_refused(stack: Stack) -> None:
    _problem(_upload(stack, "bad-text", text_models.encoder_onnx(), text=_embedding()), 400, "needs its tokenizer")


def test_a_tokenizer_that_is_not_json_is_refused(stack: Stack) -> None:
    response = _upload(stack, "bad-text", text_models.encoder_onnx(), tokenizer=b"{not json", text=_embedding())
    _problem(response, 422, "not UTF-8 JSON")


def test_a_tokenizer_that_does_not_load_is_refused(stack: Stack) -> None:
    document = json.loads(text_models.tokenizer_json())
    document["model"]["merges"] = ["no such-token"]  # merges of tokens outside the vocabulary
    response = _upload(
        stack, "bad-text", text_models.encoder_onnx(), tokenizer=json.dumps(document).encode(), text=_embedding()
    )
    _problem(response, 422, "tokenizer")


# A post-processor template naming a special token it does not define: it loads, and the Rust side
# panics (pyo3 PanicException, a BaseException) on the first encode with special tokens.
PANICS = {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [],
    "special_tokens": {},
}
# A WordPiece whose unknown token is missing: it loads, and fails on the first word it does not know.
NO_UNK = {
    "type": "WordPiece",
    "unk_token": "[UNK]",
    "continuing_subword_prefix": "##",
    "max_input_chars_per_word": 100,
    "vocab": {"<|pad|>": 0},
}


@pytest.mark.parametrize(("part", "value"), [("post_processor", PANICS), ("model", NO_UNK)])
def test_a_tokenizer_that_fails_on_ordinary_text_is_refused_in_the_check_child(
    stack: Stack, part: str, value: dict[str, Any]
) -> None:
    document = json.loads(text_models.tokenizer_json())
    document[part] = value
    if part == "model":
        document["added_tokens"] = []
    config = {"task": TASK_EMBEDDING, "config": text_models.embedding_config()}
    response = _upload(
        stack, "bad-text", text_models.encoder_onnx(), tokenizer=json.dumps(document).encode(), text=config
    )
    _problem(response, 422, "fails on ordinary text")
    assert stack.procs["control"].poll() is None  # the control plane lives on


def test_a_tokenizer_over_the_cap_is_refused(stack: Stack) -> None:
    big = text_models.tokenizer_json() + b" " * TOKENIZER_CAP
    _problem(
        _upload(stack, "bad-text", text_models.encoder_onnx(), tokenizer=big, text=_embedding()),
        413,
        "max_tokenizer_bytes",
    )


def test_a_config_naming_a_missing_token_is_refused(stack: Stack) -> None:
    config = text_models.generation_config() | {"stop_tokens": ["<|end|>", "<|no-such-token|>"]}
    text = {"task": TASK_GENERATION, "config": config}
    response = _upload(
        stack, "bad-text", text_models.causal_lm_onnx(), tokenizer=text_models.tokenizer_json(), text=text
    )
    _problem(response, 400, "<|no-such-token|>")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ({"task": "embedding", "config": {"pooling": "max"}}, "pooling"),
        ({"task": "generation", "config": {"special_tokens": {"eos": None}}}, "eos"),
        ({"task": "classification", "config": {}}, "task"),
        ({"task": "embedding", "config": {}, "tokenizer": "0" * 64}, "set by the registry"),
    ],
)
def test_a_bad_text_config_is_refused(stack: Stack, text: dict[str, Any], says: str) -> None:
    response = _upload(stack, "bad-text", text_models.encoder_onnx(), tokenizer=text_models.tokenizer_json(), text=text)
    _problem(response, 400, says)


def _decoder(past: list[str | int], ids: int = TensorProto.INT64) -> bytes:
    """A decoder-with-past graph of one layer whose cache inputs have the shape ``past``."""
    value = helper.make_tensor_value_info
    inputs = [
        value("input_ids", ids, ["b", "s"]),
        value("attention_mask", TensorProto.INT64, ["b", "t"]),
        *(value(f"past_key_values.0.{kind}", TensorProto.FLOAT, past) for kind in ("key", "value")),
    ]
    outputs = [
        value("logits", TensorProto.FLOAT, ["b", "s", 8]),
        *(value(f"present.0.{kind}", TensorProto.FLOAT, past) for kind in ("key", "value")),
    ]
    nodes = [helper.make_node("Identity", [f"past_key_values.0.{k}"], [f"present.0.{k}"]) for k in ("key", "value")]
    nodes += [
        helper.make_node("Cast", ["input_ids"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["as_float", "axis"], ["column"]),
        helper.make_node("Expand", ["column", "width"], ["logits"]),
    ]
    constants = [
        helper.make_tensor("axis", TensorProto.INT64, [1], [2]),
        helper.make_tensor("width", TensorProto.INT64, [3], [1, 1, 8]),
    ]
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data: bytes = model.SerializeToString()
    return data


def test_a_decoder_graph_of_the_right_layout_is_taken(stack: Stack) -> None:
    made = _upload(
        stack, "tiny-decoder", _decoder(["b", 2, "p", 4]), tokenizer=text_models.tokenizer_json(), text=_generation()
    )
    assert made.status_code == 201, made.text


@pytest.mark.parametrize(
    ("artifact", "text", "says"),
    [
        (lambda: _decoder(["b", "p"]), _generation, "must be [batch, heads, sequence, head_dim]"),
        (lambda: _decoder(["b", "h", "p", 4]), _generation, "static head"),
        (lambda: _decoder(["b", 2, "p", 4], ids=TensorProto.FLOAT), _generation, "must be int64"),
        (text_models.causal_lm_onnx, _embedding, "embedding model takes only"),
        (text_models.encoder_onnx, _generation, "past_key_values"),
        (text_models.encoder_onnx, lambda: {"task": "embedding", "config": {"output": "pooled"}}, "no output 'pooled'"),
    ],
)
def test_a_graph_that_does_not_fit_the_task_is_refused(stack: Stack, artifact: Any, text: Any, says: str) -> None:
    response = _upload(stack, "bad-text", artifact(), tokenizer=text_models.tokenizer_json(), text=text())
    _problem(response, 422, says)


def test_refused_text_uploads_record_nothing(stack: Stack) -> None:
    assert "bad-text" not in {m["name"] for m in stack.admin.models()}


# guards ---------------------------------------------------------------------------------------
def _guards(stack: Stack, model: str, body: Any, key: str | None = None) -> httpx.Response:
    return httpx.put(
        f"{stack.control_url}/admin/v1/models/{model}/guards",
        headers={"Authorization": f"Bearer {key or stack.admin_key}"},
        json=body,
        timeout=30,
    )


def test_an_unknown_guard_key_or_value_is_a_400_naming_it(stack: Stack) -> None:
    _problem(_guards(stack, text_models.CHAT_NAME, {"injektion": "block"}), 400, "injektion")
    _problem(_guards(stack, text_models.CHAT_NAME, {"pii_out": "shred"}), 400, "pii_out")
    _problem(_guards(stack, text_models.CHAT_NAME, {"output": {"max_chars": 0}}), 400, "max_chars")
    _problem(_guards(stack, text_models.CHAT_NAME, ["injection"]), 400, "object")
    assert _guards(stack, "no-such-model", {}).status_code == 404
    assert stack.admin.guards(text_models.CHAT_NAME)["guards"]["injection"] == "block"  # unchanged


def test_guards_need_models_write_to_set_and_models_read_to_read(stack: Stack) -> None:
    reader = stack.admin.create_key("operators", "guards-reader", scopes=["models:read"])["key"]
    assert _guards(stack, text_models.CHAT_NAME, {}, key=reader).status_code == 403
    shown = httpx.get(
        f"{stack.control_url}/admin/v1/models/{text_models.CHAT_NAME}/guards",
        headers={"Authorization": f"Bearer {reader}"},
        timeout=30,
    )
    assert shown.status_code == 200 and shown.json()["guards"]["canary"] == "block"


def test_a_guard_change_is_recorded(stack: Stack) -> None:
    changes = stack.admin.changes(limit=1000)["changes"]
    found = [c for c in changes if c["action"] == "guards.set" and c["resource"]["name"] == text_models.CHAT_NAME]
    assert found and found[0]["detail"]["guards"]["canary"] == "block"


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"BASTION_CONTROL_URL": stack.control_url, "BASTION_ADMIN_KEY": stack.admin_key, "COLUMNS": "200"}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    return subprocess.run(
        [sys.executable, "-m", "bastion", *args], capture_output=True, text=True, env={**clean, **env}, timeout=90
    )


def test_the_guards_cli_shows_and_merges(stack: Stack) -> None:
    model = text_models.ENCODER_NAME
    done = _cli(
        stack, "models", "guards", model, "--pii-in", "redact", "--pii-kinds", "email,phone", "--max-chars", "500"
    )
    assert done.returncode == 0, done.stderr
    done = _cli(
        stack, "models", "guards", model, "--injection", "flag", "--blocked-term", "secret", "--blocked-term", "hunter2"
    )
    assert done.returncode == 0, done.stderr
    shown = _cli(stack, "models", "guards", model, "--json")
    assert shown.returncode == 0, shown.stderr
    policy = json.loads(shown.stdout)["guards"]
    assert (policy["pii_in"], policy["injection"], policy["pii_kinds"]) == ("redact", "flag", ["email", "phone"])
    assert policy["output"]["max_chars"] == 500  # kept from the first call
    assert policy["output"]["blocked_terms"] == ["secret", "hunter2"]
    table = _cli(stack, "models", "guards", model)
    assert table.returncode == 0, table.stderr
    assert "output.blocked_terms" in table.stdout and "redact" in table.stdout
    bad = _cli(stack, "models", "guards", model, "--canary", "loud")
    assert bad.returncode != 0 and "canary" in (bad.stderr + bad.stdout)
    published = snapshot.Snapshot.parse(stack.published_snapshot()).models[model].guards
    assert published is not None and published["injection"] == "flag"


def test_the_register_cli_takes_a_tokenizer_and_a_text_config(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(text_models.encoder_onnx())
    (tmp_path / "tokenizer.json").write_bytes(text_models.tokenizer_json())
    (tmp_path / "text.json").write_text(json.dumps(_embedding()))
    done = _cli(
        stack,
        "models",
        "register",
        "embed-cli",
        str(tmp_path / "model.onnx"),
        "--tokenizer",
        str(tmp_path / "tokenizer.json"),
        "--text-config",
        str(tmp_path / "text.json"),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["metadata"]["text"]["task"] == "embedding"


# the migration --------------------------------------------------------------------------------
def test_migration_0011_matches_the_models_table(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from bastion.registry.tables import Base

    engine = db.engine_for(f"sqlite:///{tmp_path / 'registry.db'}")
    db.migrate(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diff if "guards" in repr(d) or "'models'" in repr(d)] == []
    engine.dispose()


def test_a_tokenizer_missing_from_the_store_is_skipped_not_fatal(redis_client: redis.Redis, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    kept = store.put(b'{"kept": 1}')
    tokenizers.before_publish(redis_client, store, ["f" * 64, kept])  # the first is in no store
    assert redis_client.get(tokenizer_key(kept)) == b'{"kept": 1}'
    assert redis_client.get(tokenizer_key("f" * 64)) is None


# the registry on its own, on both databases (the in-process checks) ------------------------------
def test_text_versions_and_guards_on_sqlite_and_postgresql(database_url: str, tmp_path: Path) -> None:
    from bastion.registry.service import Registry

    engine = db.engine_for(database_url)
    db.migrate(engine)
    try:
        registry = Registry(db.session_factory(engine), ArtifactStore(tmp_path / "artifacts"), max_upload_bytes=1 << 24)
        tokenizer = text_models.tokenizer_json()
        made = registry.register_version(
            "chat", text_models.causal_lm_onnx(), metadata={"text": _generation()}, tokenizer=tokenizer
        )
        assert made["metadata"]["text"]["tokenizer"] == sha256_hex(tokenizer)
        assert registry.store.open(sha256_hex(tokenizer)) == tokenizer
        registry.guards.set("chat", {"canary": "flag", "output": {"blocked_terms": ["x"]}}, "alice")
        assert registry.guards.get("chat")["guards"]["output"]["blocked_terms"] == ["x"]
        snap = registry.snapshot()["models"]["chat"]
        assert snap["guards"]["canary"] == "flag"
        assert snap["versions"]["1"]["text"]["tokenizer"] == sha256_hex(tokenizer)
        with pytest.raises(InvalidInput, match="injection"):
            registry.guards.set("chat", {"injection": "maybe"}, "alice")
    finally:
        engine.dispose()


def test_a_form_sending_a_part_twice_is_refused(stack: Stack) -> None:
    artifact = text_models.encoder_onnx()
    response = httpx.post(
        f"{stack.control_url}/admin/v1/models/bad-text/versions",
        headers={"Authorization": f"Bearer {stack.admin_key}"},
        files=[
            ("artifact", ("a.onnx", artifact, "application/octet-stream")),
            ("artifact", ("b.onnx", artifact, "application/octet-stream")),
        ],
        timeout=60,
    )
    _problem(response, 400, "more than once")


def test_a_tokenizer_whose_regular_expression_backtracks_is_refused_as_too_slow() -> None:
    """Its regex runs on every request's text at the gateway: one that backtracks on a run of a
    character would stall a gateway per request, so registration times it on such runs."""
    import json as _json

    from bastion.artifacts.text_check import inspect_tokenizer
    from bastion.errors import InvalidArtifact

    def tokenizer(pattern: str) -> bytes:
        split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
        model = {"type": "WordLevel", "vocab": {"[UNK]": 0, "a": 1}, "unk_token": "[UNK]"}
        doc = {"version": "1.0", "added_tokens": [], "pre_tokenizer": split, "model": model}
        return _json.dumps(doc).encode()

    assert inspect_tokenizer(tokenizer(r"\w+|[^\w\s]+"), []).vocab_size == 2  # an ordinary split passes
    with pytest.raises(InvalidArtifact, match="too slow"):
        inspect_tokenizer(tokenizer("(?:a|a){15}(?!a)"), [])
    # quadratic: fast on short runs, so the dearest probes run again at 8 times the length
    with pytest.raises(InvalidArtifact, match="times the cost"):
        inspect_tokenizer(tokenizer(r"\w+(?=\d)"), [])
