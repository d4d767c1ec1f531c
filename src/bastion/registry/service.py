"""Control-plane operations on the registry: tenants, keys, models, versions, snapshots."""

from __future__ import annotations

import re
import secrets
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as SqlIntegrityError
from sqlalchemy.orm import Session, sessionmaker

from bastion.artifacts import onnx_check
from bastion.artifacts.store import ArtifactStore
from bastion.constants import SCOPES
from bastion.errors import Conflict, InvalidInput, NotFound
from bastion.registry.deployments import Deployments
from bastion.registry.tables import ApiKey, Deployment, Model, ModelVersion, Tenant
from bastion.security import apikeys

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def check_name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(f"{kind} name {name!r} must match {_NAME.pattern}")
    return name


class Registry:
    def __init__(self, sessions: sessionmaker[Session], store: ArtifactStore, max_upload_bytes: int) -> None:
        self.sessions = sessions
        self.store = store
        self.max_upload_bytes = max_upload_bytes
        self.deployments = Deployments(sessions)

    # tenants and keys -------------------------------------------------------------------
    def ensure_tenant(self, name: str) -> Tenant:
        check_name("tenant", name)
        with self.sessions.begin() as s:
            tenant = s.scalar(select(Tenant).where(Tenant.name == name))
            if tenant is None:
                tenant = Tenant(id=secrets.token_hex(8), name=name)
                s.add(tenant)
            return tenant

    def set_tenant(self, name: str, jurisdiction: str | None) -> dict[str, Any]:
        """Set a tenant's attributes (created if new); the jurisdiction drives policy rules."""
        if jurisdiction is not None and not re.match(r"^[A-Za-z0-9_-]{1,16}$", jurisdiction):
            raise InvalidInput("jurisdiction must be 1 to 16 letters, digits, '-' or '_'")
        ensured = self.ensure_tenant(name)
        with self.sessions.begin() as s:
            tenant = s.get(Tenant, ensured.id)
            if tenant is None:
                raise NotFound(f"no tenant {name!r}")
            tenant.jurisdiction = jurisdiction
            return {"name": tenant.name, "jurisdiction": tenant.jurisdiction}

    def list_tenants(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            return [
                {"name": t.name, "jurisdiction": t.jurisdiction}
                for t in s.scalars(select(Tenant).order_by(Tenant.name))
            ]

    def create_key(
        self, tenant: str, name: str, scopes: list[str], expires_at: datetime | None = None
    ) -> tuple[ApiKey, str]:
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise InvalidInput(f"unknown or missing scopes {unknown}; allowed: {list(SCOPES)}")
        if expires_at is not None and _aware(expires_at) <= datetime.now(UTC):
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
        )
        with self.sessions.begin() as s:
            s.add(row)
        return row, new.plaintext

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
    def register_version(
        self,
        model: str,
        data: bytes,
        *,
        description: str = "",
        created_by: str = "",
        activate: bool = True,
        rows_independent: bool = True,
        version: int | None = None,
    ) -> dict[str, Any]:
        """Check, store and record a new version; with ``activate`` it becomes the 100 % primary.

        ``version`` names the version (409 if it exists: versions are immutable); unset, the next
        number is taken.

        ``rows_independent=False`` (the uploader's word that an output depends on other rows)
        keeps workers from ever batching this version's requests together.
        """
        check_name("model", model)
        signature = replace(onnx_check.inspect(data, self.max_upload_bytes), rows_independent=rows_independent)
        digest = self.store.put(data)
        if version is not None and version < 1:
            raise InvalidInput("version must be a positive integer")
        view = self._insert_version(model, data, digest, signature.to_dict(), description, created_by, version)
        if activate:
            route = {"version": view["version"], "weight": 100, "role": "primary"}
            self.deployments.deploy(model, [route], None, created_by or "registry")
        return view

    def _insert_version(
        self,
        model: str,
        data: bytes,
        digest: str,
        signature: dict[str, Any],
        description: str,
        created_by: str,
        number: int | None = None,
    ) -> dict[str, Any]:
        for _attempt in range(3):
            try:
                with self.sessions.begin() as s:
                    row = s.scalar(select(Model).where(Model.name == model))
                    if row is None:
                        row = Model(name=model, description=description[:4000])
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
                        sha256=digest,
                        size_bytes=len(data),
                        signature=signature,
                        created_by=created_by[:64],
                    )
                    s.add(version)
                    s.flush()
                    return _version_view(row, version)
            except SqlIntegrityError as exc:
                if number is not None:
                    raise Conflict(
                        f"version {number} of model {model!r} is already registered; versions are immutable"
                    ) from exc
                continue  # a concurrent upload took the same version number; take the next one
        raise Conflict(f"could not allocate a version number for model {model!r}; retry")

    def list_models(self) -> list[dict[str, Any]]:
        with self.sessions() as s:
            return [_model_view(s, model) for model in s.scalars(select(Model).order_by(Model.name))]

    def get_model(self, name: str) -> dict[str, Any]:
        with self.sessions() as s:
            model = s.scalar(select(Model).where(Model.name == name))
            if model is None:
                raise NotFound(f"no model {name!r}")
            return _model_view(s, model)

    def snapshot(self) -> dict[str, Any]:
        """What gateways and workers need, without SQL: keys by digest, models, signatures."""
        now = datetime.now(UTC)
        with self.sessions() as s:
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
                    "scopes": key.scopes,
                    "expires_at": _aware(key.expires_at).timestamp() if key.expires_at else None,
                }
        models = {}
        for model in self.list_models():
            dep = model["deployment"]
            models[model["name"]] = {
                "current": model["current_version"],
                "routes": dep["routes"],
                "rules": dep["rules"],
                "fallback": dep["fallback_version"],
                "disabled": dep["disabled"],
                "versions": {
                    str(v["version"]): {"sha256": v["sha256"], "signature": v["signature"]} for v in model["versions"]
                },
            }
        return {"keys": keys, "models": models}


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
        "deployment": {
            "routes": dep.routes if dep else [],
            "rules": (dep.rules or []) if dep else [],
            "fallback_version": dep.fallback_version if dep else None,
            "disabled": dep.disabled if dep else False,
        },
        "versions": [_version_view(model, v) for v in versions],
    }


def _key_view(key: ApiKey, tenant: str) -> dict[str, Any]:
    return {
        "id": key.id,
        "tenant": tenant,
        "name": key.name,
        "scopes": key.scopes,
        "created_at": _aware(key.created_at).isoformat(),
        "expires_at": _aware(key.expires_at).isoformat() if key.expires_at else None,
        "revoked": key.revoked_at is not None,
    }


def _version_view(model: Model, version: ModelVersion) -> dict[str, Any]:
    return {
        "model": model.name,
        "version": version.version,
        "sha256": version.sha256,
        "size_bytes": version.size_bytes,
        "signature": version.signature,
        "created_by": version.created_by,
        "created_at": _aware(version.created_at).isoformat(),
    }
