"""``qcnode serve``: the long-running process.

Threads: the Storage SCP (pynetdicom, one thread per association), the series tracker, the
scoring worker, the outbox sender, and the nightly audit (APScheduler). SIGTERM/SIGINT: stop
accepting associations, let the in-flight C-STORE finish, stop the loops between jobs (a job
interrupted mid-way keeps its lease and is retried: after a restart on this host at once,
elsewhere when the lease expires), exit 0. The database is migrated on start.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable

from sqlalchemy import text
from sqlalchemy.orm import Session

from qcnode.config import Config
from qcnode.db.engine import alembic_config, make_engine, session_factory, upgrade
from qcnode.dicom.series import run_tracker
from qcnode.dicom.spool import Spool
from qcnode.log import configure_logging, get_logger

log = get_logger("qcnode.daemon")

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


def _fast_dicom_reading() -> None:
    """Skip pydicom's per-value regex validation while reading (it only ever warns).

    The node checks what it relies on itself (UIDs used in paths, pixel module sizes); pydicom's
    validation of every UID and string read (also in pynetdicom's DIMSE layer, and when pynetdicom
    copies the presentation contexts for each association) is a large share of the receive CPU.
    """
    import pydicom.config
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def _loop(name: str, fn: Callable[[], Any], interval: float, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            busy = fn()
        except Exception as exc:  # noqa: BLE001 - keep the loop alive, log the error
            log.error(f"{name}_error", error=f"{type(exc).__name__}: {exc}")
            busy = False
        if not busy:
            stop.wait(interval)


def serve(cfg: Config, run_scp: bool = True, run_worker: bool | None = None,
          stop: threading.Event | None = None, install_signals: bool = True) -> int:
    """Run the daemon until SIGTERM/SIGINT (or ``stop`` is set). Returns the exit code."""
    os.umask(0o077)  # database, spool, quarantine, logs: owner-only (0600 files, 0700 folders)
    _fast_dicom_reading()
    configure_logging(cfg.logging.level, cfg.path(cfg.logging.file) if cfg.logging.file else None)
    run_worker = cfg.worker.enabled if run_worker is None else run_worker
    stop = stop or threading.Event()
    url = cfg.database_url
    migrate(url)
    engine = make_engine(url)
    sf: Callable[[], Session] = session_factory(engine)
    spool = Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir))

    if install_signals:
        def _on_signal(signum: int, _frame: Any) -> None:
            log.info("shutdown_requested", signal=signal.Signals(signum).name)
            stop.set()
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)

    threads: list[threading.Thread] = []

    def spawn(name: str, target: Callable[..., Any], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        threads.append(t)

    scp = None
    if run_scp:
        from qcnode.dicom.scp import StorageSCP
        scp = StorageSCP(cfg, sf, spool)
        scp.start()
    spawn("tracker", run_tracker, sf, cfg.series.stable_seconds, cfg.series.tracker_interval_seconds, stop)
    scheduler = None
    if run_worker:
        from qcnode.db.queue import make_owner
        from qcnode.worker import Worker
        worker = Worker(cfg, sf, spool)
        spawn("worker", worker.run, stop)
        try:
            from qcnode import outbox
        except ImportError:
            outbox = None  # type: ignore[assignment]
        if outbox is not None:
            sender = outbox.OutboxSender(cfg, sf, make_owner("outbox"))
            with sf() as s:
                from qcnode.db.models import Delivery
                from qcnode.db.queue import release_dead_local_leases
                release_dead_local_leases(s, Delivery, running_status="sending")
                s.commit()
            spawn("outbox", _loop, "outbox", sender.run_once, cfg.outbox.poll_interval_seconds, stop)
        scheduler = _start_audit(cfg, sf)
    log.info("serve_ready", scp=run_scp, worker=run_worker, port=scp.port if scp else None,
             database=engine.url.get_backend_name())
    while not stop.is_set():
        stop.wait(0.5)
    t0 = time.monotonic()
    if scp is not None:
        scp.stop(grace_seconds=30.0)
    if scheduler is not None:
        scheduler.shutdown(wait=False)
    for t in threads:  # loops stop between jobs; an interrupted job keeps its lease
        t.join(timeout=max(0.1, 10.0 - (time.monotonic() - t0)))
    alive = [t.name for t in threads if t.is_alive()]
    log.info("shutdown_complete", seconds=round(time.monotonic() - t0, 2), still_running=alive)
    engine.dispose()
    return 0


def _start_audit(cfg: Config, sf: Callable[[], Session]) -> Any:
    if not cfg.audit.enabled:
        return None
    try:
        from qcnode.audit.run import schedule
    except ImportError:
        return None
    from apscheduler.schedulers.background import BackgroundScheduler
    scheduler = BackgroundScheduler(daemon=True)
    try:
        schedule(cfg, scheduler, sf)
        scheduler.start()
    except Exception as exc:  # noqa: BLE001 - a bad audit setting must not stop receiving
        log.error("audit_schedule_failed", error=f"{type(exc).__name__}: {exc}")
        return None
    return scheduler
