"""Names and ids are validated as whole strings: no trailing newline makes a lookalike."""

from __future__ import annotations

import httpx
import pytest

from bastion.control.schemas import KeyCreate
from bastion.errors import InvalidInput
from bastion.registry.names import check_name
from tests.support import Stack


@pytest.mark.parametrize("name", ["breast-cancer\n", "acme\n", "\nacme", "ac me", "Acme", "", "a" * 65])
def test_a_name_must_match_as_a_whole(name: str) -> None:
    with pytest.raises(InvalidInput):
        check_name("model", name)


def test_the_admin_api_refuses_lookalike_names(stack: Stack) -> None:
    """``acme\\n`` as a tenant (path or body) and ``breast-cancer\\n`` as a model are 400s."""
    headers = {"Authorization": f"Bearer {stack.admin_key}"}
    with httpx.Client(base_url=stack.control_url, headers=headers) as admin:
        tenant = admin.put("/admin/v1/tenants/acme%0A", json={})
        model = admin.post(
            "/admin/v1/models/breast-cancer%0A/versions",
            content=b"not onnx",
            headers={"Content-Type": "application/octet-stream"},
        )
        key = admin.post("/admin/v1/keys", json={"tenant": "acme\n"})
    assert tenant.status_code == 400 and tenant.headers["content-type"] == "application/problem+json"
    assert model.status_code == 400 and "must match" in model.json()["detail"]
    assert key.status_code == 400
    with pytest.raises(ValueError):
        KeyCreate(tenant="acme\n")
    names = {t["name"] for t in stack.admin._call("GET", "/admin/v1/tenants")["tenants"]}
    assert not any("\n" in n for n in names)


def test_the_gateway_treats_a_job_id_with_a_newline_as_unknown(stack: Stack) -> None:
    with stack.client() as http:
        job = http.post("/v1/models/breast-cancer/jobs", json={"inputs": [[1.0] * 30]}).json()["id"]
        assert http.get(f"/v1/jobs/{job}").status_code == 200
        assert http.get(f"/v1/jobs/{job}%0A").status_code == 404
