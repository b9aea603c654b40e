"""``qcnode serve``: the long-running node, one parent process and its children.

What runs where (``plan_processes``): the parent runs the Storage SCP (a thread per association);
``node.scp_processes`` > 1 adds children ``scp1``, ... on the same port. The tracker, the scoring
worker, the outbox sender, the alert webhooks (when configured) and the nightly audit run in a niced child ``worker``
(``worker.separate_process``), or as threads of the parent without the SCP (``--no-scp``) or
without ``separate_process``. Children die with the parent (kill -9 too) and restart if they exit.
SIGTERM/SIGINT: stop accepting, finish in-flight C-STOREs, stop the loops between jobs (an
interrupted job keeps its lease), exit 0. The parent migrates the database on start and, with
``privacy.pseudonymise_patient_id`` on, pseudonymises IDs stored raw while it was off.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy.orm import Session

from qcnode.config import Config
from qcnode.db.engine import make_engine, session_factory
from qcnode.db.migrate import migrate
from qcnode.ingest.spool import Spool
from qcnode.log import configure_logging, get_logger
from qcnode.service.children import ChildProcess
from qcnode.service.loop import ServiceLoop
from qcnode.service.memory import keep_freed_buffers

log = get_logger("qcnode.daemon")

# many association threads hand work to each other (reactor -> handler -> group-commit writer):
# a 1 ms GIL switch interval (Python's default is 5 ms) cuts their latency
SCP_GIL_SWITCH_INTERVAL_S = 0.001


@dataclass(frozen=True)
class ServeOptions:
    """What ``qcnode serve`` is asked to run; None takes the config's setting."""
    scp: bool = True                    # receive (False: --no-scp / --worker-only)
    worker: bool | None = None          # score, deliver, audit (False: --no-worker; None: worker.enabled)
    worker_process: bool | None = None  # that side in a child process (None: worker.separate_process)
    scp_processes: int | None = None    # receiving processes (None: node.scp_processes)


@dataclass(frozen=True)
class Roles:
    """What one process of ``serve`` runs."""
    scp: bool = False      # the Storage SCP
    tracker: bool = False  # the series tracker
    worker: bool = False   # the scoring worker, the outbox sender and the nightly audit
    http: bool = False     # the HTTP server (health checks, DICOMweb in): a process of its own


@dataclass(frozen=True)
class ChildSpec:
    """A child process of ``serve``; an SCP child serves slot ``listener_slot`` of the shared port."""
    name: str
    roles: Roles
    nice: int = 0
    listener_slot: int | None = None


@dataclass(frozen=True)
class ProcessPlan:
    """The roles of this process and the children it starts and keeps alive."""
    roles: Roles
    children: tuple[ChildSpec, ...] = ()
    migrate_db: bool = True  # the parent migrates; children find the schema ready
    scp_processes_configured: int = 0  # more than run: the fast path is off (no shared listener)

    @property
    def scp_children(self) -> tuple[ChildSpec, ...]:
        return tuple(c for c in self.children if c.listener_slot is not None)

    @property
    def runs_worker(self) -> bool:
        """Whether this process or one of its children scores."""
        return self.roles.worker or any(c.roles.worker for c in self.children)


def _fast_dicom_reading() -> None:
    """Skip pydicom's per-value regex validation while reading (it only ever warns).

    The node checks what it relies on itself (UIDs used in paths, pixel module sizes); pydicom's
    validation of every value read (also in pynetdicom's DIMSE layer) is a large share of the
    receive CPU.
    """
    import pydicom.config
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def plan_processes(cfg: Config, options: ServeOptions) -> ProcessPlan:
    """Which roles run in this process and which in child processes (see the module docstring).

    Receiving is CPU-bound Python: more SCP processes share the port, and scoring runs in its own
    process so that it never holds the receiving process's GIL."""
    run_worker = cfg.worker.enabled if options.worker is None else options.worker
    separate = cfg.worker.separate_process if options.worker_process is None else options.worker_process
    worker_child = options.scp and run_worker and separate
    n_scp = 0
    if options.scp:
        n_scp = options.scp_processes if options.scp_processes is not None else _scp_process_count(cfg)
    configured = n_scp
    if n_scp > 1:
        from qcnode.net.compat import fast_path_active
        if not fast_path_active(cfg.node.fast_path):  # the shared listener is part of the fast path
            n_scp = 1
    children = [ChildSpec(f"scp{i}", Roles(scp=True), listener_slot=i) for i in range(1, n_scp)]
    if worker_child:
        children.append(ChildSpec("worker", Roles(tracker=True, worker=True), nice=cfg.worker.nice))
    if cfg.http.enabled:  # on receiving and on worker-only nodes alike (health checks, DICOMweb in)
        children.append(ChildSpec("http", Roles(http=True)))
    here = Roles(scp=options.scp, tracker=not worker_child, worker=run_worker and not worker_child)
    return ProcessPlan(here, tuple(children), scp_processes_configured=configured)


def serve(cfg: Config, options: ServeOptions = ServeOptions(), stop: threading.Event | None = None,
          ready: Any = None) -> int:
    """Run the daemon until SIGTERM/SIGINT (or ``stop`` is set); returns the exit code.
    ``ready`` (an Event, optional) is set once every receiving process listens."""
    return run_process(cfg, plan_processes(cfg, options), stop=stop, ready=ready)


def run_process(cfg: Config, plan: ProcessPlan, stop: threading.Event | None = None, ready: Any = None,
                listener: Any = None) -> int:
    """Run the roles of ``plan`` in this process and keep its children alive until ``stop`` is set
    or a signal arrives, then shut down; returns the exit code. ``listener``: an SCP child's share
    of the parent's listening socket."""
    os.umask(0o077)  # database, spool, quarantine, logs: owner-only (0600 files, 0700 folders)
    _fast_dicom_reading()
    configure_logging(cfg.logging.level, cfg.path(cfg.logging.file) if cfg.logging.file else None)
    roles = plan.roles
    if plan.scp_processes_configured > 1 + len(plan.scp_children):
        log.info("scp_processes_reduced", scp_processes=1 + len(plan.scp_children),
                 configured=plan.scp_processes_configured, reason="fast path off")
    if roles.scp:
        sys.setswitchinterval(SCP_GIL_SWITCH_INTERVAL_S)
        if not roles.worker:  # scoring in this process would be slower with them
            log.debug("malloc_thresholds", set=keep_freed_buffers())
    stop = stop or threading.Event()
    url = cfg.database_url
    if plan.migrate_db:
        migrate(url)
    engine = make_engine(url)
    from qcnode.db.clock import check_clock
    check_clock(engine, min(cfg.worker.lease_seconds, cfg.outbox.lease_seconds))
    sf: Callable[[], Session] = session_factory(engine)
    if plan.migrate_db and cfg.privacy.pseudonymise_patient_id:
        _pseudonymise_stored_ids(cfg, sf)
    spool = Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir))
    _stop_on_signals(stop)

    # bound before anything starts, so that a port in use ends serve with one line
    http_sock = _http_socket(cfg) if any(c.roles.http for c in plan.children) else None
    scp = None
    children: list[ChildProcess] = []
    threads: list[threading.Thread] = []
    scheduler = None
    try:  # whatever fails on the way up, what was started is stopped again
        if roles.scp:
            scp = _start_receiving(cfg, plan, sf, spool, listener, children)
        for spec in plan.children:
            if spec.listener_slot is None:
                children.append(ChildProcess(cfg, spec, http_sock if spec.roles.http else None))
                children[-1].start()
        threads = [loop.start(stop) for loop in _service_loops(cfg, roles, sf, spool)]
        scheduler = _start_audit(cfg, sf) if roles.worker else None
        for child in children:  # serve_ready: the HTTP server answers too
            if child.spec.roles.http:
                child.wait_ready(timeout=60.0)
        log.info("serve_ready", scp=roles.scp, worker=plan.runs_worker, port=scp.port if scp else None,
                 database=engine.url.get_backend_name(), children={c.role: c.pid for c in children})
        if ready is not None:
            ready.set()
        while not stop.is_set():
            stop.wait(0.5)
            if not stop.is_set():
                for child in children:
                    child.keep_alive()
    finally:
        stop.set()
        _shut_down(scp, children, scheduler, threads)
        engine.dispose()
    return 0


def _pseudonymise_stored_ids(cfg: Config, sf: Callable[[], Session]) -> None:
    """Pseudonymise the IDs stored raw while ``privacy.pseudonymise_patient_id`` was off, with the
    key ingest uses, so that none is shown as a pseudonym and later studies match them."""
    from qcnode.db.pseudonyms import pseudonymise_stored_ids
    from qcnode.dicom.privacy import load_or_create_key
    key = load_or_create_key(cfg.path(cfg.privacy.pseudonym_key_file))
    with sf() as s:
        n = pseudonymise_stored_ids(s, key)
        s.commit()
    if n:
        log.info("stored_ids_pseudonymised", studies=n)


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop``."""
    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        stop.set()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)


def _start_receiving(cfg: Config, plan: ProcessPlan, sf: Callable[[], Session], spool: Spool,
                     listener: Any, children: list[ChildProcess]) -> Any:
    """Start the SCP children (on a shared listening socket, opened here; appended to ``children``
    as they start) and wait until they listen, then this process's SCP; returns the SCP."""
    from qcnode.ingest.scp import StorageSCP
    if listener is None and plan.scp_children:
        from qcnode.net.listener import open_shared_listener
        listener = open_shared_listener(cfg.node.host, cfg.node.port, 1 + len(plan.scp_children))
        for spec in plan.scp_children:
            children.append(ChildProcess(cfg, spec, listener.for_process(spec.listener_slot)))
            children[-1].start()
        for child in children:  # so that serve_ready means every receiving process is up
            child.wait_ready(timeout=120.0)
    scp = StorageSCP(cfg, sf, spool)
    scp.start(listener=listener)
    return scp


def _http_socket(cfg: Config) -> Any:
    from qcnode.http.server import http_socket
    return http_socket(cfg)


def _service_loops(cfg: Config, roles: Roles, sf: Callable[[], Session], spool: Spool) -> list[ServiceLoop]:
    """The background loops of ``roles``: tracker; worker, outbox sender and alert webhooks."""
    loops = []
    if roles.tracker:
        from qcnode.tracking.series import track_once
        loops.append(ServiceLoop("tracker", functools.partial(track_once, sf, cfg.series.stable_seconds,
                                                              cfg.worker.retry_failed_seconds),
                                 cfg.series.tracker_interval_seconds, logger="qcnode.series"))
    if roles.worker:
        from qcnode.db.models import Delivery
        from qcnode.db.states import DeliveryState
        from qcnode.db.queue import make_owner, release_dead_local_leases
        from qcnode.delivery.outbox import OutboxSender
        from qcnode.scoring.worker import Worker
        from qcnode.service.publish import ReportPublisher
        worker = Worker(cfg, sf, spool, ReportPublisher(cfg))
        loops.append(ServiceLoop("worker", worker.run_once, cfg.worker.poll_interval_seconds,
                                 setup=worker.prepare, error_event="worker_loop_error", logger="qcnode.worker"))
        sender = OutboxSender(cfg, sf, make_owner("outbox"))
        with sf() as s:
            release_dead_local_leases(s, Delivery, running_status=DeliveryState.SENDING)
            s.commit()
        loops.append(ServiceLoop("outbox", sender.run_once, cfg.outbox.poll_interval_seconds))
        if cfg.alerts.webhook_verdict_fail or cfg.alerts.webhook_audit_flag:
            from qcnode.alerts.webhooks import WebhookSender
            hooks = WebhookSender(cfg, sf, make_owner("webhooks"))
            loops.append(ServiceLoop("webhooks", hooks.run_once, cfg.outbox.poll_interval_seconds))
    return loops


def _shut_down(scp: Any, children: list[ChildProcess], scheduler: Any, threads: list[threading.Thread]) -> None:
    """Stop receiving (children first), wait for the children, stop the audit and the loops."""
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


def _scp_process_count(cfg: Config) -> int:
    """``node.scp_processes``; 0 = one per CPU core, at most 2 (each is a whole interpreter in memory)."""
    n = cfg.node.scp_processes
    return n if n > 0 else max(1, min(2, os.cpu_count() or 1))


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
