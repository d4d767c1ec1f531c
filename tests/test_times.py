"""Every time a client or an operator reads is ISO 8601 UTC with milliseconds and a ``Z``
(``2026-12-02T06:27:56.123Z``), and a job names the version it was routed to.

The first tests pin ``bastion.timefmt`` itself; the rest read the real public and admin APIs of a
running stack over HTTP (its own stack: one worker that serves only the demo model, so a second
model's jobs wait in their queue until a test dead-letters them).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from bastion import demo
from bastion.adminclient import AdminClient
from bastion.queue.consumer import Consumer
from bastion.timefmt import iso_utc, parse_iso, to_millisecond
from tests.support import Stack, breast_cancer, running, wait_until

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ROW = [1.0] * 30
IDLE = "timed-letters"  # a model no worker of this module's stack serves


# timefmt ---------------------------------------------------------------------------------
def test_iso_utc_writes_milliseconds_and_a_z_whatever_it_is_given() -> None:
    aware = datetime(2026, 12, 2, 6, 27, 56, 123456, tzinfo=UTC)
    assert iso_utc(aware) == "2026-12-02T06:27:56.123Z"
    assert iso_utc(aware.replace(tzinfo=None)) == "2026-12-02T06:27:56.123Z", "naive (as SQLite returns): UTC"
    paris = aware.astimezone(timezone(timedelta(hours=1)))
    assert iso_utc(paris) == "2026-12-02T06:27:56.123Z", "an offset is converted to UTC"
    assert iso_utc(aware.timestamp()) == "2026-12-02T06:27:56.123Z", "a number is epoch seconds"
    assert iso_utc(1_796_192_876) == "2026-12-02T06:27:56.000Z"
    assert iso_utc(1_796_192_876_999 / 1000) == "2026-12-02T06:27:56.999Z", "epoch ms / 1000 keeps its ms"
    assert iso_utc(datetime(2026, 12, 2, 6, 27, 56, 999999)) == "2026-12-02T06:27:56.999Z", "truncated, not rounded"
    assert iso_utc(datetime(33, 1, 1)) == "0033-01-01T00:00:00.000Z", "four-digit years"
    assert iso_utc(None) is None
    with pytest.raises(TypeError):
        iso_utc(True)
    with pytest.raises(TypeError):
        iso_utc("2026-12-02")  # type: ignore[arg-type]


def test_parse_iso_reads_z_offsets_and_naive_times_as_utc() -> None:
    want = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    for text in (
        "2030-01-01T12:00:00Z",
        "2030-01-01T12:00:00z",
        "2030-01-01T12:00:00.000Z",
        "2030-01-01T12:00:00+00:00",
        "2030-01-01T14:00:00+02:00",
        "2030-01-01T07:00:00-05:00",
        "2030-01-01T12:00:00",
        " 2030-01-01 12:00 ",
    ):
        found = parse_iso(text)
        assert found == want and found.tzinfo == UTC, text
    assert parse_iso("2030-01-01") == datetime(2030, 1, 1, tzinfo=UTC), "a date is its midnight, UTC"
    for bad in ("", "tomorrow", "2030-13-01", "2030-01-01T25:00:00Z", "1735689600", "9999-12-31T23:00:00-05:00"):
        with pytest.raises(ValueError, match="ISO 8601"):
            parse_iso(bad)


def test_a_written_time_reads_back_as_the_same_millisecond() -> None:
    now = datetime.now(UTC)
    shown = iso_utc(now)
    assert shown is not None
    assert parse_iso(shown) == to_millisecond(now)
    assert iso_utc(parse_iso(shown)) == shown
    assert to_millisecond(now.replace(tzinfo=None)) == to_millisecond(now)


# the APIs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running(tmp_path_factory.mktemp("times"), workers=1, worker_models=demo.MODEL_NAME) as s:
        yield s


@pytest.fixture(scope="module")
def admin_http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"{stack.control_url}/admin/v1", headers={"Authorization": f"Bearer {stack.admin_key}"}, timeout=30.0
    ) as http:
        yield http


@pytest.fixture(scope="module")
def second_version(stack: Stack) -> int:
    """Version 2 of the demo model, the primary once the gateway routes to it."""
    version = int(stack.admin.register(demo.MODEL_NAME, demo.model_bytes())["version"])
    assert version == 2

    def routed() -> bool:
        with stack.client() as http:
            r = http.post(f"/v1/models/{demo.MODEL_NAME}/predict", json={"inputs": [ROW]})
        return r.status_code == 200 and r.json()["version"] == version

    wait_until(routed, 15, "the gateway to route to version 2")
    return version


@pytest.fixture(scope="module")
def idle_model(stack: Stack) -> str:
    """A model no worker serves: its jobs wait in the queue (queued, then dead-lettered by a test)."""
    stack.admin.register(IDLE, demo.model_bytes())
    with stack.client() as http:
        wait_until(
            lambda: http.post(f"/v1/models/{IDLE}/jobs", json={"inputs": [ROW]}).status_code == 202, 15, "the model"
        )
    return IDLE


def _recent(value: Any, what: str, slack_s: float = 120.0) -> datetime:
    """``value`` is a time in the API's form, within ``slack_s`` of now; as a datetime."""
    assert isinstance(value, str) and ISO.fullmatch(value), f"{what} = {value!r} is not ISO 8601 UTC with ms and Z"
    found = parse_iso(value)
    assert abs((datetime.now(UTC) - found).total_seconds()) < slack_s, f"{what} = {value} is not close to now"
    return found


def test_a_job_shows_iso_times_and_the_version_its_202_named(stack: Stack, second_version: int) -> None:
    with stack.client() as http:
        accepted = http.post(f"/v1/models/{demo.MODEL_NAME}/jobs", json={"inputs": [ROW]})
        assert accepted.status_code == 202, accepted.text
        job = accepted.json()
        assert job["version"] == second_version
        wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded", 20, "the job")
        final = http.get(f"/v1/jobs/{job['id']}").json()
        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
            lines = [line for line in events.iter_lines() if line.startswith(("event: ", "data: "))]
    assert final["version"] == job["version"] == second_version, "the job names the version the 202 named"
    created, started, finished = (_recent(final[f"{n}_at"], f"job {n}_at") for n in ("created", "started", "finished"))
    assert created <= started <= finished
    assert lines[-2:-1] == ["event: result"], lines
    result = json.loads(lines[-1].removeprefix("data: "))
    assert result["version"] == second_version
    assert {k: result[k] for k in ("created_at", "started_at", "finished_at")} == {
        k: final[k] for k in ("created_at", "started_at", "finished_at")
    }, "the SSE result carries the job as GET shows it"


def test_a_job_still_queued_shows_its_version_and_creation_time(stack: Stack, idle_model: str) -> None:
    with stack.client() as http:
        job = http.post(f"/v1/models/{idle_model}/jobs", json={"inputs": [ROW]}).json()
        shown = http.get(f"/v1/jobs/{job['id']}").json()
    assert shown["status"] == "queued" and shown["version"] == job["version"] == 1
    _recent(shown["created_at"], "queued job created_at")
    assert "started_at" not in shown and "finished_at" not in shown


def test_keys_show_iso_times_and_take_expiry_with_or_without_a_zone(stack: Stack, admin_http: httpx.Client) -> None:
    naive = admin_http.post("/keys", json={"tenant": "timed", "expires_at": "2030-01-01T00:00:00"})
    offset = admin_http.post("/keys", json={"tenant": "timed", "expires_at": "2030-01-01T02:00:00.123456+02:00"})
    dated = admin_http.post("/keys", json={"tenant": "timed", "expires_at": "2030-01-01"})
    for r in (naive, offset, dated):
        assert r.status_code == 201, r.text
    assert naive.json()["expires_at"] == dated.json()["expires_at"] == "2030-01-01T00:00:00.000Z"
    assert offset.json()["expires_at"] == "2030-01-01T00:00:00.123Z"
    rotated = stack.admin.rotate_key(naive.json()["id"], overlap_s=600)
    stack.admin.revoke_key(offset.json()["id"])
    keys = {k["id"]: k for k in stack.admin.keys("timed")}
    assert len(keys) == 4
    for key in keys.values():
        _recent(key["created_at"], "key created_at")
        assert ISO.fullmatch(key["expires_at"]), key
        assert key["revoked_at"] is None or ISO.fullmatch(key["revoked_at"]), key
    assert keys[offset.json()["id"]]["expires_at"] == "2030-01-01T00:00:00.123Z"
    revoked = _recent(keys[offset.json()["id"]]["revoked_at"], "key revoked_at")
    assert keys[offset.json()["id"]]["revoked"] is True and revoked <= datetime.now(UTC)
    overlap_ends = parse_iso(keys[naive.json()["id"]]["expires_at"]) - datetime.now(UTC)
    assert timedelta(seconds=590) < overlap_ends <= timedelta(seconds=600), "the rotated key lasts the overlap"
    assert keys[rotated["key"]["id"]]["expires_at"] == "2030-01-01T00:00:00.000Z", "the new secret keeps the expiry"
    refused = admin_http.post("/keys", json={"tenant": "timed", "expires_at": "next tuesday"})
    assert refused.status_code == 400 and refused.headers["content-type"] == "application/problem+json"


def test_versions_histories_deployments_and_changes_show_iso_times(
    stack: Stack, admin_http: httpx.Client, second_version: int
) -> None:
    waiting = int(stack.admin.register(demo.MODEL_NAME, demo.model_bytes(), activate=False)["version"])
    reviewer_key = stack.admin.create_key("operators", "reviewer", scopes=["deploy"])["key"]
    reviewer = AdminClient(stack.control_url, reviewer_key)
    try:
        approved = reviewer.approve(demo.MODEL_NAME, waiting)  # four eyes: not the uploader
    finally:
        reviewer.close()
    _recent(approved["approved_at"], "approve response approved_at")
    x, y = breast_cancer()
    name = stack.admin.version(demo.MODEL_NAME, 1)["signature"]["inputs"][0]["name"]
    holdout = stack.admin.set_holdout(
        demo.MODEL_NAME, {"inputs": {name: x[:50].round(3).tolist()}, "labels": y[:50].tolist()}
    )
    _recent(holdout["holdout"]["uploaded_at"], "holdout uploaded_at")
    stack.admin.evaluate(demo.MODEL_NAME, waiting)
    stack.admin.wait_for_evaluation(demo.MODEL_NAME, waiting, timeout_s=60)

    version = stack.admin.version(demo.MODEL_NAME, waiting)
    _recent(version["created_at"], "version created_at")
    assert parse_iso(version["approved_at"]) == parse_iso(approved["approved_at"])
    evaluation = version["evaluation"]
    assert parse_iso(evaluation["requested_at"]) <= _recent(evaluation["finished_at"], "evaluation finished_at")
    _recent(evaluation["requested_at"], "evaluation requested_at")
    model = admin_http.get(f"/models/{demo.MODEL_NAME}").json()
    _recent(model["holdout"]["uploaded_at"], "model holdout uploaded_at")
    for v in model["versions"]:
        _recent(v["created_at"], f"model version {v['version']} created_at")

    events = stack.admin.history(demo.MODEL_NAME, waiting)
    assert {"approved", "evaluated"} <= {e["action"] for e in events}
    for event in events:
        _recent(event["at"], f"history {event['action']} at")

    deployment = stack.admin.deployment(demo.MODEL_NAME)
    assert deployment["routes"][0]["version"] == second_version
    _recent(deployment["updated_at"], "deployment updated_at")
    disabled = stack.admin.set_enabled(demo.MODEL_NAME, False)
    assert _recent(disabled["updated_at"], "disable updated_at") >= parse_iso(deployment["updated_at"])
    stack.admin.set_enabled(demo.MODEL_NAME, True)

    changes = stack.admin.changes(limit=1000)["changes"]
    assert len(changes) > 5
    for change in changes:
        _recent(change["at"], f"change {change['action']} at")


def test_dead_letters_show_iso_times(stack: Stack, idle_model: str) -> None:
    client = stack.redis_client()
    try:
        # A consumer that takes the waiting jobs and never finishes them: past their deliveries at once.
        ghost = Consumer(client, "ghost", result_ttl_s=3600, sync_result_ttl_s=60)
        ghost.ensure_groups([idle_model])
        assert ghost.read([idle_model], 100, None), "the idle model's jobs wait in its queue"
        time.sleep(0.01)
        run, dead = ghost.reclaim([idle_model], min_idle_ms=0, max_deliveries=1)
        assert not run and dead
        ghost.dead_letter(dead, 1)
    finally:
        client.close()
    letters = stack.admin.dead_letters(idle_model)
    assert len(letters) == len(dead)
    for letter in letters:
        assert "created_ms" not in letter
        created = _recent(letter["created_at"], "dead letter created_at")
        assert created <= _recent(letter["dead_lettered_at"], "dead letter dead_lettered_at")
