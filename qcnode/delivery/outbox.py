"""Outbox: durable delivery of SRs, Quality Issue KOS and series forwarded by verdict.

``enqueue`` adds one ``deliveries`` row per destination and payload kind in the caller's
transaction (the worker commits it with the result). ``OutboxSender.run_once`` claims due rows
with a lease (``qcnode.db.queue.claim_rows``: FOR UPDATE SKIP LOCKED on PostgreSQL, BEGIN
IMMEDIATE on SQLite), sends them with the sender of the destination's type (``send_payload``: the
C-STORE SCU, or STOW-RS for ``type = "dicomweb"``) and records the outcome (``DeliveryState``):
``delivered``, or back to ``pending`` with exponential back-off (``qcnode.db.queue.backoff_seconds``),
or ``dead`` after ``outbox.max_attempts`` (at once when the sender says a retry cannot help:
``DeliveryError.permanent``).
The lease is renewed while a send runs (``LeaseKeeper``), so a slow destination never gets the
same payload twice. A delivery whose round is superseded (``qcnode.db.states.superseded``: its
series has since received new instances) is not sent: it is marked ``superseded`` (the next
round's result brings its own SR and routing by its own verdict).
Status lives in SQL: ``SELECT destination, kind, status, attempts, last_error FROM deliveries``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from sqlalchemy import and_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qcnode.config import Config, Destination
from qcnode.db.models import Delivery, Instance, Series, SeriesResult, Study, utcnow
from qcnode.db.queue import LeaseKeeper, claim_rows, settle_attempt
from qcnode.db.states import DeliveryState, superseded
from qcnode.delivery.scu import DeliveryError, send_datasets
from qcnode.log import get_logger

log = get_logger("qcnode.outbox")  # the name logs had before the move to delivery/

KIND_SR = "sr"
KIND_SERIES = "series"
KIND_KOS = "kos"  # by verdict only ("kos:FAIL", "kos:WARN"): the failing slices, see qcnode.report.kos


def payload_kinds(destination: Destination, verdict: str) -> list[str]:
    """Payload kinds a destination gets for a result with ``verdict`` (by its ``send`` rules)."""
    kinds = []
    if KIND_SR in destination.send:
        kinds.append(KIND_SR)
    if KIND_SERIES in destination.send or f"{KIND_SERIES}:{verdict}" in destination.send:
        kinds.append(KIND_SERIES)
    if f"{KIND_KOS}:{verdict}" in destination.send:
        kinds.append(KIND_KOS)
    return kinds


def wants_kind(cfg: Config, verdict: str, kind: str) -> bool:
    """Whether any destination gets ``kind`` for a result with ``verdict``."""
    return any(kind in payload_kinds(d, verdict) for d in cfg.destinations)


def kos_relpath(study_uid: str, series_uid: str, model_version: str, result_version: int) -> str:
    """Spool path of the Quality Issue KOS of one result (derived: no column needed)."""
    from qcnode.report.kos import kos_sop_uid
    from qcnode.ingest.spool import Spool
    return Spool.sr_relpath(study_uid, series_uid, kos_sop_uid(series_uid, model_version, result_version))


def enqueue(session: Session, series_result: SeriesResult, cfg: Config) -> list[Delivery]:
    """Add the deliveries of ``series_result`` (idempotent; the caller commits).

    Returns every delivery of the result for the configured destinations, old and new.
    """
    if series_result.id is None:
        session.flush()
    existing = {(d.destination, d.kind): d for d in session.scalars(
        select(Delivery).where(Delivery.series_result_id == series_result.id))}
    out: list[Delivery] = []
    for dest in cfg.destinations:
        for kind in payload_kinds(dest, series_result.verdict):
            row = existing.get((dest.name, kind))
            if row is None:
                row = Delivery(series_result_id=series_result.id, destination=dest.name, kind=kind,
                               status=DeliveryState.PENDING, attempts=0, next_attempt_at=utcnow())
                try:
                    with session.begin_nested():
                        session.add(row)
                except IntegrityError:  # enqueued concurrently
                    row = session.scalars(select(Delivery).where(
                        Delivery.series_result_id == series_result.id,
                        Delivery.destination == dest.name, Delivery.kind == kind)).one()
            out.append(row)
    return out


def send_payload(cfg: Config, dest: Destination, paths: list[Path]) -> None:
    """Send ``paths`` to ``dest`` with the sender of its ``type``: the one dispatch point.

    Every sender raises ``DeliveryError`` (``permanent`` when a retry cannot help).
    """
    timeout = dest.timeout_seconds or cfg.outbox.send_timeout_seconds
    if dest.type == "dicomweb":
        from qcnode.delivery.dicomweb import stow_files
        stow_files(dest, paths, timeout, base_dir=cfg.base_dir)
    else:
        send_datasets(dest, paths, cfg.node.ae_title, timeout, base_dir=cfg.base_dir)


class OutboxSender:
    """Sends due deliveries; ``run_once`` is called in a loop by ``qcnode serve``."""

    def __init__(self, cfg: Config, session_factory: Callable[[], Session], owner: str):
        self.cfg = cfg
        self.session_factory = session_factory
        self.owner = owner
        self.spool_dir = cfg.path(cfg.storage.spool_dir)
        self.destinations = {d.name: d for d in cfg.destinations}

    # -- claiming ---------------------------------------------------------------------------
    def _claim(self) -> tuple[int, str, str, int, int] | None:
        """Claim one due delivery; returns (id, destination, kind, series_result_id, attempts)."""
        with self.session_factory() as session:
            now = utcnow()
            rows = claim_rows(session, Delivery, self.owner, self.cfg.outbox.lease_seconds, now=now,
                              due=and_(Delivery.status == DeliveryState.PENDING, Delivery.next_attempt_at <= now),
                              running_status=DeliveryState.SENDING,
                              order_by=(Delivery.next_attempt_at, Delivery.id))
            if not rows:
                session.commit()
                return None
            d = rows[0]
            claimed = (d.id, d.destination, d.kind, d.series_result_id, d.attempts)
            session.commit()
            return claimed

    # -- payloads ---------------------------------------------------------------------------
    def _payload(self, session: Session, kind: str, series_result_id: int) -> list[Path] | None:
        """Files to send; None when the result is superseded (its series received new instances)."""
        result = session.get(SeriesResult, series_result_id)
        if result is None:
            raise DeliveryError(f"series result {series_result_id} no longer exists")
        series = session.get(Series, result.series_id)
        if series is not None and superseded(series.version, series.status, result.version):
            return None
        if kind == KIND_SR:
            if not result.sr_path:
                raise DeliveryError(f"series result {series_result_id} has no SR file yet")
            return [self.spool_dir / result.sr_path]
        if kind == KIND_KOS:
            study = session.get(Study, series.study_id) if series is not None else None
            if study is None:
                raise DeliveryError(f"series of result {series_result_id} no longer exists")
            path = self.spool_dir / kos_relpath(study.study_instance_uid, series.series_instance_uid,
                                                result.model_version, result.version)
            if not path.exists():
                raise DeliveryError(f"series result {series_result_id} has no KOS file")
            return [path]
        if kind == KIND_SERIES:
            rows = session.scalars(select(Instance.spool_path).where(Instance.series_id == result.series_id)
                                   .order_by(Instance.instance_number, Instance.id)).all()
            if not rows:
                raise DeliveryError(f"series of result {series_result_id} has no stored instances")
            return [self.spool_dir / p for p in rows]
        raise DeliveryError(f"unknown delivery kind {kind!r}")

    # -- one delivery -----------------------------------------------------------------------
    def _finish(self, delivery_id: int, error: str | None, dead: bool = False,
                superseded: bool = False) -> dict[str, Any]:
        """Record the outcome if we still hold the lease; returns fields for the log line."""
        with self.session_factory() as session:
            d = session.get(Delivery, delivery_id, with_for_update=True)
            if d is None or d.lease_owner != self.owner or d.status != DeliveryState.SENDING:
                session.commit()
                return {"outcome": "lease_lost"}
            if superseded:
                d.lease_owner = None
                d.lease_expires_at = None
                d.status = DeliveryState.SUPERSEDED
                d.last_error = "not sent: the series received new instances; the next result is sent instead"
                info: dict[str, Any] = {"outcome": str(DeliveryState.SUPERSEDED)}
            else:
                ob = self.cfg.outbox
                info = settle_attempt(d, error, max_attempts=ob.max_attempts, backoff_initial=ob.backoff_initial_seconds,
                                      backoff_max=ob.backoff_max_seconds, dead=dead)
            session.commit()
            return info

    def _deliver(self, claimed: tuple[int, str, str, int, int]) -> str:
        delivery_id, dest_name, kind, series_result_id, attempts = claimed
        fields = {"delivery_id": delivery_id, "destination": dest_name, "kind": kind,
                  "series_result_id": series_result_id, "attempt": attempts}
        dest = self.destinations.get(dest_name)
        error: str | None = None
        dead = superseded = False
        n = 0
        if dest is None:
            error, dead = f"destination {dest_name!r} is no longer configured", True
        elif attempts > self.cfg.outbox.max_attempts:  # lease expired again and again
            error, dead = f"gave up after {attempts - 1} attempts (sender kept dying)", True
        else:
            try:
                with self.session_factory() as session:
                    paths = self._payload(session, kind, series_result_id)
                if paths is None:
                    superseded = True
                else:
                    n = len(paths)
                    with LeaseKeeper(self.session_factory, Delivery, delivery_id, self.owner,
                                     self.cfg.outbox.lease_seconds):
                        send_payload(self.cfg, dest, paths)
            except DeliveryError as exc:
                error, dead = str(exc), exc.permanent
            except Exception as exc:  # noqa: BLE001 - any failure is recorded, never lost
                error = f"{type(exc).__name__}: {exc}"
        info = self._finish(delivery_id, error, dead, superseded)
        if error is None:
            log.info("delivery_attempt", **fields, instances=n, **info)
        else:
            log.warning("delivery_attempt", **fields, error=error, **info)
        return info["outcome"]

    def run_once(self) -> int:
        """Send up to ``outbox.batch_size`` due deliveries; returns how many were attempted."""
        done = 0
        while done < max(1, self.cfg.outbox.batch_size):
            claimed = self._claim()
            if claimed is None:
                break
            self._deliver(claimed)
            done += 1
        return done
