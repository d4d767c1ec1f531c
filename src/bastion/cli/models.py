"""``bastion models ...``: register, list and show models, their gates, evaluations and stages, and
their monitoring (``bastion models monitor``: drift and live accuracy per version)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from bastion.cli import monitoring, output
from bastion.cli.admin import AdminKey, ControlUrl, DataDir, Json, call, connect, json_file, show, typer_group

app = typer_group("Register, list and show models; gates, evaluations and stages; monitoring.")


# views -----------------------------------------------------------------------------------
def _tensor(spec: Mapping[str, Any]) -> str:
    shape = ", ".join("?" if d is None else str(d) for d in spec.get("shape") or [])
    return f"{spec.get('name', '?')} {spec.get('dtype', '?')} [{shape}]"


def version_fields(version: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """A version's fields, its signature as one line per tensor."""
    rows: list[tuple[str, Any]] = []
    for key, value in version.items():
        if key == "signature" and isinstance(value, Mapping):
            rows.append(("inputs", "\n".join(_tensor(t) for t in value.get("inputs") or [])))
            rows.append(("outputs", "\n".join(_tensor(t) for t in value.get("outputs") or [])))
            if "rows_independent" in value:
                rows.append(("rows_independent", value["rows_independent"]))
        else:
            rows.append((key, value))
    return rows


def show_version(version: Mapping[str, Any]) -> None:
    output.emit(output.record(version_fields(version)))


def _routes(deployment: Mapping[str, Any]) -> str:
    routes = deployment.get("routes") or []
    found = [f"v{r.get('version')} {r.get('role', 'primary')} {r.get('weight', 100)}%" for r in routes]
    if deployment.get("fallback_version") is not None:
        found.append(f"v{deployment['fallback_version']} fallback")
    return "\n".join(found) or "-"


def show_models(models: list[dict[str, Any]]) -> None:
    rows = []
    for m in models:
        versions = m.get("versions") or []
        deployment = m.get("deployment") or {}
        rows.append(
            [
                m.get("name"),
                ", ".join(str(v.get("version")) for v in versions) or "-",
                m.get("current_version"),
                _routes(deployment),
                "\n".join(f"v{v.get('version')} {v.get('stage')}" for v in versions) or "-",
                not deployment.get("disabled", False),
            ]
        )
    output.show_table(
        ["model", "versions", "current", "routes", "stages", "enabled"],
        rows,
        empty="No models yet: register one with bastion models register NAME FILE.",
        whole=("model",),
    )


def _flat(data: Mapping[str, Any], nested: str) -> list[tuple[str, Any]]:
    """The top-level fields, with the fields of ``data[nested]`` in place of it."""
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        if key == nested and isinstance(value, Mapping):
            rows.extend(value.items())
        else:
            rows.append((key, value))
    return rows


def show_gates(gates: list[dict[str, Any]]) -> None:
    output.show_table(
        ["gate", "passed", "detail"],
        [[g.get("gate"), g.get("passed"), g.get("detail")] for g in gates],
        empty="No gates: the model's policy asks for nothing (bastion models policy NAME FILE sets one).",
    )


def show_history(events: list[dict[str, Any]]) -> None:
    output.show_table(
        ["at", "action", "by", "detail"],
        [[e.get("at"), e.get("action"), e.get("by"), e.get("detail")] for e in events],
        empty="No history.",
        whole=("at", "by"),
    )


def show_evaluated(result: Mapping[str, Any]) -> None:
    if "evaluation" in result:
        output.emit(output.record(_flat(result["evaluation"] or {}, "report"), title="evaluation"))
        output.line("")
        show_gates(result.get("gates") or [])
    else:
        output.show_record(result)


# commands --------------------------------------------------------------------------------
@app.command("register")
def register(
    name: str,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    description: Annotated[str, typer.Option(metavar="TEXT")] = "",
    activate: bool | None = typer.Option(
        None, "--activate/--no-activate", help="serve it right away (default: yes unless the model has gates)"
    ),
    rows_independent: bool | None = typer.Option(
        None, "--rows-independent/--no-rows-independent", help="--no-rows-independent: an output depends on other rows"
    ),
    version: Annotated[int | None, typer.Option(help="name the version (refused if it exists)")] = None,
    metadata: Annotated[
        Path | None, typer.Option(help="JSON file: model_card, owner, lineage, postprocessing, signature, …")
    ] = None,
    signature: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, readable=True, help="file with the base64 Ed25519 signature of the sha256"
        ),
    ] = None,
    signer: Annotated[str | None, typer.Option(help="tenant whose public key verifies the signature")] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, readable=True, help="a text version's tokenizers JSON"),
    ] = None,
    text_config: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            readable=True,
            help='JSON file {"task": "embedding"|"generation", "config": {...}} (with --tokenizer)',
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the new version number")] = False,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Register FILE (ONNX) as the next version of model NAME; a text model (embeddings, chat)
    also takes --tokenizer and --text-config."""
    client = connect(control_url, admin_key, data_dir)
    meta = json_file(metadata) if metadata else None
    sig = signature.read_text().strip() if signature else None
    data = file.read_bytes()
    tok = tokenizer.read_bytes() if tokenizer else None
    text = json_file(text_config) if text_config else None
    result = call(
        lambda: client.register(
            name, data, description, activate, rows_independent, version, meta, sig, signer, tok, text
        )
    )
    if quiet:
        output.line(str(result["version"]))
    else:
        show(result, as_json, show_version)


@app.command("list")
def list_models(
    as_json: Json = False, control_url: ControlUrl = None, admin_key: AdminKey = None, data_dir: DataDir = None
) -> None:
    """List models: versions, the current one, routes, stages, and whether each is enabled."""
    client = connect(control_url, admin_key, data_dir)
    show(call(client.models), as_json, show_models)


@app.command("show")
def show_one(
    name: str,
    version: int,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Show one version: stage, metadata, verification, approval and evaluation report."""
    client = connect(control_url, admin_key, data_dir)
    show(call(lambda: client.version(name, version)), as_json, show_version)


@app.command("policy")
def policy(
    name: str,
    file: Annotated[Path | None, typer.Argument(help="JSON gate policy to set; omit to show the current one")] = None,
    live_accuracy_margin: Annotated[
        float | None,
        typer.Option(help="live-accuracy gate: the most a version's live accuracy may trail the primary's (0-1)"),
    ] = None,
    min_live_labels: Annotated[
        int | None, typer.Option(help="live-accuracy gate: graded feedback labels needed on each side (default 100)")
    ] = None,
    no_live_gate: Annotated[bool, typer.Option("--no-live-gate", help="remove the live-accuracy gate")] = False,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Show or set NAME's promotion gates (min_accuracy, max_demographic_parity_difference, require_approval,
    live_accuracy_margin…); the live-accuracy options change only that gate, keeping the others."""
    client = connect(control_url, admin_key, data_dir)
    live = {"live_accuracy_margin": live_accuracy_margin, "min_live_labels": min_live_labels}
    if file is None and not no_live_gate and all(v is None for v in live.values()):
        result = call(lambda: client.policy(name))
    else:
        base = json_file(file) if file is not None else call(lambda: client.policy(name))["policy"]
        wanted = {k: v for k, v in base.items() if v is not None}
        if no_live_gate:
            wanted = {k: v for k, v in wanted.items() if k not in live}
        wanted.update({k: v for k, v in live.items() if v is not None})
        result = call(lambda: client.set_policy(name, wanted))
    show(result, as_json, lambda r: output.emit(output.record(_flat(r, "policy"))))


@app.command("serving")
def serving(
    name: str,
    timeout_s: Annotated[float | None, typer.Option(help="default deadline of a sync call, seconds")] = None,
    max_queue_sync: Annotated[int | None, typer.Option(help="sync jobs waiting beyond which calls get 503")] = None,
    max_queue_batch: Annotated[
        int | None, typer.Option(help="async jobs waiting beyond which submissions get 503")
    ] = None,
    cache_ttl_s: Annotated[
        int | None, typer.Option(help="answer identical inputs from a per-tenant cache; 0: off")
    ] = None,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Show or set NAME's serving options (all at once: an option left out goes back to its default)."""
    client = connect(control_url, admin_key, data_dir)
    given: dict[str, Any] = {"timeout_s": timeout_s, "max_queue_sync": max_queue_sync}
    given["max_queue_batch"] = max_queue_batch
    if cache_ttl_s is not None:
        given["cache_ttl_s"] = cache_ttl_s
    options = {k: v for k, v in given.items() if v is not None}
    if options:
        result = call(lambda: client.set_serving(name, options))
    else:
        result = call(lambda: client.serving(name))
    show(result, as_json, lambda r: output.emit(output.record(_flat(r, "serving"))))


def _guard_rows(result: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """A guard policy as rows, the output checks as ``output.*``."""
    rows: list[tuple[str, Any]] = [("model", result.get("model"))]
    for key, value in (result.get("guards") or {}).items():
        if key == "output" and isinstance(value, Mapping):
            rows.extend((f"output.{k}", v) for k, v in value.items())
        elif key == "pii_kinds" and isinstance(value, list):
            rows.append((key, ", ".join(map(str, value))))
        else:
            rows.append((key, value))
    return rows


GuardMode = Annotated[str | None, typer.Option(metavar="off|flag|block")]
PiiMode = Annotated[str | None, typer.Option(metavar="off|flag|redact|block")]


@app.command("guards")
def guards(
    name: str,
    injection: GuardMode = None,
    injection_threshold: Annotated[
        float | None, typer.Option(help="classifier probability at which a prompt counts as an injection")
    ] = None,
    pii_in: PiiMode = None,
    pii_out: PiiMode = None,
    pii_kinds: Annotated[
        str | None, typer.Option(metavar="KINDS", help="comma-separated: email,phone,card,iban,ip,national_id")
    ] = None,
    canary: GuardMode = None,
    max_chars: Annotated[int | None, typer.Option(help="longest answer, characters")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="longest answer, tokens")] = None,
    blocked_term: Annotated[
        list[str] | None,
        typer.Option(
            "--blocked-term", metavar="TERM", help="a term answers may not contain (repeat; replaces the list)"
        ),
    ] = None,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Show or set NAME's guards: prompt-injection screen, PII in and out, canary, output checks.
    With no option it shows the policy; options change those guards and keep the others."""
    client = connect(control_url, admin_key, data_dir)
    top: dict[str, Any] = {
        "injection": injection,
        "injection_threshold": injection_threshold,
        "pii_in": pii_in,
        "pii_out": pii_out,
        "pii_kinds": [k.strip() for k in pii_kinds.split(",") if k.strip()] if pii_kinds is not None else None,
        "canary": canary,
    }
    out: dict[str, Any] = {"max_chars": max_chars, "max_tokens": max_tokens, "blocked_terms": blocked_term}
    changed = {k: v for k, v in top.items() if v is not None}
    changed_out = {k: v for k, v in out.items() if v is not None}
    if not changed and not changed_out:
        result = call(lambda: client.guards(name))
    else:

        def merge() -> Any:
            policy = dict(client.guards(name)["guards"])
            policy.update(changed)
            policy["output"] = {**(policy.get("output") or {}), **changed_out}
            return client.set_guards(name, policy)

        result = call(merge)
    show(result, as_json, lambda r: output.emit(output.record(_guard_rows(r))))


@app.command("holdout")
def holdout(
    name: str,
    file: Annotated[Path, typer.Argument(help="JSON: inputs, labels, optional protected")],
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Upload NAME's labelled holdout set (evaluations run on the newest one)."""
    client = connect(control_url, admin_key, data_dir)
    doc = json_file(file)
    result = call(lambda: client.set_holdout(name, doc))
    show(result, as_json, lambda r: output.emit(output.record(_flat(r, "holdout"))))


@app.command("evaluate")
def evaluate(
    name: str,
    version: int,
    wait: bool = typer.Option(True, help="wait for the worker's report"),
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Evaluate VERSION on the holdout set, on a worker, and print the report and the gates."""
    client = connect(control_url, admin_key, data_dir)

    def run() -> Any:
        started = client.evaluate(name, version)
        if not wait:
            return started
        return {"evaluation": client.wait_for_evaluation(name, version), "gates": client.gates(name, version)}

    show(call(run), as_json, show_evaluated)


@app.command("gates")
def gates(
    name: str,
    version: int,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Every gate of NAME's policy for VERSION, passed or not, and why (the live-accuracy gate names
    both versions' live accuracy, interval and graded labels)."""
    client = connect(control_url, admin_key, data_dir)
    show(call(lambda: client.gates(name, version)), as_json, show_gates)


@app.command("approve")
def approve(
    name: str,
    version: int,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Approve VERSION for production (a different admin key than the uploader's: four-eyes)."""
    client = connect(control_url, admin_key, data_dir)
    show(call(lambda: client.approve(name, version)), as_json, show_version)


@app.command("stage")
def stage(
    name: str,
    version: int,
    target: Annotated[str, typer.Argument(metavar="STAGE", help="staging, production (gates must pass) or retired")],
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Move VERSION to STAGE; entering production makes it the primary route."""
    client = connect(control_url, admin_key, data_dir)
    show(call(lambda: client.set_stage(name, version, target)), as_json, show_version)


@app.command("history")
def history(
    name: str,
    version: int,
    as_json: Json = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Who registered, evaluated, approved and moved VERSION."""
    client = connect(control_url, admin_key, data_dir)
    show(call(lambda: client.history(name, version)), as_json, show_history)


app.command("monitor")(monitoring.monitor)
