"""``qcnode serve``: the long-running process.

Threads: the Storage SCP (pynetdicom, one thread per association), the series tracker, the
scoring worker, the outbox sender, the alert webhooks (when configured), and the nightly audit
(APScheduler). SIGTERM/SIGINT: stop accepting associations, let the in-flight C-STORE finish, stop
the loops between jobs (a job interrupted mid-way keeps its lease and is retried: after a restart
on this host at once, elsewhere when the lease expires), exit 0. The database is migrated on start.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from sqlalchemy.orm import Session

from qcnode.config import Config
from qcnode.db.engine import make_engine, session_factory
from qcnode.db.migrate import migrate
from qcnode.tracking.series import run_tracker as run_tracker_loop
from qcnode.ingest.spool import Spool
from qcnode.log import configure_logging, get_logger
from qcnode.service.memory import keep_freed_buffers

log = get_logger("qcnode.daemon")

SCP_GIL_SWITCH_INTERVAL_S = 0.001


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
          stop: threading.Event | None = None, install_signals: bool = True,
          worker_process: bool | None = None, migrate_db: bool = True,
          scp_processes: int | None = None, run_tracker: bool = True, listener: Any = None,
          ready: Any = None) -> int:
    """Run the daemon until SIGTERM/SIGINT (or ``stop`` is set). Returns the exit code.

    Receiving is CPU-bound Python, so ``serve`` spreads it over processes: with ``node.scp_processes``
    > 1 (0 = one per core) more SCP processes serve the same listening socket, each taking new
    associations while it is the least busy (``qcnode.net.listener``); with both the SCP and
    the worker, the worker side (tracker, worker, outbox, audit) runs in a child process at lower
    priority (``worker.separate_process``, ``worker.nice``), so scoring never holds the receiving
    process's GIL. Children die with this process (also on kill -9) and are restarted if they exit.
    ``ready`` (an Event, optional) is set once this process listens / runs.
    """
    os.umask(0o077)  # database, spool, quarantine, logs: owner-only (0600 files, 0700 folders)
    _fast_dicom_reading()
    configure_logging(cfg.logging.level, cfg.path(cfg.logging.file) if cfg.logging.file else None)
    run_worker = cfg.worker.enabled if run_worker is None else run_worker
    worker_process = cfg.worker.separate_process if worker_process is None else worker_process
    child_worker = bool(run_scp and run_worker and worker_process)
    if run_scp:
        # many association threads hand work to each other (reactor -> handler -> group-commit writer):
        # a 1 ms GIL switch interval (Python's default is 5 ms) cut receive latency, +15-20 % slices/s
        sys.setswitchinterval(SCP_GIL_SWITCH_INTERVAL_S)
        if not run_worker or child_worker:  # scoring in this process would be slower with them
            log.debug("malloc_thresholds", set=keep_freed_buffers())
    n_scp = (scp_processes if scp_processes is not None else _scp_process_count(cfg)) if run_scp else 0
    stop = stop or threading.Event()
    url = cfg.database_url
    if migrate_db:
        migrate(url)
    engine = make_engine(url)
    from qcnode.db.clock import check_clock
    check_clock(engine, min(cfg.worker.lease_seconds, cfg.outbox.lease_seconds))
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
    children: list[ChildProcess] = []
    if run_scp:
        from qcnode.ingest.scp import StorageSCP
        if listener is None and n_scp > 1:
            from qcnode.net.listener import open_shared_listener
            listener = open_shared_listener(cfg.node.host, cfg.node.port, n_scp)
            children += [ChildProcess(cfg, f"scp{i}", nice=0, run_scp=True, run_worker=False, scp_processes=1,
                                      listener=listener.for_process(i), run_tracker=False)
                         for i in range(1, n_scp)]
            for child in children:
                child.start()
            for child in children:  # so that serve_ready means every receiving process is up
                child.wait_ready(timeout=120.0)
        scp = StorageSCP(cfg, sf, spool)
        scp.start(listener=listener)
    if child_worker:
        children.append(ChildProcess(cfg, "worker", nice=cfg.worker.nice, run_scp=False, run_worker=True))
        children[-1].start()
    elif run_tracker:
        spawn("tracker", run_tracker_loop, sf, cfg.series.stable_seconds, cfg.series.tracker_interval_seconds,
              stop, cfg.worker.retry_failed_seconds)
    scheduler = None
    if run_worker and not child_worker:
        from qcnode.db.queue import make_owner
        from qcnode.scoring.worker import Worker
        worker = Worker(cfg, sf, spool)
        spawn("worker", worker.run, stop)
        try:
            from qcnode.delivery import outbox
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
        if cfg.alerts.webhook_verdict_fail or cfg.alerts.webhook_audit_flag:
            from qcnode.alerts.webhooks import WebhookSender
            hooks = WebhookSender(cfg, sf, make_owner("webhooks"))
            spawn("webhooks", _loop, "webhooks", hooks.run_once, cfg.outbox.poll_interval_seconds, stop)
        scheduler = _start_audit(cfg, sf)
    log.info("serve_ready", scp=run_scp, worker=run_worker, port=scp.port if scp else None,
             database=engine.url.get_backend_name(), children={c.role: c.pid for c in children})
    if ready is not None:
        ready.set()
    while not stop.is_set():
        stop.wait(0.5)
        if not stop.is_set():
            for child in children:
                child.keep_alive()
    t0 = time.monotonic()
    for child in children:  # SCP children: stop accepting, finish their in-flight C-STOREs
        child.terminate()
    if scp is not None:
        scp.stop(grace_seconds=30.0)
    for child in children:
        child.join(timeout=max(1.0, 35.0 - (time.monotonic() - t0)))
    if scheduler is not None:
        scheduler.shutdown(wait=False)
    for t in threads:  # loops stop between jobs; an interrupted job keeps its lease
        t.join(timeout=max(0.1, 10.0 - (time.monotonic() - t0)))
    alive = [t.name for t in threads if t.is_alive()]
    log.info("shutdown_complete", seconds=round(time.monotonic() - t0, 2), still_running=alive)
    engine.dispose()
    return 0


def _scp_process_count(cfg: Config) -> int:
    """``node.scp_processes``; 0 = one per CPU core, at most 2 (each costs ~110 MB resident)."""
    n = cfg.node.scp_processes
    return n if n > 0 else max(1, min(2, os.cpu_count() or 1))


class ChildProcess:
    """A part of ``serve`` in a child process: more SCP processes, or the worker side.

    Started with ``multiprocessing`` (spawn: a fresh interpreter, so no GIL is shared), optionally
    niced, and killed by the kernel if this process dies (kill -9 included: PR_SET_PDEATHSIG), so a
    crash leaves no orphan behind and a dead worker's job lease is released by the next start.
    Restarted with a growing back-off if it exits on its own.
    """

    def __init__(self, cfg: Config, role: str, nice: int = 0, **serve_kwargs: Any):
        self.cfg = cfg
        self.role = role
        self.nice = nice
        self.serve_kwargs = serve_kwargs
        self.proc: Any = None
        self.ready: Any = None
        self._restart_at = 0.0
        self._started_at = 0.0
        self._backoff = 1.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        self.ready = ctx.Event()
        self.proc = ctx.Process(target=_child_main, args=(self.cfg, os.getpid(), self.nice,
                                                          {**self.serve_kwargs, "ready": self.ready}),
                                name=f"qcnode-{self.role}", daemon=False)
        self.proc.start()
        self._started_at = time.monotonic()
        log.info("child_process_started", role=self.role, pid=self.proc.pid, nice=self.nice)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the child runs (an SCP child: listens); False on timeout or if it died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready.wait(0.2):
                return True
            if not self.proc.is_alive():
                break
        log.error("child_process_not_ready", role=self.role, pid=self.proc.pid, exitcode=self.proc.exitcode)
        return False

    def keep_alive(self) -> None:
        """Restart the child (with a growing back-off) if it exited unexpectedly."""
        if self.proc is None or self.proc.is_alive():
            return
        now = time.monotonic()
        if not self._restart_at:  # just noticed
            if now - self._started_at > 300:  # it had run fine for a while: retry quickly
                self._backoff = 1.0
            log.error("child_process_died", role=self.role, pid=self.proc.pid, exitcode=self.proc.exitcode,
                      restart_in_s=self._backoff)
            self._restart_at = now + self._backoff
        elif now >= self._restart_at:
            self._restart_at = 0.0
            self._backoff = min(self._backoff * 2, 60.0)
            self.start()

    def terminate(self) -> None:
        """SIGTERM: the child shuts down gracefully (as ``serve`` does on SIGTERM)."""
        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()

    def join(self, timeout: float) -> None:
        """Wait for the child to exit; SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        self.proc.join(timeout)
        if self.proc.is_alive():
            log.warning("child_process_killed", role=self.role, pid=self.proc.pid)
            self.proc.kill()
            self.proc.join(5)


def _child_main(cfg: Config, parent_pid: int, nice: int, serve_kwargs: dict[str, Any]) -> None:
    """Entry point of a child process of ``serve``."""
    _die_with_parent(parent_pid)
    if nice:
        try:
            os.nice(int(nice))
        except OSError:
            pass
    stop = threading.Event()

    def watch_parent() -> None:  # where PR_SET_PDEATHSIG is unavailable
        while not stop.wait(1.0):
            if os.getppid() != parent_pid:
                os._exit(1)
    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    code = serve(cfg, stop=stop, worker_process=False, migrate_db=False, **serve_kwargs)
    raise SystemExit(code)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


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
