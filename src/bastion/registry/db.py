"""Engine, sessions and migrations for the control plane's database (SQLite or PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def engine_for(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=15000")  # admin changes queue for the one writer
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


MIGRATION_LOCK = 0x62617374696F6E  # "bastion": the advisory lock that serialises migrations


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``, the newest by default (idempotent)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # two control planes starting at once: one migrates, then the other
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def session_factory(engine: Engine) -> sessionmaker:  # type: ignore[type-arg]
    return sessionmaker(engine, expire_on_commit=False)


_UNIT: ContextVar[Session | None] = ContextVar("bastion_registry_unit", default=None)


class Sessions:
    """The registry's sessions: ``sessions()`` to read, ``sessions.begin()`` to write, as with a
    ``sessionmaker``; inside ``sessions.unit()`` both join the unit's one transaction instead, so
    several registry operations (and the caller's own writes) commit together or not at all.

    In a unit, a ``begin()`` block flushes when it ends instead of committing, and an error
    raised anywhere rolls the whole unit back. The unit belongs to the calling thread's context
    (a ``ContextVar``): other requests never see it.
    """

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self.factory = factory

    @classmethod
    def of(cls, sessions: Sessions | sessionmaker[Session]) -> Sessions:
        return sessions if isinstance(sessions, Sessions) else cls(sessions)

    @contextmanager
    def __call__(self) -> Iterator[Session]:
        unit = _UNIT.get()
        if unit is not None:
            yield unit
            return
        with self.factory() as s:
            yield s

    @contextmanager
    def begin(self) -> Iterator[Session]:
        unit = _UNIT.get()
        if unit is not None:
            yield unit
            unit.flush()
            return
        with self.factory.begin() as s:
            yield s

    @property
    def in_unit(self) -> bool:
        return _UNIT.get() is not None

    @contextmanager
    def unit(self) -> Iterator[Session]:
        """One transaction for everything the block does through these sessions."""
        if _UNIT.get() is not None:
            raise RuntimeError("units of work do not nest")
        with self.factory.begin() as s:
            token = _UNIT.set(s)
            try:
                yield s
            finally:
                _UNIT.reset(token)
