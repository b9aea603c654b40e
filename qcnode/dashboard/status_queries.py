"""The dashboard's status queries: the overview page and /api/v1/status (verdict counts, queue and
disk state, open alerts), and the snapshot /metrics exports at scrape time."""
from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from qcnode.config import Config
from qcnode.dashboard.alert_queries import list_alerts
from qcnode.dashboard.queries import VERDICTS, is_latest
from qcnode.db.models import Delivery, Instance, Job, QuarantineRecord, Series, SeriesResult, utcnow
from qcnode.db.states import DeliveryState
from qcnode.db.status import status_counts


def verdict_counts(session: Session, since: dt.datetime) -> dict[str, int]:
    """Series whose latest round was scored since ``since``, by verdict."""
    r = aliased(SeriesResult, name="r")
    stmt = (select(r.verdict, func.count()).select_from(r).join(Series, Series.id == r.series_id)
            .where(r.created_at >= since, is_latest(r)).group_by(r.verdict))
    counts = {v: 0 for v in VERDICTS}
    counts.update({str(v): int(n) for v, n in session.execute(stmt)})
    return counts


def overview(session: Session, cfg: Config, now: dt.datetime | None = None) -> dict[str, Any]:
    """Today's and this week's (last 7 days, UTC) series by verdict, everything ``qcnode status`` shows,
    the open alerts and disk space."""
    from qcnode.ingest.spool import free_disk_mb
    now = now or utcnow()
    today = dt.datetime.combine(now.date(), dt.time(), dt.timezone.utc)
    out: dict[str, Any] = {"now": now.isoformat(), "today": verdict_counts(session, today),
                           "week": verdict_counts(session, today - dt.timedelta(days=6))}
    out.update(status_counts(session))
    out["model_version"] = out.pop("last_model_version")
    spool = cfg.path(cfg.storage.spool_dir)
    out["disk_free_mb"] = round(free_disk_mb(spool), 1) if spool.exists() else None
    out["min_free_disk_mb"] = cfg.storage.min_free_disk_mb
    out["alerts_open"] = list_alerts(session, unacknowledged=True, limit=5)["unacknowledged"]
    return out


# ---- metrics (read at scrape time) ---------------------------------------------------------------------
def seconds_between(session: Session, later: Any, earlier: Any) -> Any:
    """SQL for ``later - earlier`` in seconds (SQLite stores text timestamps, PostgreSQL timestamptz)."""
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", later - earlier)
    return (func.julianday(later) - func.julianday(earlier)) * 86400.0


def histogram(session: Session, seconds: Any, where: Any, buckets: tuple[float, ...],
              select_from: Any) -> tuple[list[tuple[str, int]], float, int]:
    """Cumulative bucket counts, sum and count of ``seconds`` over the rows matching ``where``,
    in one aggregate query."""
    cols = [func.sum(sa.case((seconds <= b, 1), else_=0)) for b in buckets]
    cols += [func.sum(seconds), func.count()]
    row = session.execute(select(*cols).select_from(select_from).where(where)).one()
    n = int(row[-1] or 0)
    pairs = [(repr(float(b)), int(row[i] or 0)) for i, b in enumerate(buckets)] + [("+Inf", n)]
    return pairs, float(row[-2] or 0.0), n


def metrics_snapshot(session: Session) -> dict[str, Any]:
    """Everything /metrics exports, from the database (so every process's work is counted)."""
    out: dict[str, Any] = {}
    out["instances"] = int(session.scalar(select(func.count(Instance.id))) or 0)
    out["refused"] = {(f"0x{c:04X}" if c is not None else "unknown"): int(n) for c, n in session.execute(
        select(QuarantineRecord.status_code, func.count()).group_by(QuarantineRecord.status_code))}
    out["jobs"] = {str(k): int(v) for k, v in session.execute(select(Job.status, func.count()).group_by(Job.status))}
    out["deliveries"] = {(str(d), str(k), str(st)): int(n) for d, k, st, n in session.execute(
        select(Delivery.destination, Delivery.kind, Delivery.status, func.count())
        .group_by(Delivery.destination, Delivery.kind, Delivery.status))}
    out["series"] = {str(k): int(v) for k, v in session.execute(
        select(Series.status, func.count()).group_by(Series.status))}
    out["results"] = {str(k): int(v) for k, v in session.execute(
        select(SeriesResult.verdict, func.count()).group_by(SeriesResult.verdict))}
    out["model_version"] = session.scalar(select(SeriesResult.model_version).order_by(SeriesResult.id.desc()).limit(1))
    out["scoring_latency"] = histogram(
        session, seconds_between(session, Job.finished_at, Job.created_at),
        and_(Job.status == "done", Job.finished_at.is_not(None)), SCORING_BUCKETS, Job)
    d_join = sa.join(Delivery, SeriesResult, SeriesResult.id == Delivery.series_result_id).join(
        Series, Series.id == SeriesResult.series_id)
    out["sr_delivery_latency"] = histogram(
        session, seconds_between(session, Delivery.delivered_at, Series.last_received_at),
        and_(Delivery.kind == "sr", Delivery.status == DeliveryState.DELIVERED, Delivery.delivered_at.is_not(None)),
        DELIVERY_BUCKETS, d_join)
    return out


SCORING_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
DELIVERY_BUCKETS = (5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
