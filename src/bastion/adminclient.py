"""A small HTTP client for the admin API, used by the CLI and by ``bastion up``'s first-run set-up."""

from __future__ import annotations

from typing import Any

import httpx

from bastion.errors import BastionError


class AdminError(BastionError):
    """The admin API answered with a problem (its detail is the message)."""

    title = "Admin API error"


class AdminClient:
    def __init__(self, base_url: str, admin_key: str, timeout_s: float = 30.0) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=timeout_s
        )

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
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
        activate: bool = True,
        rows_independent: bool = True,
        version: int | None = None,
    ) -> dict[str, Any]:
        params = {
            "description": description,
            "activate": str(activate).lower(),
            "rows_independent": str(rows_independent).lower(),
        }
        if version is not None:
            params["version"] = str(version)
        result: dict[str, Any] = self._call(
            "POST",
            f"/admin/v1/models/{model}/versions",
            params=params,
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        return result

    def models(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/admin/v1/models")["models"]
        return result

    def create_key(self, tenant: str, name: str = "", scopes: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"tenant": tenant, "name": name}
        if scopes:
            body["scopes"] = scopes
        result: dict[str, Any] = self._call("POST", "/admin/v1/keys", json=body)
        return result

    def keys(self, tenant: str | None = None) -> list[dict[str, Any]]:
        params = {"tenant": tenant} if tenant else {}
        result: list[dict[str, Any]] = self._call("GET", "/admin/v1/keys", params=params)["keys"]
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

    def set_tenant(self, name: str, jurisdiction: str | None) -> dict[str, Any]:
        result: dict[str, Any] = self._call("PUT", f"/admin/v1/tenants/{name}", json={"jurisdiction": jurisdiction})
        return result

    def shadow(self, model: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/admin/v1/models/{model}/shadow")
        return result
