"""The dashboard's queries: one module for the pages, the CSV downloads and the JSON API.

Everything returns plain dicts / lists (JSON-ready). No patient name is stored anywhere; the only
patient column, ``studies.patient_key``, is shown only while it is pseudonymised
(``privacy.pseudonymise_patient_id``), else left out. Queries are written for 50,000 series and
5 million slice scores: the series list walks ``series`` in an indexed order and probes the latest
result per row (unique ``(series_id, version)``), kernels use ``instances(kernel, series_id)``
(migration 0004), and date ranges compare indexed timestamps, never a computed date.
"""
from __future__ import annotations

import datetime as dt
import statistics
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlalchemy as sa
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from qcnode.audit import stats as audit_stats
from qcnode.config import Config
from qcnode.db.alert_models import ALERT_AUDIT_FLAG, ALERT_VERDICT_FAIL, AlertAck, AlertWebhook
from qcnode.db.audit_models import AuditFlag, AuditProtocolStat, AuditRun
from qcnode.db.models import (Delivery, Instance, Job, QuarantineRecord, Series, SeriesResult, SliceScore,
                              Study, utcnow)
from qcnode.db.queue import as_utc
from qcnode.db.status import status_counts

VERDICTS = ("PASS", "WARN", "FAIL")


# ---- shared SQL expressions (same text as the v_series_qa view, so groups match the audit's) ---------
def protocol_expr() -> Any:
    """Protocol name, ``(unnamed)`` when the header has none."""
    return func.coalesce(func.nullif(func.trim(Series.protocol_name), ""), "(unnamed)")


def scanner_expr() -> Any:
    """Manufacturer + model + station, ``(unknown)`` when all are empty."""
    joined = func.trim(func.coalesce(Series.manufacturer, "") + " " + func.coalesce(Series.model_name, "")
                       + " " + func.coalesce(Series.station_name, ""))
    return func.coalesce(func.nullif(joined, ""), "(unknown)")


def _latest_version() -> Any:
    """Correlated subquery: the highest scored version of the outer ``series`` row."""
    r2 = aliased(SeriesResult)
    return select(func.max(r2.version)).where(r2.series_id == Series.id).scalar_subquery()


def _is_latest(r: Any) -> Any:
    """``r`` (a series_results alias joined to ``series``) is its series' latest round. A result of
    the round last queued (``series.version``) is the latest by construction: tested first, it spares
    most rows the subquery (the databases stop at the first true term of an OR)."""
    return sa.or_(r.version == Series.version, r.version == _latest_version())


def _iso(value: Any) -> Any:
    """Dates and (UTC) datetimes as ISO strings; anything else unchanged."""
    if isinstance(value, dt.datetime):
        return as_utc(value).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def _utc_day(session: Session, column: Any) -> Any:
    """SQL for the UTC calendar date of a timestamp column, computed by the database (parsing 10^4
    timestamps in Python costs more than the query): 'YYYY-MM-DD' text on SQLite, a DATE on PostgreSQL."""
    if session.get_bind().dialect.name == "postgresql":
        return sa.cast(func.timezone("UTC", column), sa.Date)
    return sa.type_coerce(func.date(column), sa.String)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


# ---- small TTL cache for filter choices (distinct values change rarely) --------------------------------
_cache: dict[tuple[Any, ...], tuple[float, Any]] = {}
_cache_lock = threading.Lock()


def _cached(key: tuple[Any, ...], ttl: float, compute: Callable[[], Any]) -> Any:
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and now - hit[0] < ttl:
            return hit[1]
    value = compute()
    with _cache_lock:
        _cache[key] = (now, value)
    return value


def clear_cache() -> None:
    """Forget cached filter choices (tests, after bulk changes)."""
    with _cache_lock:
        _cache.clear()


# ---- series list ---------------------------------------------------------------------------------------
SORTS: dict[str, Callable[[Any], Any]] = {
    "received": lambda r: Series.last_received_at,
    "study_date": lambda r: Study.study_date,
    "protocol": lambda r: protocol_expr(),
    "scanner": lambda r: scanner_expr(),
    "description": lambda r: Series.series_description,
    "score": lambda r: r.mean_score,
    "verdict": lambda r: r.verdict,
    "noise": lambda r: r.noise_hu,
    "ctdivol": lambda r: r.ctdivol_mgy,
    "ssde": lambda r: r.ssde_mgy,
}


@dataclass
class SeriesFilter:
    """Filters, order and page of the series list (all optional). Dates are UTC calendar dates of
    the last received instance, inclusive."""
    date_from: dt.date | None = None
    date_to: dt.date | None = None
    scanner: str | None = None
    protocol: str | None = None
    kernel: str | None = None
    body_part: str | None = None
    verdict: str | None = None
    model_version: str | None = None
    text: str | None = None
    sort: str = "received"
    order: str = "desc"
    page: int = 1
    page_size: int = 50

    @classmethod
    def from_params(cls, params: dict[str, Any], page_size: int) -> "SeriesFilter":
        """Build from query parameters: empty values are ignored, bad dates and sorts fall back."""
        kw: dict[str, Any] = {"page_size": page_size}
        for f in fields(cls):
            raw = params.get(f.name)
            if raw in (None, ""):
                continue
            raw = str(raw).strip()
            if f.name in ("date_from", "date_to"):
                try:
                    kw[f.name] = dt.date.fromisoformat(raw)
                except ValueError:
                    continue
            elif f.name in ("page", "page_size"):
                try:
                    kw[f.name] = max(1, min(int(raw), 1000))
                except ValueError:
                    continue
            else:
                kw[f.name] = raw
        flt = cls(**kw)
        if flt.sort not in SORTS:
            flt.sort = "received"
        if flt.order not in ("asc", "desc"):
            flt.order = "desc"
        if flt.verdict:
            flt.verdict = flt.verdict.upper()
        return flt

    def params(self, **changes: Any) -> dict[str, str]:
        """The non-default filter values as query parameters (for links), with ``changes`` applied."""
        out = {}
        for f in fields(self):
            value = changes.get(f.name, getattr(self, f.name))
            if value in (None, "") or (f.name == "page" and value == 1) or f.name == "page_size":
                continue
            if (f.name, value) in (("sort", "received"), ("order", "desc")):
                continue
            out[f.name] = _iso(value) if not isinstance(value, str) else value
        return {k: str(v) for k, v in out.items()}


SCANNER_COLUMNS = (Series.manufacturer, Series.model_name, Series.station_name)


def _raw_values(session: Session, columns: tuple[Any, ...]) -> dict[str, list[tuple[Any, ...]]]:
    """Label (``protocol_expr`` / ``scanner_expr``) -> the raw column values that give it (cached)."""
    label = protocol_expr() if len(columns) == 1 else scanner_expr()

    def compute() -> dict[str, list[tuple[Any, ...]]]:
        out: dict[str, list[tuple[Any, ...]]] = {}
        for row in session.execute(select(label, *columns).distinct()):
            out.setdefault(row[0], []).append(tuple(row[1:]))
        return out
    return _cached(("raw", len(columns), str(session.get_bind().url)), 60.0, compute)


def _raw_match(session: Session, columns: tuple[Any, ...], label: str) -> Any:
    """An indexable condition (``series(protocol_name)``, ``series(manufacturer, model_name,
    station_name)``) matching the rows whose label is ``label``. The raw values are cached for a minute:
    a label not seen yet costs a full scan (``true``), and the label condition stays beside this one, so
    a row is never wrong; a new raw spelling of a known label (say "" beside NULL) shows within a minute."""
    raw = _raw_values(session, columns).get(label)
    if not raw:
        return sa.true()
    return sa.or_(*[and_(*[c.is_(None) if v is None else c == v for c, v in zip(columns, values)])
                    for values in raw])


def _series_select(session: Session, flt: SeriesFilter, show_patient_key: bool) -> tuple[Any, Any]:
    """(SELECT of the list's columns with the filters applied and ordered, SELECT of their count)."""
    r = aliased(SeriesResult, name="r")
    cols = [Series.id.label("series_id"), Series.series_instance_uid, Study.study_instance_uid,
            Study.study_date, Series.last_received_at.label("received_at"), Series.series_description,
            protocol_expr().label("protocol"), Series.body_part, scanner_expr().label("scanner"),
            Series.status, Series.instance_count, r.version, r.model_version, r.n_slices, r.mean_score,
            r.min_score, r.fraction_below, r.verdict, r.noise_hu, r.ctdivol_mgy, r.ssde_mgy, r.dlp_mgycm,
            r.created_at.label("scored_at")]
    if show_patient_key:
        cols.insert(3, Study.patient_key)
    stmt = (select(*cols).select_from(Series).join(Study, Study.id == Series.study_id)
            .outerjoin(r, and_(r.series_id == Series.id, _is_latest(r))))
    conds = []
    if flt.date_from:
        conds.append(Series.last_received_at >= dt.datetime.combine(flt.date_from, dt.time(), dt.timezone.utc))
    if flt.date_to:
        conds.append(Series.last_received_at < dt.datetime.combine(flt.date_to + dt.timedelta(days=1), dt.time(),
                                                                   dt.timezone.utc))
    if flt.scanner:
        conds.append(scanner_expr() == flt.scanner)
        conds.append(_raw_match(session, SCANNER_COLUMNS, flt.scanner))
    if flt.protocol:
        conds.append(protocol_expr() == flt.protocol)
        conds.append(_raw_match(session, (Series.protocol_name,), flt.protocol))
    if flt.body_part:
        conds.append(Series.body_part == flt.body_part)
    if flt.verdict:
        conds.append(r.verdict == flt.verdict)
    if flt.model_version:
        conds.append(r.model_version == flt.model_version)
    if flt.kernel:
        conds.append(select(Instance.id).where(Instance.kernel == flt.kernel,
                                               Instance.series_id == Series.id).exists())
    if flt.text:
        pattern = "%" + flt.text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        conds.append(func.lower(Series.series_description).like(pattern, escape="\\"))
    if conds:
        stmt = stmt.where(*conds)
    key = SORTS[flt.sort](r)
    key = key.asc() if flt.order == "asc" else key.desc()
    if flt.sort != "received":  # NOT NULL: a plain order lets PostgreSQL walk its index backwards
        key = key.nulls_last()
    tie = Series.id.asc() if flt.order == "asc" else Series.id.desc()
    # the count needs the result only when a filter is on it (the join adds at most one row per series)
    count = select(func.count()).select_from(Series)
    if flt.verdict or flt.model_version:
        count = count.join(r, and_(r.series_id == Series.id, _is_latest(r)))
    return stmt.order_by(key, tie), count.where(*conds)


def _series_row(row: Any) -> dict[str, Any]:
    out = {k: _iso(v) for k, v in row._mapping.items()}
    for k in ("mean_score", "min_score", "fraction_below", "noise_hu", "ctdivol_mgy", "ssde_mgy", "dlp_mgycm"):
        out[k] = _round(out.get(k))
    return out


def list_series(session: Session, flt: SeriesFilter, show_patient_key: bool) -> dict[str, Any]:
    """One page of the filtered, sorted series list: ``{"total", "page", "page_size", "rows"}``."""
    stmt, count = _series_select(session, flt, show_patient_key)
    total = int(session.scalar(count) or 0)
    rows = session.execute(stmt.limit(flt.page_size).offset((flt.page - 1) * flt.page_size)).all()
    return {"total": total, "page": flt.page, "page_size": flt.page_size, "rows": [_series_row(x) for x in rows]}


def iter_series(session: Session, flt: SeriesFilter, show_patient_key: bool) -> Iterator[dict[str, Any]]:
    """Every row of the filtered list (no paging), streamed in batches (CSV download)."""
    stmt, _ = _series_select(session, flt, show_patient_key)
    for row in session.execute(stmt.execution_options(yield_per=1000)):
        yield _series_row(row)


def filter_choices(session: Session) -> dict[str, list[str]]:
    """Distinct scanners, protocols, body parts, kernels and model versions (cached for a minute)."""
    def compute() -> dict[str, list[str]]:
        def distinct(expr: Any) -> list[str]:
            return sorted(str(v) for v in session.scalars(select(expr).distinct()) if v not in (None, ""))
        return {"scanner": distinct(scanner_expr()), "protocol": distinct(protocol_expr()),
                "body_part": distinct(Series.body_part), "model_version": distinct(SeriesResult.model_version),
                "kernel": kernels(session)}
    bind = session.get_bind()
    return _cached(("choices", str(bind.url)), 60.0, compute)


def kernels(session: Session) -> list[str]:
    """Distinct convolution kernels: a loose scan of ``instances(kernel, ...)``, one probe per kernel."""
    i = Instance.__table__.c
    k = sa.text("SELECT kernel FROM instances WHERE kernel IS NOT NULL ORDER BY kernel LIMIT 1")
    out: list[str] = []
    current = session.scalar(k)
    while current is not None and len(out) < 500:
        out.append(current)
        current = session.scalar(select(func.min(i.kernel)).where(i.kernel > current))
    return out


# ---- series detail -------------------------------------------------------------------------------------
def series_detail(session: Session, series_id: int, show_patient_key: bool,
                  spool_dir: Path | None = None) -> dict[str, Any] | None:
    """Header fields, every scoring round with its SR and deliveries, the latest round's slices
    (score, 5-95 % band, position, dose fields) and the thumbnail candidates. None if unknown."""
    row = session.execute(select(Series, Study, protocol_expr(), scanner_expr())
                          .join(Study, Study.id == Series.study_id).where(Series.id == series_id)).first()
    if row is None:
        return None
    series, study, protocol, scanner = row
    out: dict[str, Any] = {
        "series_id": series.id, "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": study.study_instance_uid, "study_date": _iso(study.study_date),
        "description": series.series_description, "protocol": protocol, "scanner": scanner,
        "body_part": series.body_part, "modality": series.modality, "series_number": series.series_number,
        "manufacturer": series.manufacturer, "model_name": series.model_name, "station_name": series.station_name,
        "device_serial": series.device_serial, "status": series.status, "version": series.version,
        "failures": series.failures, "instance_count": series.instance_count,
        "first_received_at": _iso(series.first_received_at), "last_received_at": _iso(series.last_received_at),
    }
    if show_patient_key:
        out["patient_key"] = study.patient_key
    results = session.scalars(select(SeriesResult).where(SeriesResult.series_id == series_id)
                              .order_by(SeriesResult.version.desc())).all()
    deliveries: dict[int, list[dict[str, Any]]] = {}
    if results:
        for d in session.scalars(select(Delivery).where(Delivery.series_result_id.in_([x.id for x in results]))
                                 .order_by(Delivery.destination, Delivery.kind)):
            deliveries.setdefault(d.series_result_id, []).append(
                {"destination": d.destination, "kind": d.kind, "status": d.status, "attempts": d.attempts,
                 "last_error": (d.last_error or "")[:300] or None, "delivered_at": _iso(d.delivered_at)})
    out["results"] = [
        {"series_result_id": x.id, "version": x.version, "model_version": x.model_version, "verdict": x.verdict,
         "n_slices": x.n_slices, "n_skipped": x.n_skipped, "mean_score": _round(x.mean_score),
         "min_score": _round(x.min_score), "p10_score": _round(x.p10_score),
         "fraction_below": _round(x.fraction_below), "noise_hu": _round(x.noise_hu),
         "ctdivol_mgy": _round(x.ctdivol_mgy), "dw_cm": _round(x.dw_cm), "ssde_mgy": _round(x.ssde_mgy),
         "dlp_mgycm": _round(x.dlp_mgycm), "sr_sop_instance_uid": x.sr_sop_instance_uid,
         "scored_at": _iso(x.created_at), "deliveries": deliveries.get(x.id, [])}
        for x in results]
    out["latest"] = out["results"][0] if results else None
    out["slices"] = slices(session, series_id, results[0].version) if results else []
    acq = session.execute(select(func.avg(Instance.kvp), func.avg(Instance.tube_current_ma),
                                 func.avg(Instance.exposure_mas), func.avg(Instance.pitch),
                                 func.avg(Instance.slice_thickness_mm), func.avg(Instance.ctdivol_mgy),
                                 func.min(Instance.kernel), func.max(Instance.kernel),
                                 func.count(Instance.id))
                          .where(Instance.series_id == series_id)).one()
    out["acquisition"] = {"kvp": _round(acq[0], 1), "tube_current_ma": _round(acq[1], 1),
                          "exposure_mas": _round(acq[2], 1), "pitch": _round(acq[3]),
                          "slice_thickness_mm": _round(acq[4], 2), "ctdivol_mgy": _round(acq[5]),
                          "kernel": acq[6] if acq[6] == acq[7] else f"{acq[6]} .. {acq[7]}",
                          "instances_stored": int(acq[8])}
    out["thumbnails"] = thumbnail_candidates(out["slices"], spool_dir)
    return out


def slices(session: Session, series_id: int, version: int | None = None) -> list[dict[str, Any]]:
    """Per-slice scores of one round (default: the latest) in slice order, with the position along
    the series (slice location, else instance number, else order) and the instance's dose fields."""
    if version is None:
        version = session.scalar(select(func.max(SeriesResult.version)).where(SeriesResult.series_id == series_id))
        if version is None:
            return []
    rows = session.execute(
        select(SliceScore.instance_id, Instance.sop_instance_uid, Instance.instance_number, Instance.slice_location,
               SliceScore.score, SliceScore.score_low, SliceScore.score_high, SliceScore.noise_hu,
               SliceScore.dw_cm, SliceScore.ssde_mgy, Instance.ctdivol_mgy, Instance.kernel, Instance.spool_path)
        .join(Instance, Instance.id == SliceScore.instance_id)
        .where(SliceScore.series_id == series_id, SliceScore.series_version == version)).all()
    has_location = bool(rows) and all(x.slice_location is not None for x in rows)
    has_number = bool(rows) and all(x.instance_number is not None for x in rows)
    key = (lambda x: (x.slice_location, x.instance_id)) if has_location else (
        (lambda x: (x.instance_number, x.instance_id)) if has_number else (lambda x: x.instance_id))
    out = []
    for i, x in enumerate(sorted(rows, key=key)):
        position = x.slice_location if has_location else (x.instance_number if has_number else i + 1)
        out.append({"instance_id": x.instance_id, "sop_instance_uid": x.sop_instance_uid,
                    "instance_number": x.instance_number, "slice_location": _round(x.slice_location, 2),
                    "position": _round(position, 2), "score": _round(x.score), "score_low": _round(x.score_low),
                    "score_high": _round(x.score_high), "noise_hu": _round(x.noise_hu), "dw_cm": _round(x.dw_cm),
                    "ssde_mgy": _round(x.ssde_mgy), "ctdivol_mgy": _round(x.ctdivol_mgy), "kernel": x.kernel,
                    "_spool_path": x.spool_path})
    return out


def position_label(slices_: list[dict[str, Any]]) -> str:
    """Axis title of the strip chart: what ``position`` holds."""
    if slices_ and all(s["slice_location"] is not None for s in slices_):
        return "slice location (mm)"
    if slices_ and all(s["instance_number"] is not None for s in slices_):
        return "instance number"
    return "slice"


def thumbnail_candidates(slices_: list[dict[str, Any]], spool_dir: Path | None) -> list[dict[str, Any]]:
    """The lowest-scoring and the median-scoring slice, each with whether its file is still in the spool."""
    if not slices_:
        return []
    ranked = sorted(slices_, key=lambda s: (s["score"], s["instance_id"]))
    picks = [("lowest score", ranked[0]), ("median score", ranked[len(ranked) // 2])]
    out = []
    for label, s in picks:
        in_spool = bool(spool_dir is not None and (spool_dir / s["_spool_path"]).is_file())
        out.append({"label": label, "instance_id": s["instance_id"], "score": s["score"],
                    "position": s["position"], "in_spool": in_spool})
    return out


def public_slices(slices_: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Slices without internal fields (spool paths)."""
    return [{k: v for k, v in s.items() if not k.startswith("_")} for s in slices_]


def instance_spool_path(session: Session, series_id: int, instance_id: int) -> str | None:
    """Spool path (relative) of an instance of a series, None when not one of its instances."""
    return session.scalar(select(Instance.spool_path).where(Instance.id == instance_id,
                                                            Instance.series_id == series_id))


def series_exists(session: Session, series_id: int) -> bool:
    return session.scalar(select(Series.id).where(Series.id == series_id)) is not None


# ---- protocols -----------------------------------------------------------------------------------------
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
    end = dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
    stmt = (select(Series.id, protocol_expr().label("protocol"), scanner_expr().label("scanner"),
                   _utc_day(session, r.created_at).label("day"), r.mean_score, r.verdict, r.noise_hu,
                   r.ctdivol_mgy, r.ssde_mgy)
            .select_from(r).join(Series, Series.id == r.series_id)
            .where(r.created_at >= start, r.created_at < end, _is_latest(r))
            .order_by(r.created_at.desc()))
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
                "score": _round(x[_P_METRIC["score"]]), "ssde_mgy": _round(x[_P_METRIC["ssde"]]),
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


# ---- audit runs, flags, alerts -------------------------------------------------------------------------
def audit_runs(session: Session, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
    """Audit runs, newest first, each with its flags."""
    runs = session.scalars(select(AuditRun).order_by(AuditRun.id.desc()).limit(limit).offset(offset)).all()
    flags: dict[int, list[dict[str, Any]]] = {}
    if runs:
        for f in session.scalars(select(AuditFlag).where(AuditFlag.run_id.in_([x.id for x in runs]))
                                 .order_by(AuditFlag.id)):
            flags.setdefault(f.run_id, []).append(_flag(f))
    return [{"run_id": x.id, "trigger": x.trigger, "since": _iso(x.since), "until": _iso(x.until),
             "started_at": _iso(x.started_at), "finished_at": _iso(x.finished_at), "status": x.status,
             "n_series": x.n_series, "n_groups": x.n_groups, "n_flags": x.n_flags, "message": x.message,
             "has_report": bool(x.report_path), "flags": flags.get(x.id, [])} for x in runs]


def _flag(f: AuditFlag) -> dict[str, Any]:
    return {"flag_id": f.id, "run_id": f.run_id, "protocol": f.protocol, "scanner": f.scanner, "kind": f.kind,
            "value": _round(f.value), "reference": _round(f.reference), "message": f.message}


def list_flags(session: Session, limit: int = 100, kind: str | None = None) -> list[dict[str, Any]]:
    stmt = select(AuditFlag).order_by(AuditFlag.id.desc()).limit(limit)
    if kind:
        stmt = stmt.where(AuditFlag.kind == kind)
    return [_flag(f) for f in session.scalars(stmt)]


def audit_report_path(session: Session, run_id: int) -> Path | None:
    path = session.scalar(select(AuditRun.report_path).where(AuditRun.id == run_id))
    return Path(path) if path else None


def _ack_join(kind: str, ref: Any) -> Any:
    return and_(AlertAck.kind == kind, AlertAck.ref_id == ref)


def list_alerts(session: Session, *, unacknowledged: bool = False, limit: int = 50,
                offset: int = 0) -> dict[str, Any]:
    """FAIL verdicts and audit flags, newest first, with their acknowledgement and webhook state:
    ``{"total", "unacknowledged", "rows"}``."""
    r = SeriesResult
    fail_q = (select(sa.literal(ALERT_VERDICT_FAIL).label("kind"), r.id.label("ref_id"),
                     r.created_at.label("at"), r.series_id, r.version, r.mean_score, r.fraction_below,
                     protocol_expr().label("protocol"), scanner_expr().label("scanner"),
                     AlertAck.acknowledged_by, AlertAck.acknowledged_at, AlertAck.comment)
              .select_from(r).join(Series, Series.id == r.series_id)
              .outerjoin(AlertAck, _ack_join(ALERT_VERDICT_FAIL, r.id)).where(r.verdict == "FAIL"))
    flag_q = (select(sa.literal(ALERT_AUDIT_FLAG).label("kind"), AuditFlag.id.label("ref_id"),
                     AuditRun.started_at.label("at"), AuditFlag.kind.label("flag_kind"), AuditFlag.run_id,
                     AuditFlag.protocol, AuditFlag.scanner, AuditFlag.message,
                     AlertAck.acknowledged_by, AlertAck.acknowledged_at, AlertAck.comment)
              .select_from(AuditFlag).join(AuditRun, AuditRun.id == AuditFlag.run_id)
              .outerjoin(AlertAck, _ack_join(ALERT_AUDIT_FLAG, AuditFlag.id)))
    if unacknowledged:
        fail_q = fail_q.where(AlertAck.id.is_(None))
        flag_q = flag_q.where(AlertAck.id.is_(None))

    def count(q: Any) -> int:
        return int(session.scalar(select(func.count()).select_from(q.subquery())) or 0)
    n = offset + limit
    fails = session.execute(fail_q.order_by(r.created_at.desc(), r.id.desc()).limit(n)).all()
    flags = session.execute(flag_q.order_by(AuditRun.started_at.desc(), AuditFlag.id.desc()).limit(n)).all()
    merged = sorted([*fails, *flags], key=lambda x: (as_utc(x.at), x.ref_id), reverse=True)[offset:n]
    hooks = _webhook_states(session, [(x.kind, x.ref_id) for x in merged])
    rows = []
    for x in merged:
        m = x._mapping
        item: dict[str, Any] = {"alert_id": f"{x.kind}:{x.ref_id}", "kind": x.kind, "ref_id": x.ref_id,
                                "at": _iso(x.at), "protocol": x.protocol, "scanner": x.scanner,
                                "acknowledged": None, "webhook": hooks.get((x.kind, x.ref_id))}
        if x.kind == ALERT_VERDICT_FAIL:
            item.update(series_id=m["series_id"], version=m["version"], title="FAIL verdict",
                        message=f"mean score {_round(m['mean_score'], 2)}, "
                                f"{round(100 * (m['fraction_below'] or 0))} % of slices low quality")
        else:
            item.update(run_id=m["run_id"], flag_kind=m["flag_kind"], title=f"audit flag {m['flag_kind']}",
                        message=m["message"])
        if x.acknowledged_by is not None:
            item["acknowledged"] = {"by": x.acknowledged_by, "at": _iso(x.acknowledged_at), "comment": x.comment}
        rows.append(item)
    total = count(fail_q) + count(flag_q)
    open_ = total if unacknowledged else (count(fail_q.where(AlertAck.id.is_(None)))
                                          + count(flag_q.where(AlertAck.id.is_(None))))
    return {"total": total, "unacknowledged": open_, "rows": rows}


def _webhook_states(session: Session, keys: list[tuple[str, int]]) -> dict[tuple[str, int], dict[str, Any]]:
    if not keys:
        return {}
    conds = [and_(AlertWebhook.kind == k, AlertWebhook.ref_id == i) for k, i in keys]
    return {(w.kind, w.ref_id): {"status": w.status, "attempts": w.attempts,
                                 "last_error": (w.last_error or "")[:200] or None}
            for w in session.scalars(select(AlertWebhook).where(sa.or_(*conds)))}


def alert_exists(session: Session, kind: str, ref_id: int) -> bool:
    if kind == ALERT_VERDICT_FAIL:
        return session.scalar(select(SeriesResult.id).where(SeriesResult.id == ref_id,
                                                            SeriesResult.verdict == "FAIL")) is not None
    if kind == ALERT_AUDIT_FLAG:
        return session.get(AuditFlag, ref_id) is not None
    return False


# ---- overview and status -------------------------------------------------------------------------------
def verdict_counts(session: Session, since: dt.datetime) -> dict[str, int]:
    """Series whose latest round was scored since ``since``, by verdict."""
    r = aliased(SeriesResult, name="r")
    stmt = (select(r.verdict, func.count()).select_from(r).join(Series, Series.id == r.series_id)
            .where(r.created_at >= since, _is_latest(r)).group_by(r.verdict))
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
        and_(Delivery.kind == "sr", Delivery.status == "delivered", Delivery.delivered_at.is_not(None)),
        DELIVERY_BUCKETS, d_join)
    return out


SCORING_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
DELIVERY_BUCKETS = (5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
