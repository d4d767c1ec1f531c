"""Shared fixtures: real Redis servers, real databases (SQLite and PostgreSQL), real processes."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bastion.embedded.redis_server import EmbeddedRedis
from bastion.redisconn import sync_client
from tests.support import LIVE, Stack, running

PG_URL = os.environ.get("BASTION_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_POSTGRES = os.environ.get("BASTION_REQUIRE_POSTGRES", "") == "1" or os.environ.get("CI") == "true"


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A private, empty redis-server for one test."""
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    yield url
    server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = sync_client(redis_url)
    yield client
    client.close()


def _postgres_database() -> Iterator[str]:
    import psycopg

    name = f"bastion_test_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL is required here (CI) but unreachable at {PG_URL}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = PG_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using this runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        yield from _postgres_database()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One running stack (1 gateway, 1 worker) shared by a test module."""
    with running(tmp_path_factory.mktemp("stack"), workers=1) as s:
        yield s


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Where PostgreSQL is required, a skipped test fails the run: skips are not passes."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if REQUIRE_POSTGRES and reporter is not None and reporter.stats.get("skipped"):
        reporter.write_line("error: tests were skipped where every test must run (CI)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report carries the log tails of the stacks running then (in CI, the only
    trace of what a child process said)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for stack in LIVE:
            report.sections.append((f"stack logs ({stack.root.name})", stack.log_tails()))
