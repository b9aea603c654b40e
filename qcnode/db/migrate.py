"""Schema migrations (Alembic, ``migrations/``): where the database is, and bringing it to head."""
from __future__ import annotations

from sqlalchemy import text

from qcnode.db.engine import alembic_config, make_engine, upgrade

PG_MIGRATION_LOCK = 7212001  # pg_advisory_lock key: one migrating process at a time


def current_revision(url: str) -> str | None:
    """The Alembic revision the database is at (None when never migrated)."""
    from alembic.runtime.migration import MigrationContext
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    """The newest revision in ``migrations/``."""
    from alembic.script import ScriptDirectory
    return str(ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head())


def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the database; on PostgreSQL under an advisory lock and only when not at head."""
    if not url.startswith("postgresql"):
        upgrade(url, revision)
        return
    if revision == "head" and current_revision(url) == head_revision():
        return
    from alembic import command
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_MIGRATION_LOCK})
            conn.commit()
            try:
                with conn.begin():
                    acfg = alembic_config(url)
                    acfg.attributes["connection"] = conn
                    command.upgrade(acfg, revision)
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_MIGRATION_LOCK})
                conn.commit()
    finally:
        engine.dispose()
