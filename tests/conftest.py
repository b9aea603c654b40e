"""Shared pytest fixtures. Area-specific fixtures live next to their tests."""
from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_CT = PROJECT_ROOT.parent / "shared" / "data" / "ct"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def shared_ct() -> Path:
    """``../shared/data/ct`` (real CT series: ge_head, philips_head_phantom)."""
    if not SHARED_CT.is_dir():
        pytest.fail(f"shared CT data missing at {SHARED_CT}")
    return SHARED_CT


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def scp_path() -> str:
    """The receive path of an in-process test SCP (``node.fast_path``): "fast" here; test_scp.py
    parametrizes it to run its tests (and test_scp_hardening.py's) on "plain", pynetdicom's own, too."""
    return "fast"


PG_URL_ENV = "QCNODE_TEST_PG_URL"


def _fresh_pg_database(base_url: str) -> tuple[str, callable]:
    """Create an empty database on the test PostgreSQL server; returns (url, drop)."""
    import uuid

    import sqlalchemy as sa

    name = "qc_" + uuid.uuid4().hex[:12]
    admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(base_url).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
    return url, drop


@pytest.fixture
def pg_url():
    """URL of a fresh, empty PostgreSQL database (skips when QCNODE_TEST_PG_URL is unset;
    scripts/test.sh and .ci/run always set it)."""
    import os

    base = os.environ.get(PG_URL_ENV)
    if not base:
        pytest.skip(f"{PG_URL_ENV} not set (run the suite via scripts/test.sh)")
    url, drop = _fresh_pg_database(base)
    yield url
    drop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """An empty database URL, once for SQLite and once for PostgreSQL (marked ``postgres``)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'qcnode.db'}"
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """Undo an in-process CLI's configure_logging: its handler would write to this test's captured,
    later closed, stderr and spill "Logging error" into the tests that follow."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture
def sf(db_url):
    """A session factory on ``db_url`` migrated to the head revision."""
    from qcnode.db.engine import make_engine, session_factory, upgrade
    upgrade(db_url)
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


def pytest_terminal_summary(terminalreporter) -> None:
    """How many SR/KOS files went through dciodvfy in this run, with error and warning totals."""
    helpers = sys.modules.get("sr_helpers")
    runs = getattr(helpers, "VALIDATION_RUNS", None)
    if runs:
        terminalreporter.write_line(
            f"dciodvfy: {len(runs)} SR/KOS files checked, {sum(r[1] for r in runs)} errors, "
            f"{sum(r[2] for r in runs)} warnings")
