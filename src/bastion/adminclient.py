"""A small HTTP client for the admin API, used by the CLI and by ``bastion up``'s first-run set-up."""

from __future__ import annotations

import json
import ssl
import time
from typing import Any
from urllib.parse import quote

import httpx

from bastion.errors import BastionError


class AdminError(BastionError):
    """The admin API answered with a problem (its detail is the message)."""

    title = "Admin API error"


class AdminClient:
    def __init__(
        self, base_url: str, admin_key: str, timeout_s: float = 30.0, verify: ssl.SSLContext | bool = True
    ) -> None:
        """``verify``: for an https URL, the context that verifies the admin API (``TLSFiles.client_context``)."""
        self._http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=timeout_s, verify=verify
        )

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; a problem answered is ``AdminError`` with its detail (``timeout``: seconds)."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise AdminError(
                f"the control plane at {self._http.base_url} is unreachable ({type(exc).__name__})"
            ) from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text[:300]
            raise AdminError(f"{response.status_code}: {detail}")
        return response.json()

    def register(
        self,
        model: str,
        data: bytes,
        description: str = "",
        activate: bool | None = None,
        rows_independent: bool | None = None,
        version: int | None = None,
        metadata: dict[str, Any] | None = None,
        signature: str | None = None,
        signer: str | None = None,
        tokenizer: bytes | None = None,
        text: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Register a version; with metadata, a signature or a tokenizer it is sent as a multipart
        form. A text version sends its ``tokenizer`` (tokenizers JSON bytes) and ``text`` (``{"task":
        "embedding"|"generation", "config": {...}}``, the metadata's ``text`` section)."""
        if text is not None:
            metadata = {**(metadata or {}), "text": text}
        params = {"description": description}
        for key, value in (("activate", activate), ("rows_independent", rows_independent)):
            if value is not None:
                params[key] = str(value).lower()
        if version is not None:
            params["version"] = str(version)
        if signer:
            params["signer"] = signer
        path = f"/admin/v1/models/{model}/versions"
        if metadata is None and signature is None and tokenizer is None:
            headers = {"Content-Type": "application/octet-stream"}
            result: dict[str, Any] = self._call("POST", path, params=params, content=data, headers=headers)
            return result
        form = {"metadata": json.dumps(metadata or {})}
        if signature:
            form["signature"] = signature
        files = {"artifact": ("model.onnx", data, "application/octet-stream")}
        if tokenizer is not None:
            files["tokenizer"] = ("tokenizer.json", tokenizer, "application/json")
        result = self._call("POST", path, params=params, data=form, files=files)
        return result

    def version(self, model: str, version: int) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/admin/v1/models/{model}/versions/{version}")
        return result

    def policy(self, model: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/admin/v1/models/{model}/policy")
        return result

    def set_policy(self, model: str, policy: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("PUT", f"/admin/v1/models/{model}/policy", json=policy)
        return result

    def serving(self, model: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/admin/v1/models/{model}/serving")
        return result

    def set_serving(self, model: str, options: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("PUT", f"/admin/v1/models/{model}/serving", json=options)
        return result

    def guards(self, model: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/admin/v1/models/{model}/guards")
        return result

    def set_guards(self, model: str, policy: dict[str, Any]) -> dict[str, Any]:
        """Replace the model's guard policy (``bastion.guards.parse_policy`` reads it)."""
        result: dict[str, Any] = self._call("PUT", f"/admin/v1/models/{model}/guards", json=policy)
        return result

    def set_holdout(self, model: str, holdout: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("PUT", f"/admin/v1/models/{model}/holdout", json=holdout)
        return result

    def evaluate(self, model: str, version: int) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/admin/v1/models/{model}/versions/{version}/evaluate")
        return result

    def wait_for_evaluation(self, model: str, version: int, timeout_s: float = 120.0) -> dict[str, Any]:
        """Poll the version until its evaluation is no longer running; return the evaluation."""
        deadline = time.monotonic() + timeout_s
        while True:
            evaluation: dict[str, Any] = self.version(model, version).get("evaluation") or {}
            if evaluation.get("status") != "running":
                return evaluation
            if time.monotonic() > deadline:
                raise AdminError(f"the evaluation of {model} v{version} is still running after {timeout_s:.0f} s")
            time.sleep(0.2)

    def gates(self, model: str, version: int) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", f"/admin/v1/models/{model}/versions/{version}/gates")["gates"]
        return result

    def approve(self, model: str, version: int) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/admin/v1/models/{model}/versions/{version}/approve")
        return result

    def set_stage(self, model: str, version: int, stage: str) -> dict[str, Any]:
        path = f"/admin/v1/models/{model}/versions/{version}/stage"
        result: dict[str, Any] = self._call("POST", path, json={"stage": stage})
        return result

    def history(self, model: str, version: int) -> list[dict[str, Any]]:
        path = f"/admin/v1/models/{model}/versions/{version}/history"
        result: list[dict[str, Any]] = self._call("GET", path)["events"]
        return result

    def models(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/admin/v1/models")["models"]
        return result

    def create_key(
        self,
        tenant: str,
        name: str = "",
        scopes: list[str] | None = None,
        tier: str | None = None,
        subject_trusted: bool = False,
        expires_at: str | None = None,
    ) -> dict[str, Any]:
        """A new key (its secret is in ``key``, this once); ``expires_at`` is ISO 8601."""
        body: dict[str, Any] = {"tenant": tenant, "name": name}
        if scopes:
            body["scopes"] = scopes
        if tier:
            body["tier"] = tier
        if subject_trusted:
            body["subject_trusted"] = True
        if expires_at:
            body["expires_at"] = expires_at
        result: dict[str, Any] = self._call("POST", "/admin/v1/keys", json=body)
        return result

    def keys(self, tenant: str | None = None) -> list[dict[str, Any]]:
        params = {"tenant": tenant} if tenant else {}
        result: list[dict[str, Any]] = self._call("GET", "/admin/v1/keys", params=params)["keys"]
        return result

    def rotate_key(self, key_id: str, overlap_s: int = 3600) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/admin/v1/keys/{key_id}/rotate", json={"overlap_s": overlap_s})
        return result

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/admin/v1/keys/{key_id}")
        return result

    def deployment(self, model: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/admin/v1/models/{model}/deployment")
        return result

    def deploy(
        self,
        model: str,
        routes: list[dict[str, Any]],
        fallback: int | None = None,
        rules: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        body = {"routes": routes, "fallback_version": fallback, "rules": rules or []}
        result: dict[str, Any] = self._call("PUT", f"/admin/v1/models/{model}/deployment", json=body)
        return result

    def rollback(self, model: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/admin/v1/models/{model}/rollback")
        return result

    def set_enabled(self, model: str, enabled: bool) -> dict[str, Any]:
        action = "enable" if enabled else "disable"
        result: dict[str, Any] = self._call("POST", f"/admin/v1/models/{model}/{action}")
        return result

    def set_tenant(
        self,
        name: str,
        jurisdiction: str | None,
        signing_key: str | None = None,
        consents: list[str] | None = None,
        limits: dict[str, Any] | None = None,
        retain_payloads_s: int | None = None,
    ) -> dict[str, Any]:
        """Create or update a tenant; ``retain_payloads_s`` 0: its payloads are not kept."""
        given = {
            "jurisdiction": jurisdiction,
            "signing_key": signing_key,
            "consents": consents,
            "limits": limits,
            "retain_payloads_s": retain_payloads_s,
        }
        body = {k: v for k, v in given.items() if v is not None}  # a field left out keeps its value
        result: dict[str, Any] = self._call("PUT", f"/admin/v1/tenants/{name}", json=body)
        return result

    def tenants(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/admin/v1/tenants")["tenants"]
        return result

    def dead_letters(self, model: str, count: int = 100) -> list[dict[str, Any]]:
        path = f"/admin/v1/models/{model}/dead-letters"
        result: list[dict[str, Any]] = self._call("GET", path, params={"count": count})["dead_letters"]
        return result

    def replay(self, model: str, ids: list[str] | None = None) -> dict[str, Any]:
        path = f"/admin/v1/models/{model}/dead-letters/replay"
        result: dict[str, Any] = self._call("POST", path, json={"ids": ids or []})
        return result

    def changes(self, after: int = 0, limit: int = 100) -> dict[str, Any]:
        """One page of the admin trail (``changes`` and ``next_after``)."""
        result: dict[str, Any] = self._call("GET", "/admin/v1/changes", params={"after": after, "limit": limit})
        return result

    def shadow(self, model: str, reset: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE" if reset else "GET", f"/admin/v1/models/{model}/shadow")
        return result

    # monitoring ----------------------------------------------------------------------------
    def monitoring(self, model: str, window: str = "1h") -> dict[str, Any]:
        """Drift per routed version, traffic and live quality over ``window`` (``30m``, ``1h``...)."""
        result: dict[str, Any] = self._call("GET", f"/admin/v1/models/{model}/monitoring", params={"window": window})
        return result

    def status(self, window: str = "5m", model: str | None = None) -> dict[str, Any]:
        """Gateways, workers and each model's versions at a glance (``bastion status``)."""
        params = {"window": window, **({"model": model} if model else {})}
        result: dict[str, Any] = self._call("GET", "/admin/v1/status", params=params)
        return result

    # the decision log ----------------------------------------------------------------------
    def audit_event(self, event_id: str, tenant: str | None = None) -> dict[str, Any]:
        """One event with its payload (decrypted when kept and not erased)."""
        params = {"tenant": tenant} if tenant else {}
        result: dict[str, Any] = self._call("GET", f"/admin/v1/audit/events/{quote(event_id, safe='')}", params=params)
        return result

    def audit_search(self, **filters: Any) -> dict[str, Any]:
        """One page of events (``events``, ``next_after``); filters as ``POST /admin/v1/audit/search`` takes them
        (None: not given)."""
        body = {k: v for k, v in filters.items() if v is not None}
        result: dict[str, Any] = self._call("POST", "/admin/v1/audit/search", json=body)
        return result

    def audit_verify(self, start: int = 0, end: int | None = None, timeout_s: float = 600.0) -> dict[str, Any]:
        """The verification report of positions [start, end) (end None: to the end of the log)."""
        body: dict[str, Any] = {"from": start} | ({"to": end} if end is not None else {})
        result: dict[str, Any] = self._call("POST", "/admin/v1/audit/verify", json=body, timeout=timeout_s)
        return result

    def audit_checkpoint(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/admin/v1/audit/checkpoint")
        return result

    def audit_checkpoints(self, after: int = 0, limit: int = 1000) -> dict[str, Any]:
        """One page of signed checkpoints of a size above ``after`` (``checkpoints``, ``next_after``)."""
        params = {"after": after, "limit": limit}
        result: dict[str, Any] = self._call("GET", "/admin/v1/audit/checkpoints", params=params)
        return result

    def audit_proof(self, event_id: str, size: int | None = None) -> dict[str, Any]:
        params = {"size": size} if size is not None else {}
        path = f"/admin/v1/audit/events/{quote(event_id, safe='')}/proof"
        result: dict[str, Any] = self._call("GET", path, params=params)
        return result

    def audit_consistency(self, first: int, second: int) -> dict[str, Any]:
        params = {"first": first, "second": second}
        result: dict[str, Any] = self._call("GET", "/admin/v1/audit/consistency", params=params)
        return result

    def audit_leaves(self, start: int = 0, limit: int = 1000) -> dict[str, Any]:
        """One page of raw leaves from ``start`` (``leaves``, ``frontier`` at start, ``next_start``)."""
        params = {"start": start, "limit": limit}
        result: dict[str, Any] = self._call("GET", "/admin/v1/audit/leaves", params=params)
        return result

    def audit_keys(self) -> dict[str, Any]:
        """The checkpoint signing keys (``keys``: key_id, public_key hex, pem; ``current``)."""
        result: dict[str, Any] = self._call("GET", "/admin/v1/audit/keys")
        return result

    def erase_subject(self, tenant: str, subject: str, timeout_s: float = 600.0) -> dict[str, Any]:
        """Erase a data subject (it waits for Redis to rewrite its files: allow minutes)."""
        path = f"/admin/v1/tenants/{quote(tenant, safe='')}/subjects/erase"
        result: dict[str, Any] = self._call("POST", path, json={"subject": subject}, timeout=timeout_s)
        return result

    def export_subject(self, tenant: str, subject: str, timeout_s: float = 600.0) -> dict[str, Any]:
        """Every decision about a data subject, decrypted where kept."""
        path = f"/admin/v1/tenants/{quote(tenant, safe='')}/subjects/export"
        result: dict[str, Any] = self._call("POST", path, json={"subject": subject}, timeout=timeout_s)
        return result
