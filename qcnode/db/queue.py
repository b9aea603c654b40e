"""Durable work queue in the database: jobs claimed with a lease.

``claim_rows`` is generic: any model with ``status``, ``attempts``, ``lease_owner`` and
``lease_expires_at`` columns can be claimed with it (jobs here, outbox deliveries in
``qcnode.delivery.outbox``). A row is claimable when the caller's ``due`` condition holds, or when it
is in the running state with an expired lease (its worker died). On PostgreSQL the rows are
locked with ``SELECT ... FOR UPDATE SKIP LOCKED`` so several workers never claim the same row;
on SQLite the engine starts every transaction with ``BEGIN IMMEDIATE`` (one writer at a time).

No function here commits the session it is given: the caller owns the transaction, so a claim, a
completion or a failure commits together with whatever else the caller writes (e.g. a job's
results with its completion). Only ``LeaseKeeper`` commits, in sessions of its own.
``backoff_seconds`` is the one retry policy (jobs, outbox deliveries, failed series).
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import uuid
from typing import Any, Callable, Sequence, TypeVar

import psutil
from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qcnode.db.models import Job, Series, utcnow
from qcnode.db.states import DeliveryState, JobState, SeriesState
from qcnode.log import get_logger

log = get_logger("qcnode.queue")

T = TypeVar("T")

JOB_SCORE_SERIES = "score_series"


def make_owner(role: str) -> str:
    """A lease owner id ``host:pid:role:random:start`` (pid and process start time let a restart
    release dead leases, also when the new process got the old pid, as in a restarted container)."""
    return f"{socket.gethostname()}:{os.getpid()}:{role}:{uuid.uuid4().hex[:8]}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (centiseconds since the epoch), None if it does not exist."""
    try:
        return round(psutil.Process(pid).create_time() * 100)
    except psutil.Error:
        return None


def as_utc(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite returns naive datetimes (stored as UTC): make them aware."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.timezone.utc)


def backoff_seconds(failures: int, initial: float, maximum: float) -> float:
    """Delay before the next try after ``failures`` failed tries: ``initial``, doubling with every
    further failure, at most ``maximum``."""
    return float(min(initial * 2.0 ** min(max(failures - 1, 0), 64), maximum))


def claim_rows(session: Session, model: type[T], owner: str, lease_seconds: float, *, due: Any,
               where: Any = None, running_status: str = JobState.RUNNING, order_by: Sequence[Any] = (),
               limit: int = 1, now: dt.datetime | None = None, reclaims: str | None = None) -> list[T]:
    """Claim up to ``limit`` rows of ``model`` for ``owner`` and return them (caller commits).

    A row qualifies when ``due`` (a SQL condition, e.g. ``status == 'pending'``) holds or it is in
    ``running_status`` with an expired lease. Claimed rows get ``status = running_status``, the
    lease, and ``attempts + 1``; with ``reclaims`` (a column name), a row taken over from an
    expired lease counts there instead (its process died: no attempt of its own failed).
    ``where`` (optional) restricts both cases (e.g. a kind).
    """
    now = now or utcnow()
    m: Any = model
    cond = or_(due, and_(m.status == running_status, m.lease_expires_at < now))
    if where is not None:
        cond = and_(where, cond)
    stmt = select(model).where(cond).order_by(*(order_by or (m.id,))).limit(limit)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    rows = list(session.scalars(stmt).all())
    for row in rows:
        r: Any = row
        if reclaims is not None and r.status == running_status:
            setattr(r, reclaims, (getattr(r, reclaims) or 0) + 1)
        else:
            r.attempts = (r.attempts or 0) + 1
        r.status = running_status
        r.lease_owner = owner
        r.lease_expires_at = now + dt.timedelta(seconds=lease_seconds)
    session.flush()
    return rows


def settle_attempt(row: Any, error: str | None, *, max_attempts: int, backoff_initial: float,
                   backoff_max: float, dead: bool = False) -> dict[str, Any]:
    """Record the outcome of one send attempt on a claimed outbox row (``deliveries``,
    ``alert_webhooks``): ``delivered``; or back to ``pending`` after the exponential back-off; or
    ``dead`` (a dead letter) after ``max_attempts`` or when ``dead``. Releases the lease (caller
    commits). Returns fields for the log line."""
    row.lease_owner = None
    row.lease_expires_at = None
    if error is None:
        row.status = DeliveryState.DELIVERED
        row.delivered_at = utcnow()
        row.last_error = None
        return {"outcome": "delivered"}
    row.last_error = error[:4000]
    if dead or row.attempts >= max_attempts:
        row.status = DeliveryState.DEAD
        return {"outcome": "dead"}
    delay = backoff_seconds(row.attempts, backoff_initial, backoff_max)
    row.status = DeliveryState.PENDING
    row.next_attempt_at = utcnow() + dt.timedelta(seconds=delay)
    return {"outcome": "retry", "retry_in_s": round(delay, 3)}


def renew_lease(session: Session, model: type, row_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend the lease of a row still held by ``owner``; False if it was lost (caller commits)."""
    m: Any = model
    res = session.execute(update(model).where(m.id == row_id, m.lease_owner == owner)
                          .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds)))
    return res.rowcount == 1


class LeaseLost(Exception):
    """Another owner holds the row now (our lease expired): stop working on it, record nothing."""


class LeaseKeeper:
    """Keeps the lease of a claimed row while the work on it runs: a thread renews it every third of
    ``lease_seconds``, so a long job or a slow send never outlives its lease and gets claimed
    twice. ``lost`` turns True once a renewal finds the row in another owner's hands; ``check()``
    then raises LeaseLost. Use as a context manager around the work."""

    def __init__(self, session_factory: Callable[[], Session], model: type, row_id: int, owner: str,
                 lease_seconds: float):
        self.session_factory = session_factory
        self.model = model
        self.row_id = row_id
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{model.__name__}-{row_id}", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> None:
        """Raise LeaseLost if another owner took the row."""
        if self.lost:
            raise LeaseLost(f"{self.model.__name__} {self.row_id}: lease taken over by another owner")

    def _run(self) -> None:
        while not self._stop.wait(max(self.lease_seconds / 3.0, 0.05)):
            try:
                with self.session_factory() as session:
                    held = renew_lease(session, self.model, self.row_id, self.owner, self.lease_seconds)
                    session.commit()
            except Exception as exc:  # noqa: BLE001 - a DB hiccup: try again at the next tick
                log.warning("lease_renewal_failed", table=self.model.__name__, row_id=self.row_id,
                            error=f"{type(exc).__name__}: {exc}")
                continue
            if not held:
                self.lost = True
                log.warning("lease_lost", table=self.model.__name__, row_id=self.row_id)
                return


def _owner_alive(lease_owner: str) -> bool:
    """True when the local process that took this lease still runs: its pid exists, is not a zombie
    (a killed child not yet reaped) and, where the owner id records it, started when it did."""
    parts = str(lease_owner).split(":")
    try:
        pid = int(parts[1])
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False
    except (IndexError, ValueError, psutil.Error):
        return False
    started = parts[4] if len(parts) > 4 else ""
    return not started.isdigit() or abs(int(started) - (_start_time(pid) or -10**12)) <= 1


def release_dead_local_leases(session: Session, model: type, running_status: str = JobState.RUNNING) -> int:
    """Expire leases held by processes of this host that no longer exist (after kill -9 and restart),
    so their rows are picked up at once instead of after the lease time. Returns the count (caller
    commits)."""
    m: Any = model
    host = socket.gethostname() + ":"
    rows = session.execute(select(m.id, m.lease_owner).where(
        m.status == running_status, m.lease_owner.like(host + "%"))).all()
    dead = []
    for row_id, lease_owner in rows:
        if not _owner_alive(lease_owner):
            dead.append(row_id)
    if dead:
        session.execute(update(model).where(m.id.in_(dead)).values(lease_expires_at=utcnow()
                                                                    - dt.timedelta(seconds=1)))
    return len(dead)


# ---- jobs ----------------------------------------------------------------------------------------
def enqueue_job(session: Session, kind: str, series_id: int, series_version: int) -> bool:
    """Insert a pending job unless one exists for (kind, series, version). True if inserted (caller
    commits)."""
    exists = session.scalar(select(Job.id).where(Job.kind == kind, Job.series_id == series_id,
                                                 Job.series_version == series_version))
    if exists is not None:
        return False
    try:
        with session.begin_nested():
            session.add(Job(kind=kind, series_id=series_id, series_version=series_version))
    except IntegrityError:  # inserted concurrently by another process
        return False
    return True


def claim_job(session: Session, owner: str, lease_seconds: float, max_interruptions: int,
              kinds: Sequence[str] = (JOB_SCORE_SERIES,)) -> Job | None:
    """Claim the oldest due job (pending, or running with an expired lease); the caller commits the
    claim (also when None is returned: jobs given up on the way are committed with it).

    Taking over an expired lease counts as an interruption (``jobs.interruptions``), not an
    attempt: the job's process died (kill, crash, power loss), the job itself did not fail. A job
    interrupted more than ``max_interruptions`` times (it may be what kills its process) gives up,
    and the next due job is claimed instead.
    """
    while True:
        now = utcnow()
        rows = claim_rows(session, Job, owner, lease_seconds, now=now,
                          due=and_(Job.status == JobState.PENDING, Job.not_before <= now),
                          where=Job.kind.in_(kinds), order_by=(Job.not_before, Job.id), reclaims="interruptions")
        if not rows:
            return None
        job = rows[0]
        if job.interruptions <= max_interruptions:
            return job
        give_up(session, job, f"its process died {job.interruptions} times while running it (lease expired)")
        session.flush()


def give_up(session: Session, job: Job, reason: str) -> None:
    """Mark ``job`` failed and its series round ``failed`` (an alert: error log, ``qcnode status``;
    the series tracker queues it again after a back-off, ``qcnode rescore`` at once). Caller commits."""
    job.status = JobState.FAILED
    job.lease_owner = None
    job.lease_expires_at = None
    job.finished_at = utcnow()
    job.last_error = (f"gave up: {reason}" + (f" | {job.last_error}" if job.last_error else ""))[:4000]
    # only the round this job was for: a series that received new instances since is a new round
    session.execute(update(Series).where(Series.id == job.series_id, Series.version == job.series_version,
                                         Series.status == SeriesState.STABLE)
                    .values(status=SeriesState.FAILED, failures=Series.failures + 1, retry_at=None))
    log.error("series_gave_up", job_id=job.id, series_id=job.series_id, version=job.series_version,
              attempts=job.attempts, interruptions=job.interruptions, reason=reason,
              error=(job.last_error or "").splitlines()[0][:300])


def complete_job(session: Session, job: Job, note: str | None = None) -> None:
    """Mark ``job`` done (caller commits, typically together with the job's results)."""
    job.status = JobState.DONE
    job.finished_at = utcnow()
    job.lease_owner = None
    job.lease_expires_at = None
    if note:
        job.last_error = note


def fail_job(session: Session, job_id: int, error: str, max_attempts: int,
             retry_delay_seconds: float, owner: str | None = None) -> str:
    """Record a failed attempt: back to pending after a delay, or ``failed`` after max_attempts.

    With ``owner``, only while that owner still holds the job (a worker whose lease expired must
    not reset the job another worker runs now): else nothing changes and "lease_lost" is returned.
    Returns the new status; the caller commits.
    """
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        return "missing"
    if owner is not None and job.lease_owner != owner:
        return "lease_lost"
    job.last_error = error[:4000]
    job.lease_owner = None
    job.lease_expires_at = None
    if job.attempts >= max_attempts:
        give_up(session, job, f"failed {job.attempts} times")
    else:
        job.status = JobState.PENDING
        job.not_before = utcnow() + dt.timedelta(seconds=retry_delay_seconds)
    return job.status
