"""The dashboard's protocol queries: per protocol x scanner box-plot statistics, daily trends with
the latest audit's baseline band, and the score vs SSDE points."""
from __future__ import annotations

import datetime as dt
import statistics
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from qcnode.audit import stats as audit_stats
from qcnode.config import Config
from qcnode.dashboard.queries import is_latest, protocol_expr, rounded, scanner_expr, utc_day
from qcnode.db.audit_models import AuditProtocolStat
from qcnode.db.models import Series, SeriesResult


def _box(values: list[float]) -> dict[str, float] | None:
    """Quartiles and Tukey fences (1.5 IQR, clipped to the data) of ``values``."""
    import numpy as np
    arr = np.array([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return None
    q1, med, q3 = (float(v) for v in np.percentile(arr, [25, 50, 75]))
    iqr = q3 - q1
    lo = float(arr[arr >= q1 - 1.5 * iqr].min())
    hi = float(arr[arr <= q3 + 1.5 * iqr].max())
    return {"q1": round(q1, 3), "median": round(med, 3), "q3": round(q3, 3), "lowerfence": round(lo, 3),
            "upperfence": round(hi, 3), "n": int(arr.size)}


METRICS = audit_stats.METRICS  # score, noise, ctdivol, ssde: the box plots, as in the audit
TREND_METRICS = ("score", "noise")
# columns of the protocols query's rows
_P_ID, _P_PROTOCOL, _P_SCANNER, _P_DAY, _P_VERDICT = 0, 1, 2, 3, 5
_P_METRIC = {"score": 4, "noise": 6, "ctdivol": 7, "ssde": 8}


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def protocols(session: Session, cfg: Config, since: dt.date, until: dt.date,
              scanner: str | None = None, protocol: str | None = None) -> dict[str, Any]:
    """Per protocol x scanner over the series scored in [since, until] (latest round each): box plot
    statistics of score, noise, CTDIvol and SSDE; daily medians with the latest audit's baseline band;
    the score vs SSDE points (newest ``dashboard.scatter_max_points``) with their series ids."""
    r = aliased(SeriesResult, name="r")
    start = dt.datetime.combine(since, dt.time(), dt.timezone.utc)
    stmt = (select(Series.id, protocol_expr().label("protocol"), scanner_expr().label("scanner"),
                   utc_day(session, r.created_at).label("day"), r.mean_score, r.verdict, r.noise_hu,
                   r.ctdivol_mgy, r.ssde_mgy)
            .select_from(r).join(Series, Series.id == r.series_id)
            .where(r.created_at >= start, is_latest(r))
            .order_by(r.created_at.desc()))
    if until < dt.date.max:  # the last date there is: no upper bound (its next day would overflow)
        stmt = stmt.where(r.created_at < dt.datetime.combine(until + dt.timedelta(days=1), dt.time(),
                                                             dt.timezone.utc))
    if scanner:
        stmt = stmt.where(scanner_expr() == scanner)
    if protocol:
        stmt = stmt.where(protocol_expr() == protocol)
    # plain tuples from Core: no ORM row processing or attribute look-ups for 10^4 rows
    data = [tuple(x) for x in session.connection().execute(stmt)]
    members: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for x in data:
        members.setdefault((x[_P_PROTOCOL], x[_P_SCANNER]), []).append(x)
    groups = []
    for (proto, scan), rows in sorted(members.items(), key=lambda kv: (kv[0][0].lower(), kv[0][1].lower())):
        n_fail = sum(1 for x in rows if x[_P_VERDICT] == "FAIL")
        groups.append({"protocol": proto, "scanner": scan, "n_series": len(rows), "n_fail": n_fail,
                       "fail_fraction": round(n_fail / len(rows), 4),
                       "box": {m: _box([x[i] for x in rows]) for m, i in _P_METRIC.items()}})
    baseline = audit_baselines(session, cfg)
    trends = []
    for (proto, scan), rows in members.items():
        by_day: dict[str, list[tuple[Any, ...]]] = {}
        for x in rows:
            by_day.setdefault(str(x[_P_DAY]), []).append(x)
        days = [{"date": day, **{m: _median([x[_P_METRIC[m]] for x in by_day[day]]) for m in TREND_METRICS}}
                for day in sorted(by_day)]
        trends.append({"protocol": proto, "scanner": scan, "days": days, "baseline": baseline.get((proto, scan))})
    trends.sort(key=lambda t: (t["protocol"].lower(), t["scanner"].lower()))
    scatter = [{"series_id": x[_P_ID], "protocol": x[_P_PROTOCOL], "scanner": x[_P_SCANNER],
                "score": rounded(x[_P_METRIC["score"]]), "ssde_mgy": rounded(x[_P_METRIC["ssde"]]),
                "verdict": x[_P_VERDICT]}
               for x in data[:cfg.dashboard.scatter_max_points]
               if x[_P_METRIC["score"]] is not None and x[_P_METRIC["ssde"]] is not None]
    return {"since": since.isoformat(), "until": until.isoformat(), "n_series": len(data), "groups": groups,
            "trends": trends, "scatter": scatter, "scatter_truncated": len(data) > cfg.dashboard.scatter_max_points}


def audit_baselines(session: Session, cfg: Config) -> dict[tuple[str, str], dict[str, Any]]:
    """Per protocol x scanner, the baseline of the latest audit run that had one: the median score and
    noise and the band the drift flags allow around them (``audit.score_drift``,
    ``audit.noise_drift_fraction``)."""
    latest = (select(AuditProtocolStat.protocol, AuditProtocolStat.scanner, func.max(AuditProtocolStat.run_id)
                     .label("run_id"))
              .where(AuditProtocolStat.baseline_n > 0).group_by(AuditProtocolStat.protocol, AuditProtocolStat.scanner)
              .subquery())
    stmt = select(AuditProtocolStat).join(latest, and_(AuditProtocolStat.run_id == latest.c.run_id,
                                                       AuditProtocolStat.protocol == latest.c.protocol,
                                                       AuditProtocolStat.scanner == latest.c.scanner))
    out = {}
    a = cfg.audit
    for st in session.scalars(stmt):
        b: dict[str, Any] = {"run_id": st.run_id, "n_series": st.baseline_n}
        if st.baseline_score_median is not None:
            m = st.baseline_score_median
            b["score"] = {"median": round(m, 3), "low": round(m - a.score_drift, 3), "high": round(m + a.score_drift, 3)}
        if st.baseline_noise_median is not None:
            m = st.baseline_noise_median
            b["noise"] = {"median": round(m, 3), "low": round(m * (1 - a.noise_drift_fraction), 3),
                          "high": round(m * (1 + a.noise_drift_fraction), 3)}
        out[(st.protocol, st.scanner)] = b
    return out
