"""Control-plane operations on the registry: tenants, keys, models, versions, snapshots."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import case, select, update
from sqlalchemy.exc import IntegrityError as SqlIntegrityError
from sqlalchemy.orm import Session, sessionmaker

from bastion.artifacts import onnx_check
from bastion.artifacts.store import ArtifactStore, sha256_hex
from bastion.artifacts.text_check import TokenizerReport, inspect_text, inspect_tokenizer
from bastion.constants import SCOPES
from bastion.errors import Conflict, InvalidArtifact, InvalidInput, NotFound, PayloadTooLarge
from bastion.registry import db, serving
from bastion.registry import text as text_versions
from bastion.registry import upstream as upstream_versions
from bastion.registry.deployments import Deployments
from bastion.registry.guards import Guards
from bastion.registry.lifecycle import Lifecycle, policy_of, record, with_iso_times
from bastion.registry.limits import Budget, TenantLimits
from bastion.registry.limits import resolve as resolve_limits
from bastion.registry.metadata import (
    GatePolicy,
    VersionMetadata,
    check_postprocessing,
    check_size,
    parse,
    refine,
)
from bastion.registry.names import check_name
from bastion.registry.tables import ApiKey, Deployment, DeploymentEvent, Model, ModelVersion, SnapshotSerial, Tenant
from bastion.registry.trail import Trail
from bastion.security import apikeys, signing
from bastion.signature import Signature, to_tensor
from bastion.timefmt import iso_utc, to_millisecond

_MAX_REFERENCE_ROWS = 10_000
_EVENT_PAGE = 50
MAX_RETENTION_S = 10 * 365 * 86400  # ten years

ROUTED_GRACE_S = 3600.0  # a version routed away stays in the snapshot this long: its queued jobs still run

Check = Callable[[bytes, int], Signature]  # artifact bytes, size limit -> signature (or InvalidArtifact)


class Registry:
    def __init__(
        self,
        sessions: db.Sessions | sessionmaker[Session],
        store: ArtifactStore,
        max_upload_bytes: int,
        tiers: dict[str, Budget] | None = None,
        default_tier: str = "",
        *,
        check: Check = onnx_check.inspect,
        text_check: text_versions.TextCheck = inspect_text,
        tokenizer_check: text_versions.TokenizerCheck | None = None,
        max_metadata_bytes: int = 64 << 10,
        max_tokenizer_bytes: int = 64 << 20,
        routed_grace_s: float = ROUTED_GRACE_S,
    ) -> None:
        """``check`` inspects an upload: in process by default; the control plane passes
        ``bastion.artifacts.sandbox.SandboxedCheck`` (a child process with resource limits), and
        its ``text`` method as ``text_check`` (the graph and a text version's tokenizer) and its
        ``tokenizer`` method as ``tokenizer_check`` (a tokenizer alone: an upstream version's)."""
        self.sessions = db.Sessions.of(sessions)
        self.check = check
        self.text_check = text_check
        self.tokenizer_check = tokenizer_check or _tokenizer_in_process
        self.max_tokenizer_bytes = max_tokenizer_bytes
        self.max_metadata_bytes = max_metadata_bytes
        self.routed_grace_s = routed_grace_s
        self.tiers = tiers or {}
        self.default_tier = default_tier if default_tier in self.tiers else ""
        self.store = store
        self.max_upload_bytes = max_upload_bytes
        self.deployments = Deployments(self.sessions)
        self.lifecycle = Lifecycle(self.sessions, store, self.deployments)
        self.serving = serving.Serving(self.sessions)
        self.guards = Guards(self.sessions)
        self.trail = Trail(self.sessions)

    # tenants and keys -------------------------------------------------------------------
    def ensure_tenant(self, name: str) -> Tenant:
        check_name("tenant", name)
        with self.sessions.begin() as s:
            tenant = s.scalar(select(Tenant).where(Tenant.name == name))
            if tenant is None:
                tenant = Tenant(id=secrets.token_hex(8), name=name)
                s.add(tenant)
            return tenant

    def set_tenant(
        self,
        name: str,
        jurisdiction: str | None,
        signing_key: str | None = None,
        consents: list[str] | None = None,
        limits: dict[str, Any] | None = None,
        retain_payloads_s: int | None = None,
    ) -> dict[str, Any]:
        """Set a tenant's attributes (created if new): the jurisdiction and consent flags drive
        policy rules, the Ed25519 public key verifies the artifacts this tenant signs, the
        retention says how long the decision log keeps its inputs and outputs (encrypted; 0: not
        kept). Unset ``signing_key``, ``consents``, ``limits`` and ``retain_payloads_s`` keep their values."""
        if retain_payloads_s is not None and not 0 <= retain_payloads_s <= MAX_RETENTION_S:
            raise InvalidInput(f"the payload retention must be between 0 and {MAX_RETENTION_S} seconds")
        if jurisdiction is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,16}", jurisdiction):
            raise InvalidInput("jurisdiction must be 1 to 16 letters, digits, '-' or '_'")
        if consents is not None and not all(re.fullmatch(r"[a-z0-9_.-]{1,32}", c) for c in consents):
            raise InvalidInput("consent flags are 1 to 32 of a-z, 0-9, '_', '.', '-'")
        key = signing.normalise_public_key(signing_key) if signing_key else None
        budget = parse(TenantLimits, limits, "the tenant limits") if limits is not None else None
        ensured = self.ensure_tenant(name)
        with self.sessions.begin() as s:
            tenant = s.get(Tenant, ensured.id)
            if tenant is None:
                raise NotFound(f"no tenant {name!r}")
            tenant.jurisdiction = jurisdiction
            if key is not None:
                tenant.signing_key = key
            if consents is not None:
                tenant.consents = sorted(set(consents))
            if budget is not None:
                tenant.limits = budget.model_dump(exclude_none=True)
            if retain_payloads_s is not None:
                tenant.retain_payloads_s = retain_payloads_s or None
            return _tenant_view(tenant)

    def list_tenants(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            return [_tenant_view(t) for t in s.scalars(select(Tenant).order_by(Tenant.name))]

    def create_key(
        self,
        tenant: str,
        name: str,
        scopes: list[str],
        expires_at: datetime | None = None,
        tier: str | None = None,
        subject_trusted: bool = False,
    ) -> tuple[ApiKey, str]:
        """A new key; ``subject_trusted`` lets its holder name the subject a request is for
        (``X-Bastion-Subject``, which picks the sticky canary), for trusted back ends only."""
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise InvalidInput(f"unknown or missing scopes {unknown}; allowed: {list(SCOPES)}")
        if tier is not None and tier not in self.tiers:
            raise InvalidInput(f"unknown rate tier {tier!r}; configured: {sorted(self.tiers)}")
        if expires_at is not None:
            expires_at = to_millisecond(expires_at)  # what the API shows is what holds
            if expires_at <= datetime.now(UTC):
                raise InvalidInput("expires_at is in the past")
        owner = self.ensure_tenant(tenant)
        new = apikeys.generate()
        row = ApiKey(
            id=new.key_id,
            tenant_id=owner.id,
            name=name[:128],
            digest=new.digest,
            scopes=sorted(set(scopes)),
            expires_at=expires_at,
            tier=tier or self.default_tier or None,
            subject_trusted=subject_trusted,
        )
        with self.sessions.begin() as s:
            s.add(row)
        return row, new.plaintext

    def get_key(self, key_id: str) -> dict[str, Any]:
        """One key's view (never its secret), revoked or not."""
        with self.sessions() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise NotFound(f"no key {key_id!r}")
            tenant = s.get(Tenant, row.tenant_id)
            return _key_view(row, tenant.name if tenant else "")

    def list_keys(self, tenant: str | None = None) -> list[dict[str, Any]]:
        with self.sessions() as s:
            query = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(ApiKey.created_at)
            if tenant:
                query = query.where(Tenant.name == tenant)
            return [_key_view(k, t) for k, t in s.execute(query).all()]

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        with self.sessions.begin() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise NotFound(f"no key {key_id!r}")
            if row.revoked_at is None:
                row.revoked_at = datetime.now(UTC)
            tenant = s.get(Tenant, row.tenant_id)
            return _key_view(row, tenant.name if tenant else "")

    def rotate_key(self, key_id: str, overlap_s: int) -> tuple[dict[str, Any], str]:
        """A new secret for the same tenant, scopes and tier; the old one keeps working for
        ``overlap_s`` seconds (0: not at all), so clients can switch without an outage."""
        with self.sessions.begin() as s:
            old = s.get(ApiKey, key_id)
            if old is None or old.revoked_at is not None or _expired(old.expires_at):
                raise NotFound(f"no live key {key_id!r}")
            new = apikeys.generate()
            row = ApiKey(
                id=new.key_id,
                tenant_id=old.tenant_id,
                name=old.name,
                digest=new.digest,
                scopes=list(old.scopes),
                expires_at=old.expires_at,
                tier=old.tier,
                subject_trusted=old.subject_trusted,
            )
            ends = to_millisecond(datetime.now(UTC) + timedelta(seconds=overlap_s))
            old.expires_at = min(_aware(old.expires_at), ends) if old.expires_at else ends
            s.add(row)
            s.flush()
            tenant = s.get(Tenant, old.tenant_id)
            name = tenant.name if tenant else ""
            return {"key": _key_view(row, name), "rotated": _key_view(old, name)}, new.plaintext

    def key_by_secret(self, plaintext: str) -> dict[str, Any] | None:
        """The live key (not revoked, not expired) with this secret, or None."""
        digest = apikeys.digest(plaintext)
        with self.sessions() as s:
            row = s.scalar(select(ApiKey).where(ApiKey.digest == digest))
            if row is None or row.revoked_at is not None or _expired(row.expires_at):
                return None
            tenant = s.get(Tenant, row.tenant_id)
            return _key_view(row, tenant.name if tenant else "")

    # models and versions ----------------------------------------------------------------
    def register_version(self, model: str, data: bytes, *, route: bool = True, **upload: Any) -> dict[str, Any]:
        """Check, store and record a new version: ``prepare_version`` (the slow part: checks and
        storing the artifact; ``upload`` is its keyword arguments) and then ``add_version``
        (recording it). An activated version becomes the 100 % primary, unless ``route=False``
        leaves it for the caller to route (after warm-up)."""
        view = self.add_version(self.prepare_version(model, data, **upload))
        if view["stage"] == "production" and route:
            self.deployments.promote(model, view["version"], upload.get("created_by") or "registry")
        return view

    def prepare_version(
        self,
        model: str,
        data: bytes,
        *,
        metadata: dict[str, Any] | None = None,
        description: str = "",
        created_by: str = "",
        activate: bool | None = None,
        rows_independent: bool | None = None,
        version: int | None = None,
        artifact_signature: str | None = None,
        signer: str | None = None,
        tokenizer: bytes | None = None,
    ) -> PreparedVersion:
        """Check an upload and keep its artifact (content-addressed: harmless if the version is
        never recorded); nothing is recorded yet. Slow for a large model, so the control plane
        does it before its unit of work, not inside it.

        ``metadata`` is a ``VersionMetadata`` document (model card, lineage, refined signature…).
        ``version`` names the version (409 if it exists: versions are immutable); unset, the next
        number is taken. ``artifact_signature`` (base64 Ed25519 over the sha256) is verified
        against tenant ``signer``'s public key; a valid one marks the version ``verified``.
        ``activate`` makes the version production; unset, it does so unless the model has
        promotion gates (then the version waits in ``registered``). ``rows_independent=False``
        (an output depends on other rows) keeps workers from batching this version.

        A text version sends ``tokenizer`` (a Hugging Face tokenizers JSON) and the metadata's
        ``text`` section (task and config) together; its stored signature is the queue's
        (``bastion.registry.text``), and its tokenizer is kept in the artifact store."""
        check_name("model", model)
        if version is not None and version < 1:
            raise InvalidInput("version must be a positive integer")
        meta = parse(VersionMetadata, metadata, "the version metadata")
        if description:
            meta = meta.model_copy(update={"description": description[:4000]})
        if rows_independent is not None:
            meta = meta.model_copy(update={"rows_independent": rows_independent})
        check_size(meta.model_dump(exclude={"reference_sample"}), self.max_metadata_bytes, "the version metadata")
        policy = self._policy(model)
        if activate and policy.gated:
            raise Conflict(
                f"model {model!r} has promotion gates: register without activating, then evaluate, approve "
                "and promote the version"
            )
        limit = min(self.max_upload_bytes, policy.max_artifact_bytes or self.max_upload_bytes)
        if meta.text is None and tokenizer is None:
            signature = self.check(data, limit)
            text = None
        else:
            signature, text = self._check_text(meta, data, limit, tokenizer)
            meta = meta.model_copy(update={"rows_independent": signature.rows_independent})
        signature = refine(replace(signature, rows_independent=meta.rows_independent), meta.signature)
        check_size({"signature": signature.to_dict()}, self.max_metadata_bytes, "the version's signature")
        check_postprocessing(signature, meta.postprocessing)
        digest = sha256_hex(data)
        signed_by = self._verify(digest, artifact_signature, signer) if artifact_signature else None
        if policy.require_verified and signed_by is None:
            raise InvalidArtifact(
                f"model {model!r} accepts only signed versions: send an Ed25519 signature over the artifact's "
                "sha256 from a tenant with a signing key"
            )
        stored_meta = meta.model_dump(exclude={"reference_sample", "text"}, exclude_defaults=True)
        if text is not None and tokenizer is not None:
            stored_meta["text"] = text_versions.stored_text(text[0], self.store.put(tokenizer), len(tokenizer), text[1])
        if meta.reference_sample is not None:
            stored_meta["reference"] = self._store_reference(signature, meta.reference_sample)
        self.store.put(data)
        row = _NewVersion(digest, len(data), signature.to_dict(), stored_meta, created_by, signed_by)
        return PreparedVersion(model, row, version, activate)

    def _check_text(
        self, meta: VersionMetadata, data: bytes, limit: int, tokenizer: bytes | None
    ) -> tuple[Signature, tuple[str, text_versions.TextConfig]]:
        """A text version's checks: the config, the tokenizer (with the graph, in the check's
        child) and the tokens the config names, the graph against the task; the queue signature."""
        if meta.text is None:
            raise InvalidInput("a tokenizer comes with a 'text' section in the metadata (task and config)")
        if tokenizer is None:
            raise InvalidInput("a text version needs its tokenizer: send the tokenizer JSON as the 'tokenizer' file")
        if meta.text.tokenizer is not None or meta.text.tokenizer_bytes is not None:
            raise InvalidInput("the text section's tokenizer and tokenizer_bytes are set by the registry")
        if len(tokenizer) > self.max_tokenizer_bytes:
            raise PayloadTooLarge(
                f"the tokenizer is {len(tokenizer)} bytes; the limit is {self.max_tokenizer_bytes} "
                "(max_tokenizer_bytes)"
            )
        config = text_versions.parse_config(meta.text.task, meta.text.config)
        if upstream_versions.is_descriptor(data) or upstream_versions.is_upstream(config):
            config = upstream_versions.check_upstream(config, data)  # the artifact is its descriptor
            report = self.tokenizer_check(tokenizer, self.max_tokenizer_bytes, text_versions.named_tokens(config))
            text_versions.check_tokens(report)
            return upstream_versions.queue_signature(config), (meta.text.task, config)
        graph, report = self.text_check(
            data, limit, tokenizer, self.max_tokenizer_bytes, text_versions.named_tokens(config)
        )
        text_versions.check_tokens(report)
        text_versions.check_graph(graph, config)
        return text_versions.queue_signature(graph, config), (meta.text.task, config)

    def add_version(self, prepared: PreparedVersion) -> dict[str, Any]:
        """Record a prepared version, judged against the model's policy as it is now (it may have
        changed since the upload was checked)."""
        model, new = prepared.model, prepared.new
        policy = self._policy(model)
        if prepared.activate and policy.gated:
            raise Conflict(f"model {model!r} has promotion gates now: register without activating")
        if policy.require_verified and new.signed_by is None:
            raise InvalidArtifact(f"model {model!r} accepts only signed versions now")
        if policy.max_artifact_bytes and new.size_bytes > policy.max_artifact_bytes:
            raise PayloadTooLarge(
                f"the artifact is {new.size_bytes} bytes; model {model!r} takes at most {policy.max_artifact_bytes}"
            )
        activate = prepared.activate is not False and not policy.gated
        return self._insert_version(model, new, prepared.number, activate=activate)

    def _policy(self, model: str) -> GatePolicy:
        with self.sessions() as s:
            return policy_of(s.scalar(select(Model).where(Model.name == model)))

    def _verify(self, digest: str, artifact_signature: str, signer: str | None) -> str:
        if not signer:
            raise InvalidInput("a signed upload names its signer (the tenant whose public key verifies it)")
        with self.sessions() as s:
            tenant = s.scalar(select(Tenant).where(Tenant.name == signer))
            if tenant is None or not tenant.signing_key:
                raise InvalidInput(f"tenant {signer!r} has no signing key")
            key = tenant.signing_key
        signing.verify(key, artifact_signature, digest)
        return signer

    def _store_reference(self, signature: Signature, sample: dict[str, list[Any]]) -> dict[str, Any]:
        """Check the reference sample against the signature and keep it in the store (drift baseline)."""
        rows = 0
        for spec in signature.inputs:
            if spec.name not in sample:
                raise InvalidInput(f"the reference sample lacks input {spec.name!r}")
            rows = int(to_tensor(spec, sample[spec.name], max_rows=_MAX_REFERENCE_ROWS).shape[0])
        extra = sorted(set(sample) - {s.name for s in signature.inputs})
        if extra:
            raise InvalidInput(f"the reference sample has unknown inputs {extra}")
        return {"sha256": self.store.put(orjson.dumps(sample)), "rows": rows}

    def _insert_version(self, model: str, new: _NewVersion, number: int | None, activate: bool) -> dict[str, Any]:
        for _attempt in range(3):
            try:
                with self.sessions.begin() as s:
                    row = s.scalar(select(Model).where(Model.name == model))
                    if row is None:
                        row = Model(name=model, description=str(new.meta.get("description", "")))
                        s.add(row)
                        s.flush()
                    last = s.scalar(
                        select(ModelVersion.version)
                        .where(ModelVersion.model_id == row.id)
                        .order_by(ModelVersion.version.desc())
                        .limit(1)
                    )
                    version = ModelVersion(
                        model_id=row.id,
                        version=number if number is not None else (last or 0) + 1,
                        sha256=new.sha256,
                        size_bytes=new.size_bytes,
                        signature=new.signature,
                        meta=new.meta,
                        verified=new.signed_by is not None,
                        signed_by=new.signed_by,
                        created_by=new.created_by[:64],
                        stage="production" if activate else "registered",
                    )
                    s.add(version)
                    s.flush()
                    record(s, row, version.version, "registered", new.created_by, sha256=new.sha256)
                    if activate:
                        record(
                            s, row, version.version, "stage", new.created_by, source="registered", target="production"
                        )
                    return _version_view(row, version)
            except SqlIntegrityError as exc:
                if number is not None:
                    raise Conflict(
                        f"version {number} of model {model!r} is already registered; versions are immutable"
                    ) from exc
                if self.sessions.in_unit:  # the unit's transaction is spent; its caller may retry
                    raise Conflict(f"a concurrent upload took this version of model {model!r}; retry") from exc
                continue  # a concurrent upload took the same version number; take the next one
        raise Conflict(f"could not allocate a version number for model {model!r}; retry")

    def list_models(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            return _models(s)

    def get_model(self, name: str) -> dict[str, Any]:
        with self.sessions() as s:
            model = s.scalar(select(Model).where(Model.name == name))
            if model is None:
                raise NotFound(f"no model {name!r}")
            return _model_view(s, model)

    def get_version(self, name: str, version: int) -> dict[str, Any]:
        with self.sessions() as s:
            model = s.scalar(select(Model).where(Model.name == name))
            if model is None:
                raise NotFound(f"no model {name!r}")
            row = s.scalar(
                select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == version)
            )
            if row is None:
                raise NotFound(f"model {name!r} has no version {version}")
            return _version_view(model, row)

    @contextmanager
    def unit(self) -> Iterator[Session]:
        """A unit of work: one transaction for every registry call made in the block
        (``Sessions.unit``), which first takes the snapshot serial's row lock. Units therefore
        run one at a time, from their first read to their commit: a unit's reads are never
        stale, so read-then-write steps (creating a tenant that is not there yet) cannot race,
        and the snapshot a unit reads includes every unit committed before it."""
        with self.sessions.unit() as s:
            _lock_serial(s)
            yield s

    def latest_serial(self) -> int:
        """The last snapshot serial SQL issued (0: none yet)."""
        with self.sessions() as s:
            return int(s.scalar(select(SnapshotSerial.serial).where(SnapshotSerial.id == 1)) or 0)

    def snapshot(self, preload: dict[str, list[int]] | None = None) -> dict[str, Any]:
        """What gateways and workers need, without SQL: keys by digest, models, signatures, and
        the ``serial`` SQL issued for this read. Only versions that take traffic are in it: those
        routed now (any role, and the fallback), those routed in the last ``routed_grace_s`` (their
        queued jobs still run), those named in ``preload`` and those being evaluated; a registered
        version nothing routes to costs readers nothing.

        The serial is taken first, in the transaction that then reads the state: bumping the one
        ``snapshot_serial`` row takes its write lock until the commit, so snapshot reads are
        serialised and a higher serial always means a later read (of at least as new a state).
        Publishers keep only the highest serial (``bastion.snapshot.publish``). Inside a unit of
        work (``Sessions.unit``) the read sees the unit's own changes.

        ``preload`` names versions per model that workers should load and warm up now, before a
        deployment sends them traffic."""
        now = datetime.now(UTC)
        with self.sessions.begin() as s:
            serial = _next_serial(s)
            tenants = {t.id: t for t in s.scalars(select(Tenant))}
            keys = {}
            for key in s.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None))):
                if _expired(key.expires_at, now) or "admin" in key.scopes:
                    continue  # admin keys are for the control plane only; gateways never see them
                owner = tenants.get(key.tenant_id)
                keys[key.digest] = {
                    "id": key.id,
                    "tenant": owner.name if owner else "",
                    "jurisdiction": owner.jurisdiction if owner else None,
                    "consents": (owner.consents or []) if owner else [],
                    "retain_payloads": bool(owner.retain_payloads_s) if owner else False,
                    "limits": resolve_limits(owner.limits if owner else None, self.tiers.get(key.tier or "")),
                    "scopes": key.scopes,
                    "expires_at": _aware(key.expires_at).timestamp() if key.expires_at else None,
                    "subject_trusted": bool(key.subject_trusted),
                }
            listed = _models(s)
            ids: dict[str, int] = {name: id_ for name, id_ in s.execute(select(Model.name, Model.id)).all()}
            recent = {name: _recently_routed(s, ids[name], now, self.routed_grace_s) for name in ids}
        models = {}
        for model in listed:
            dep = model["deployment"]
            wanted = recent[model["name"]] | set((preload or {}).get(model["name"], []))
            models[model["name"]] = {
                "current": model["current_version"],
                "routes": dep["routes"],
                "rules": dep["rules"],
                "fallback": dep["fallback_version"],
                "disabled": dep["disabled"],
                "preload": (preload or {}).get(model["name"], []),
                "serving": model["serving"],
                "guards": model["guards"],
                "versions": {
                    str(v["version"]): _snapshot_version(v)
                    for v in model["versions"]
                    if v["stage"] != "retired" and (v["version"] in wanted or _evaluating(v))
                },
            }
        default_tier = self.tiers.get(self.default_tier)
        callers = {
            t.name: {
                "jurisdiction": t.jurisdiction,
                "consents": t.consents or [],
                "retain_payloads": bool(t.retain_payloads_s),
                "limits": resolve_limits(t.limits, default_tier),
            }
            for t in tenants.values()
        }
        return {"serial": serial, "keys": keys, "models": models, "tenants": callers}


def _tokenizer_in_process(data: bytes, max_bytes: int, tokens: list[str]) -> TokenizerReport:
    """The in-process tokenizer check (``SandboxedCheck.tokenizer`` runs the same in a child)."""
    return inspect_tokenizer(data, tokens, max_bytes=max_bytes)


def _lock_serial(s: Session) -> None:
    """Take the snapshot serial row's write lock (a write that changes nothing) until the commit."""
    s.execute(
        update(SnapshotSerial)
        .where(SnapshotSerial.id == 1)
        .values(serial=SnapshotSerial.serial)
        .execution_options(synchronize_session=False)
    )


def _next_serial(s: Session) -> int:
    """Bump and return the snapshot serial: ``max(previous + 1, now in ns)``. Monotonic because
    SQL issues it under the row's lock; the clock floor keeps it above the serials of older
    releases (which stamped ``time.time_ns()``) and above those of a database restored from a
    backup."""
    now = time.time_ns()
    bumped = SnapshotSerial.serial + 1
    done = s.execute(
        update(SnapshotSerial)
        .where(SnapshotSerial.id == 1)
        .values(serial=case((bumped > now, bumped), else_=now))
        .execution_options(synchronize_session=False)
    )
    if not getattr(done, "rowcount", 0):
        s.add(SnapshotSerial(id=1, serial=now))
        s.flush()
        return now
    return int(s.scalar(select(SnapshotSerial.serial).where(SnapshotSerial.id == 1)) or now)


def _models(s: Session) -> list[dict[str, Any]]:
    return [_model_view(s, model) for model in s.scalars(select(Model).order_by(Model.name))]


def _recently_routed(s: Session, model_id: int, now: datetime, grace_s: float) -> set[int]:
    """The versions routed now or at any time in the last ``grace_s`` (primary, canary, shadow,
    fallback): the current deployment, every deployment event inside the window, and the last
    one before it (the state the window began with)."""
    found: set[int] = set()
    dep = s.get(Deployment, model_id)
    if dep is not None:
        found |= {int(r["version"]) for r in dep.routes}
        if dep.fallback_version is not None:
            found.add(dep.fallback_version)
    since = now - timedelta(seconds=grace_s)
    before: int | None = None
    while True:  # newest first, a page at a time: a long history is never loaded whole
        query = select(DeploymentEvent).where(DeploymentEvent.model_id == model_id)
        if before is not None:
            query = query.where(DeploymentEvent.id < before)
        page = list(s.scalars(query.order_by(DeploymentEvent.id.desc()).limit(_EVENT_PAGE)))
        for event in page:
            found |= {int(r["version"]) for r in event.routes}
            if event.fallback_version is not None:
                found.add(event.fallback_version)
            if _aware(event.created_at) < since:
                return found
        if len(page) < _EVENT_PAGE:
            return found
        before = page[-1].id


def _evaluating(v: dict[str, Any]) -> bool:
    """A version a worker is evaluating (until the report is collected)."""
    return bool(v["evaluation"]) and v["evaluation"].get("status") == "running"


def _snapshot_version(v: dict[str, Any]) -> dict[str, Any]:
    out = {"sha256": v["sha256"], "signature": v["signature"]}
    post = v["metadata"].get("postprocessing")
    if post and post.get("threshold") is not None:
        out["postprocessing"] = post
    text = text_versions.snapshot_text(v["metadata"])
    if text is not None:
        out["text"] = text
    return out


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _expired(expires_at: datetime | None, now: datetime | None = None) -> bool:
    return expires_at is not None and _aware(expires_at) <= (now or datetime.now(UTC))


def _model_view(s: Session, model: Model) -> dict[str, Any]:
    dep = s.get(Deployment, model.id)
    versions = s.scalars(
        select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(ModelVersion.version)
    ).all()
    return {
        "name": model.name,
        "description": model.description,
        "current_version": model.current_version,
        "policy": policy_of(model).model_dump(exclude_none=True),
        "holdout": with_iso_times(model.holdout),
        "serving": serving.of(model).model_dump(exclude_none=True),
        "guards": model.guards or None,
        "deployment": {
            "routes": dep.routes if dep else [],
            "rules": (dep.rules or []) if dep else [],
            "fallback_version": dep.fallback_version if dep else None,
            "disabled": dep.disabled if dep else False,
        },
        "versions": [_version_view(model, v) for v in versions],
    }


def _tenant_view(tenant: Tenant) -> dict[str, Any]:
    return {
        "name": tenant.name,
        "jurisdiction": tenant.jurisdiction,
        "consents": tenant.consents or [],
        "limits": tenant.limits or {},
        "retain_payloads_s": tenant.retain_payloads_s or 0,
        "signing_key": tenant.signing_key,
    }


def _key_view(key: ApiKey, tenant: str) -> dict[str, Any]:
    return {
        "id": key.id,
        "tenant": tenant,
        "name": key.name,
        "scopes": key.scopes,
        "tier": key.tier,
        "subject_trusted": bool(key.subject_trusted),
        "created_at": iso_utc(key.created_at),
        "expires_at": iso_utc(key.expires_at),
        "revoked": key.revoked_at is not None,
        "revoked_at": iso_utc(key.revoked_at),
    }


def _version_view(model: Model, version: ModelVersion) -> dict[str, Any]:
    return {
        "model": model.name,
        "version": version.version,
        "stage": version.stage,
        "sha256": version.sha256,
        "size_bytes": version.size_bytes,
        "signature": version.signature,
        "metadata": version.meta or {},
        "verified": version.verified,
        "signed_by": version.signed_by,
        "approved_by": version.approved_by,
        "approved_at": iso_utc(version.approved_at),
        "evaluation": with_iso_times(version.evaluation),
        "created_by": version.created_by,
        "created_at": iso_utc(version.created_at),
    }


@dataclass(frozen=True, slots=True)
class PreparedVersion:
    """An upload checked and stored by ``Registry.prepare_version``, ready for ``add_version``."""

    model: str
    new: _NewVersion
    number: int | None
    activate: bool | None


@dataclass(frozen=True, slots=True)
class _NewVersion:
    sha256: str
    size_bytes: int
    signature: dict[str, Any]
    meta: dict[str, Any]
    created_by: str
    signed_by: str | None
