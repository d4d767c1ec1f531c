"""The ``bastion`` command: parse, build settings, call ``run()``.

Process commands (``up``, ``gateway``, ``worker``, ``control``) take one flag per setting,
each also readable from ``BASTION_<NAME>``; admin commands talk to the control plane's API.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from bastion.settings import Settings

app = typer.Typer(
    help="Bastion: serve ML models to untrusted clients, safely and at scale.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Register and list models.", no_args_is_help=True)
keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
deploy_app = typer.Typer(help="Route traffic between versions, roll back, and the kill switch.", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")


def _settings(overrides: dict[str, Any]) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        typer.echo(f"error: invalid settings: {problems}", err=True)
        raise typer.Exit(2) from exc


def _settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``func`` one ``--flag`` per settings field (also read from ``BASTION_<NAME>``).

    Typer reads a command's parameters from its signature, so the settings fields are
    appended to the signature of ``func``; their values arrive in ``**options``.
    """
    own = [p for p in inspect.signature(func).parameters.values() if p.kind is not p.VAR_KEYWORD]
    extra = []
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        is_bool = field.annotation is bool
        option = typer.Option(
            None,
            f"{flag}/--no-{flag[2:]}" if is_bool else flag,
            envvar=f"BASTION_{name.upper()}",
            show_envvar=True,
            help=field.description,
            show_default=False,
        )
        annotation = bool | None if is_bool else str | None
        extra.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        return func(**kwargs)

    wrapper.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
    return wrapper


@app.command("up")
@_settings_options
def up_command(**options: Any) -> None:
    """Start Bastion on this machine: embedded Redis, SQLite, control plane, gateways, workers."""
    from bastion.embedded import supervisor

    raise typer.Exit(supervisor.run(_settings(options)))


FdOption = Annotated[int | None, typer.Option(help="serve on this inherited listening socket")]


@app.command("gateway")
@_settings_options
def gateway_command(fd: FdOption = None, **options: Any) -> None:
    """Run one gateway process (public HTTP)."""
    from bastion.gateway import server

    server.serve(_settings(options), fd)


@app.command("worker")
@_settings_options
def worker_command(**options: Any) -> None:
    """Run one worker process (no listening socket but an optional metrics port)."""
    from bastion.worker import main as worker_main

    worker_main.run(_settings(options))


@app.command("control")
@_settings_options
def control_command(fd: FdOption = None, **options: Any) -> None:
    """Run the control plane (admin API on its own port)."""
    from bastion.control import server

    server.serve(_settings(options), fd)


# admin commands --------------------------------------------------------------------------
ControlUrl = Annotated[
    str | None, typer.Option(envvar="BASTION_CONTROL_URL", help="admin API URL (default: from control host and port)")
]
AdminKey = Annotated[
    str | None, typer.Option(envvar="BASTION_ADMIN_KEY", help="admin key (default: <data dir>/admin.key)")
]
DataDir = Annotated[Path | None, typer.Option(envvar="BASTION_DATA_DIR", help="data directory of bastion up")]


def _client(control_url: str | None, admin_key: str | None, data_dir: Path | None) -> Any:
    from bastion.adminclient import AdminClient
    from bastion.embedded.supervisor import client_host

    settings = _settings({"data_dir": data_dir})
    url = control_url or f"http://{client_host(settings.control_host)}:{settings.control_port}"
    key = admin_key or (settings.admin_key.get_secret_value() if settings.admin_key else None)
    if key is None:
        try:
            key = settings.admin_key_file.read_text().strip()
        except OSError as exc:
            typer.echo(
                "error: no admin key: set BASTION_ADMIN_KEY or run bastion up once "
                f"(it writes {settings.admin_key_file})",
                err=True,
            )
            raise typer.Exit(2) from exc
    return AdminClient(url, key)


def _run(call: Callable[[], Any]) -> None:
    from bastion.adminclient import AdminError

    try:
        result = call()
    except AdminError as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(result, indent=2))


@models_app.command("register")
def models_register(
    name: str,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    description: str = "",
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
    signature: Annotated[Path | None, typer.Option(help="file with the base64 Ed25519 signature of the sha256")] = None,
    signer: Annotated[str | None, typer.Option(help="tenant whose public key verifies the signature")] = None,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Register FILE (ONNX) as the next version of model NAME."""
    client = _client(control_url, admin_key, data_dir)
    meta = _json_file(metadata) if metadata else None
    sig = signature.read_text().strip() if signature else None
    data = file.read_bytes()
    _run(lambda: client.register(name, data, description, activate, rows_independent, version, meta, sig, signer))


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"{path} is not a readable JSON file") from exc


@models_app.command("show")
def models_show(
    name: str, version: int, control_url: ControlUrl = None, admin_key: AdminKey = None, data_dir: DataDir = None
) -> None:
    """Show one version: stage, metadata, verification, approval and evaluation report."""
    client = _client(control_url, admin_key, data_dir)
    _run(lambda: client.version(name, version))


@models_app.command("policy")
def models_policy(
    name: str,
    file: Annotated[Path | None, typer.Argument(help="JSON gate policy to set; omit to show the current one")] = None,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Show or set NAME's promotion gates (min_accuracy, max_demographic_parity_difference, require_approval…)."""
    client = _client(control_url, admin_key, data_dir)
    if file is None:
        _run(lambda: client.policy(name))
    else:
        policy = _json_file(file)
        _run(lambda: client.set_policy(name, policy))


@models_app.command("serving")
def models_serving(
    name: str,
    timeout_s: Annotated[float | None, typer.Option(help="default deadline of a sync call, seconds")] = None,
    max_queue_sync: Annotated[int | None, typer.Option(help="sync jobs waiting beyond which calls get 503")] = None,
    max_queue_batch: Annotated[
        int | None, typer.Option(help="async jobs waiting beyond which submissions get 503")
    ] = None,
    cache_ttl_s: Annotated[
        int | None, typer.Option(help="answer identical inputs from a per-tenant cache; 0: off")
    ] = None,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Show or set NAME's serving options (all at once: an option left out goes back to its default)."""
    client = _client(control_url, admin_key, data_dir)
    given = {"timeout_s": timeout_s, "max_queue_sync": max_queue_sync, "max_queue_batch": max_queue_batch}
    if cache_ttl_s is not None:
        given["cache_ttl_s"] = cache_ttl_s
    options = {k: v for k, v in given.items() if v is not None}
    if not options:
        _run(lambda: client.serving(name))
    else:
        _run(lambda: client.set_serving(name, options))


@models_app.command("holdout")
def models_holdout(
    name: str,
    file: Annotated[Path, typer.Argument(help="JSON: inputs, labels, optional protected")],
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Upload NAME's labelled holdout set (evaluations run on the newest one)."""
    client = _client(control_url, admin_key, data_dir)
    doc = _json_file(file)
    _run(lambda: client.set_holdout(name, doc))


@models_app.command("evaluate")
def models_evaluate(
    name: str,
    version: int,
    wait: bool = typer.Option(True, help="wait for the worker's report"),
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Evaluate VERSION on the holdout set, on a worker, and print the report and the gates."""
    client = _client(control_url, admin_key, data_dir)

    def call() -> Any:
        started = client.evaluate(name, version)
        if not wait:
            return started
        return {"evaluation": client.wait_for_evaluation(name, version), "gates": client.gates(name, version)}

    _run(call)


@models_app.command("gates")
def models_gates(
    name: str, version: int, control_url: ControlUrl = None, admin_key: AdminKey = None, data_dir: DataDir = None
) -> None:
    """Every gate of NAME's policy for VERSION, passed or not, and why."""
    client = _client(control_url, admin_key, data_dir)
    _run(lambda: client.gates(name, version))


@models_app.command("approve")
def models_approve(
    name: str, version: int, control_url: ControlUrl = None, admin_key: AdminKey = None, data_dir: DataDir = None
) -> None:
    """Approve VERSION for production (a different admin key than the uploader's: four-eyes)."""
    client = _client(control_url, admin_key, data_dir)
    _run(lambda: client.approve(name, version))


@models_app.command("stage")
def models_stage(
    name: str,
    version: int,
    stage: Annotated[str, typer.Argument(help="staging, production (gates must pass) or retired")],
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Move VERSION to STAGE; entering production makes it the primary route."""
    client = _client(control_url, admin_key, data_dir)
    _run(lambda: client.set_stage(name, version, stage))


@models_app.command("history")
def models_history(
    name: str, version: int, control_url: ControlUrl = None, admin_key: AdminKey = None, data_dir: DataDir = None
) -> None:
    """Who registered, evaluated, approved and moved VERSION."""
    client = _client(control_url, admin_key, data_dir)
    _run(lambda: client.history(name, version))


@models_app.command("list")
def models_list(control_url: ControlUrl = None, admin_key: AdminKey = None, data_dir: DataDir = None) -> None:
    """List models and their versions."""
    client = _client(control_url, admin_key, data_dir)
    _run(client.models)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="tenant the key belongs to (created if new)")],
    name: str = "",
    scope: Annotated[
        list[str] | None, typer.Option(help="scope (repeatable); default predict, jobs, models:read")
    ] = None,
    tier: Annotated[str | None, typer.Option(help="rate tier (BASTION_RATE_TIERS); default: default_tier")] = None,
    subject_trusted: Annotated[
        bool, typer.Option(help="the key may name the subject of a request (X-Bastion-Subject): trusted back ends")
    ] = False,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Create an API key; it is printed once and stored only as a hash. Its scopes must be ones
    the calling key holds."""
    client = _client(control_url, admin_key, data_dir)
    _run(lambda: client.create_key(tenant, name, scope, tier, subject_trusted))


@keys_app.command("list")
def keys_list(
    tenant: str | None = None, control_url: ControlUrl = None, admin_key: AdminKey = None, data_dir: DataDir = None
) -> None:
    """List keys (never their secrets)."""
    client = _client(control_url, admin_key, data_dir)
    _run(lambda: client.keys(tenant))


@keys_app.command("rotate")
def keys_rotate(
    key_id: str,
    overlap: Annotated[int, typer.Option(help="seconds the old secret keeps working")] = 3600,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Issue a new secret for KEY_ID (same tenant, scopes, tier); the old one expires after --overlap."""
    client = _client(control_url, admin_key, data_dir)
    _run(lambda: client.rotate_key(key_id, overlap))


@keys_app.command("revoke")
def keys_revoke(
    key_id: str, control_url: ControlUrl = None, admin_key: AdminKey = None, data_dir: DataDir = None
) -> None:
    """Revoke key KEY_ID; gateways refuse it once they see the new snapshot (well under a second)."""
    client = _client(control_url, admin_key, data_dir)
    _run(lambda: client.revoke_key(key_id))


def _route(text: str) -> dict[str, Any]:
    """``VERSION[:WEIGHT[:ROLE]]``, e.g. ``2:10:canary``."""
    parts = text.split(":")
    try:
        route: dict[str, Any] = {"version": int(parts[0])}
        if len(parts) > 1:
            route["weight"] = int(parts[1])
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not VERSION[:WEIGHT[:ROLE]]") from exc
    if len(parts) > 2:
        route["role"] = parts[2]
    return route


@deploy_app.command("set")
def deploy_set(
    name: str,
    route: Annotated[list[str], typer.Option(help="VERSION[:WEIGHT[:ROLE]] (repeatable), e.g. 1:90 2:10:canary")],
    fallback: Annotated[int | None, typer.Option(help="version that answers while the model is disabled")] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            help="policy rule (repeatable): JURISDICTION=V1,V2, tenant:NAME=V1 or without-consent:FLAG=V1; "
            "matching callers reach only these versions"
        ),
    ] = None,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Route NAME's traffic: one primary route, optional weighted canaries (sticky per subject), policy rules."""
    client = _client(control_url, admin_key, data_dir)
    routes = [_route(r) for r in route]
    rules = [_rule(a) for a in allow or []]
    _run(lambda: client.deploy(name, routes, fallback, rules))


def _rule(text: str) -> dict[str, Any]:
    """``EU=1,2`` (jurisdiction), ``tenant:acme=2`` or ``without-consent:profiling=1``."""
    when, sep, versions = text.partition("=")
    kind, colon, value = when.partition(":")
    key = {"tenant": "tenant", "without-consent": "without_consent"}.get(kind) if colon else "jurisdiction"
    value = value if colon else when
    try:
        allowed = [int(v) for v in versions.split(",") if v]
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not [KIND:]VALUE=V1,V2") from exc
    if not sep or not value or key is None:
        raise typer.BadParameter(f"{text!r} is not JURISDICTION=V1,V2, tenant:NAME=V1 or without-consent:FLAG=V1")
    return {key: value, "allow": allowed}


tenants_app = typer.Typer(help="Tenant attributes (jurisdiction, consent flags, signing key).", no_args_is_help=True)
app.add_typer(tenants_app, name="tenants")


@tenants_app.command("set")
def tenants_set(
    name: str,
    jurisdiction: Annotated[str | None, typer.Option(help="e.g. EU; matched by deployment policy rules")] = None,
    signing_key: Annotated[
        Path | None, typer.Option(help="file with the tenant's Ed25519 public key (PEM or base64)")
    ] = None,
    consent: Annotated[list[str] | None, typer.Option(help="consent flag the tenant holds (repeatable)")] = None,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Create or update tenant NAME."""
    client = _client(control_url, admin_key, data_dir)
    key = signing_key.read_text() if signing_key else None
    _run(lambda: client.set_tenant(name, jurisdiction, key, consent))


@deploy_app.command("show")
def deploy_show(
    name: str, control_url: ControlUrl = None, admin_key: AdminKey = None, data_dir: DataDir = None
) -> None:
    """Show NAME's routes, fallback and kill-switch state."""
    client = _client(control_url, admin_key, data_dir)
    _run(lambda: client.deployment(name))


@deploy_app.command("rollback")
def deploy_rollback(
    name: str, control_url: ControlUrl = None, admin_key: AdminKey = None, data_dir: DataDir = None
) -> None:
    """All of NAME's traffic back to its production version (or the one before it)."""
    client = _client(control_url, admin_key, data_dir)
    _run(lambda: client.rollback(name))


@deploy_app.command("disable")
def deploy_disable(
    name: str, control_url: ControlUrl = None, admin_key: AdminKey = None, data_dir: DataDir = None
) -> None:
    """Kill switch: NAME answers 503 (or its fallback version) on every gateway within a second."""
    client = _client(control_url, admin_key, data_dir)
    _run(lambda: client.set_enabled(name, False))


@deploy_app.command("enable")
def deploy_enable(
    name: str, control_url: ControlUrl = None, admin_key: AdminKey = None, data_dir: DataDir = None
) -> None:
    """Serve NAME again after ``deploy disable``."""
    client = _client(control_url, admin_key, data_dir)
    _run(lambda: client.set_enabled(name, True))


jobs_app = typer.Typer(help="Dead-lettered jobs: list and replay.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("dead-letters")
def jobs_dead_letters(
    name: str,
    count: int = 100,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """List NAME's newest dead-lettered jobs (never their inputs)."""
    client = _client(control_url, admin_key, data_dir)
    _run(lambda: client.dead_letters(name, count))


@jobs_app.command("replay")
def jobs_replay(
    name: str,
    entry: Annotated[list[str] | None, typer.Option("--id", help="dead-letter id (repeatable); default: all")] = None,
    control_url: ControlUrl = None,
    admin_key: AdminKey = None,
    data_dir: DataDir = None,
) -> None:
    """Queue NAME's dead-lettered async jobs again."""
    client = _client(control_url, admin_key, data_dir)
    _run(lambda: client.replay(name, entry))


def main() -> None:
    app(prog_name="bastion")
