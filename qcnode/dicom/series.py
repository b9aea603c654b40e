"""Series tracking: a series is ready for scoring after ``stable_seconds`` without a new instance.

The SCP sets ``status = 'receiving'`` and ``last_received_at`` on every instance. The tracker
turns quiet ``receiving`` series into ``stable`` ones, bumping ``series.version`` and queueing a
``score_series`` job for that version in the same transaction. The conditional UPDATE plus the
unique (kind, series, version) constraint on jobs make a double queueing impossible, even with
several tracker processes. A late instance sets ``receiving`` again: the next round gets version+1.
"""
from __future__ import annotations

import datetime as dt
import threading
from typing import Callable

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from qcnode.db.models import Series, utcnow
from qcnode.db.queue import JOB_SCORE_SERIES, enqueue_job
from qcnode.log import get_logger

log = get_logger("qcnode.series")


def mark_stable_series(session_factory: Callable[[], Session], stable_seconds: float,
                       now: dt.datetime | None = None) -> list[tuple[int, int]]:
    """Queue a scoring job for every series quiet for ``stable_seconds``; returns (series_id, version)."""
    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=stable_seconds)
    with session_factory() as session:
        ids = list(session.scalars(select(Series.id).where(Series.status == "receiving",
                                                           Series.last_received_at < cutoff)))
        session.commit()
    queued: list[tuple[int, int]] = []
    for series_id in ids:
        with session_factory() as session:
            res = session.execute(
                update(Series)
                .where(Series.id == series_id, Series.status == "receiving", Series.last_received_at < cutoff)
                .values(status="stable", version=Series.version + 1))
            if res.rowcount != 1:  # another tracker got it, or an instance just arrived
                session.rollback()
                continue
            version = session.scalar(select(Series.version).where(Series.id == series_id))
            enqueue_job(session, JOB_SCORE_SERIES, series_id, int(version))
            session.commit()
        log.info("series_stable", series_id=series_id, version=int(version))
        queued.append((series_id, int(version)))
    return queued


def run_tracker(session_factory: Callable[[], Session], stable_seconds: float, interval: float,
                stop: threading.Event) -> None:
    """Loop ``mark_stable_series`` every ``interval`` seconds until ``stop`` is set."""
    while not stop.is_set():
        try:
            mark_stable_series(session_factory, stable_seconds)
        except Exception as exc:  # noqa: BLE001 - a DB hiccup must not kill the loop
            log.error("tracker_error", error=f"{type(exc).__name__}: {exc}")
        stop.wait(interval)
