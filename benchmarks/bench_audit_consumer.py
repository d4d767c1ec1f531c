"""The decision log's consumer rate, into SQLite and into PostgreSQL (part 2 of bench_audit.py).

A real embedded Redis gets ``events`` decision events of the shape complete.lua writes (a
tenant, 1,000 named subjects, one row of 30 float32 inputs and its outputs; one tenant in five
keeps payloads, so those are encrypted per subject), then the control plane's own consumer
(``bastion.audit.service.AuditService``) appends them batch after batch while a checkpoint is
signed every ``audit_checkpoint_s`` (1 s), as in the control plane. The rate is events logged
over the time until the stream is empty.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bastion import codec
from bastion.audit.service import AuditService
from bastion.constants import AUDIT_STREAM
from bastion.embedded.redis_server import EmbeddedRedis
from bastion.redisconn import sync_client
from bastion.registry import db
from bastion.settings import Settings


def _fill(client: Any, events: int) -> None:
    rng = np.random.default_rng(5)
    pipe = client.pipeline(transaction=False)
    now = int(time.time() * 1000)
    for i in range(events):
        tenant = f"t{i % 5}"
        inputs = codec.encode({"input": rng.random((1, 30), dtype=np.float32)})
        outputs = codec.encode({"probabilities": rng.random((1, 2), dtype=np.float32)})
        subject = hashlib.blake2b(f"{tenant}\x00subject-{i % 1000}".encode(), digest_size=16).hexdigest()
        retain = tenant == "t0"
        doc = {
            "id": secrets.token_urlsafe(16),
            "kind": "decision",
            "at": now,
            "tenant": tenant,
            "key": "key1",
            "subj": subject,
            "model": "breast-cancer",
            "version": 1,
            "artifact": "ab" * 32,
            "role": "primary",
            "cache": False,
            "rule": "",
            "tp": "",
            "rid": f"r{i}",
            "input_sha256": hashlib.sha256(inputs).hexdigest(),
            "latency_ms": 1.0,
            "jurisdiction": "eu",
            "consents": ["analytics"],
            "rows": 1,
            "retain": retain,
        }
        fields: dict[str, bytes] = {"e": orjson.dumps(doc), "o": outputs}
        if retain:
            fields["i"] = inputs
        pipe.xadd(AUDIT_STREAM, fields)  # type: ignore[arg-type]
        if len(pipe.command_stack) >= 1000:
            pipe.execute()
    pipe.execute()


def _one(name: str, database_url: str, root: Path, events: int) -> dict[str, Any]:
    redis_server = EmbeddedRedis(root / "redis")
    url = redis_server.start()
    client = sync_client(url)
    engine = db.engine_for(database_url)
    try:
        db.migrate(engine)
        settings = Settings(data_dir=root, redis_url=url, database_url=database_url)
        service = AuditService(settings, db.Sessions.of(db.session_factory(engine)), engine, client)
        service.start()
        _fill(client, events)
        started = time.monotonic()
        next_checkpoint = started + settings.audit_checkpoint_s
        checkpoints = 0
        while client.xlen(AUDIT_STREAM):
            service.consume_once(block_ms=0)
            if time.monotonic() >= next_checkpoint:
                next_checkpoint += settings.audit_checkpoint_s
                checkpoints += service.log.checkpoint() is not None
        elapsed = time.monotonic() - started
        checkpoints += service.log.checkpoint() is not None
        size = service.log.size()
        report = service.log.verify()
    finally:
        client.close()
        engine.dispose()
        redis_server.stop()
    rate = events / elapsed
    print(
        f"consumer into {name}: {events} events in {elapsed:.2f} s = {rate:,.0f} events/s; {checkpoints} checkpoints "
        f"signed; log size {size}; verify ok={report.ok}",
        flush=True,
    )
    return {"database": name, "events": events, "seconds": elapsed, "events_per_s": rate, "ok": report.ok}


def run(events: int, pg_url: str) -> list[dict[str, Any]]:
    found = []
    root = Path(tempfile.mkdtemp(prefix="bastion-bench-audit-"))
    try:
        found.append(_one("sqlite", f"sqlite:///{root / 'sqlite' / 'bastion.db'}", _mkdir(root / "sqlite"), events))
        if pg_url:
            import psycopg

            admin_url = pg_url.replace("+psycopg", "")
            name = f"bastion_bench_{secrets.token_hex(4)}"
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{name}"')
            try:
                base = pg_url.rpartition("/")[0]
                found.append(_one("postgresql", f"{base}/{name}", _mkdir(root / "pg"), events))
            finally:
                with psycopg.connect(admin_url, autocommit=True) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return found


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
