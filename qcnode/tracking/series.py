"""Series tracking: a series is ready for scoring after ``stable_seconds`` without a new instance.

The SCP sets ``status = 'receiving'`` and ``last_received_at`` on every instance. The tracker
turns quiet ``receiving`` series into ``stable`` ones, bumping ``series.version`` and queueing a
``score_series`` job for that version in the same transaction. The conditional UPDATE plus the
unique (kind, series, version) constraint on jobs make a double queueing impossible, even with
several tracker processes. A late instance sets ``receiving`` again: the next round gets version+1.
A series whose job gave up (``failed``) is queued again after a back-off, or by ``qcnode rescore``.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Callable

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from qcnode.db.models import Series, utcnow
from qcnode.db.queue import JOB_SCORE_SERIES, backoff_seconds, enqueue_job
from qcnode.db.states import SeriesState
from qcnode.log import get_logger

log = get_logger("qcnode.series")


def _queue_round(session_factory: Callable[[], Session], series_id: int, *conditions: Any) -> int | None:
    """Set the series ``stable`` with version + 1 and queue its scoring job, in one transaction,
    if ``conditions`` still hold; returns the new version (None: they did not, nothing changed)."""
    with session_factory() as session:
        res = session.execute(update(Series).where(Series.id == series_id, *conditions)
                              .values(status=SeriesState.STABLE, version=Series.version + 1, retry_at=None))
        if res.rowcount != 1:  # another tracker got it, or an instance just arrived
            session.rollback()
            return None
        version = int(session.scalar(select(Series.version).where(Series.id == series_id)))
        enqueue_job(session, JOB_SCORE_SERIES, series_id, version)
        session.commit()
    return version


def mark_stable_series(session_factory: Callable[[], Session], stable_seconds: float,
                       now: dt.datetime | None = None) -> list[tuple[int, int]]:
    """Queue a scoring job for every series quiet for ``stable_seconds``; returns (series_id, version)."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=stable_seconds)
    with session_factory() as session:
        ids = list(session.scalars(select(Series.id).where(Series.status == SeriesState.RECEIVING,
                                                           Series.last_received_at < cutoff)))
        session.commit()
    queued: list[tuple[int, int]] = []
    for series_id in ids:
        version = _queue_round(session_factory, series_id, Series.status == SeriesState.RECEIVING,
                               Series.last_received_at < cutoff)
        if version is not None:
            log.info("series_stable", series_id=series_id, version=version)
            queued.append((series_id, version))
    return queued


RETRY_FAILED_MAX_SECONDS = 86400.0


def retry_delay(failures: int, base_seconds: float) -> float:
    """Back-off before a failed series is scored again: ``base_seconds`` doubling per give-up, at
    most a day (the queue's ``backoff_seconds``)."""
    return backoff_seconds(failures, base_seconds, RETRY_FAILED_MAX_SECONDS)


def retry_failed_series(session_factory: Callable[[], Session], base_seconds: float,
                        now: dt.datetime | None = None) -> list[tuple[int, int]]:
    """Schedule (``retry_at``) every ``failed`` series not yet scheduled, with back-off
    (``retry_delay``), and queue a new round for those due; returns (series_id, version) queued.
    ``base_seconds`` 0: failed series wait for ``qcnode rescore``."""
    if base_seconds <= 0:
        return []
    now = now or utcnow()
    with session_factory() as session:
        for series_id, failures in session.execute(select(Series.id, Series.failures).where(
                Series.status == SeriesState.FAILED, Series.retry_at.is_(None))).all():
            at = now + dt.timedelta(seconds=retry_delay(failures, base_seconds))
            session.execute(update(Series).where(Series.id == series_id, Series.status == SeriesState.FAILED,
                                                 Series.retry_at.is_(None)).values(retry_at=at))
            log.warning("series_retry_scheduled", series_id=series_id, failures=failures, retry_at=at.isoformat())
        session.commit()
        due = list(session.scalars(select(Series.id).where(Series.status == SeriesState.FAILED,
                                                           Series.retry_at <= now)))
        session.commit()
    queued = []
    for series_id in due:
        version = _queue_round(session_factory, series_id, Series.status == SeriesState.FAILED,
                               Series.retry_at <= now)
        if version is not None:
            log.info("series_retried", series_id=series_id, version=version)
            queued.append((series_id, version))
    return queued


def rescore_series(session_factory: Callable[[], Session], series_id: int) -> int | None:
    """Queue a new scoring round of a series now (``qcnode rescore``): a failed one, or a scored one
    again (e.g. after a model update). None while it is still receiving (it gets one anyway)."""
    version = _queue_round(session_factory, series_id, Series.status != SeriesState.RECEIVING)
    if version is not None:
        log.info("series_rescore_queued", series_id=series_id, version=version)
    return version


def track_once(session_factory: Callable[[], Session], stable_seconds: float,
               retry_failed_seconds: float = 0.0) -> None:
    """One tracker pass: ``mark_stable_series`` then ``retry_failed_series`` (``qcnode serve`` runs
    it every ``series.tracker_interval_seconds``)."""
    mark_stable_series(session_factory, stable_seconds)
    retry_failed_series(session_factory, retry_failed_seconds)
