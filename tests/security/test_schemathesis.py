"""Schemathesis against both OpenAPI documents of a running stack: no input may cause a server error."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Stack, running

CONFIG = """
[parameters]
"path.name" = "breast-cancer"
"path.version" = 1
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("schemathesis"), workers=1, gateways=1, docs_enabled=True) as s:
        yield s


def _run(stack: Stack, url: str, key: str) -> str:
    workdir = stack.root / "schemathesis"
    workdir.mkdir(exist_ok=True)
    (workdir / "schemathesis.toml").write_text(CONFIG)
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--header",
        f"Authorization: Bearer {key}",
        "--max-examples",
        "25",
        "--seed",
        "20261121",
        "--generation-database",
        "none",
        "--request-timeout",
        "15",
        "--no-color",
    ]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    summary = re.search(r"(\d+) generated, (\d+) passed", output)
    print(f"schemathesis {url}: {summary.group(0) if summary else output[-2000:]}")
    assert done.returncode == 0, output[-6000:]
    assert summary and int(summary.group(1)) > 300 and summary.group(1) == summary.group(2)
    return output


def test_the_gateway_api_never_answers_with_a_server_error(stack: Stack) -> None:
    _run(stack, stack.gateway, stack.keys["acme"])


def test_the_admin_api_never_answers_with_a_server_error(stack: Stack) -> None:
    _run(stack, stack.control_url, stack.admin_key)
