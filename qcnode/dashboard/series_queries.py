"""The dashboard's series queries: the filtered, sorted list (page, CSV, filter choices) and one
series in detail (scoring rounds, deliveries, slices, thumbnail candidates).

Written for 50,000 series and 5 million slice scores: the list walks ``series`` in an indexed order and
probes the latest result per row (unique ``(series_id, version)``), kernels use
``instances(kernel, series_id)`` (migration 0004), and date ranges compare indexed timestamps, never a
computed date.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlalchemy as sa
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from qcnode.dashboard.queries import cached, is_latest, iso, protocol_expr, rounded, scanner_expr
from qcnode.db.models import Delivery, Instance, Series, SeriesResult, SliceScore, Study


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
            elif f.name == "page":  # unbounded: a page past the end is empty
                try:
                    kw[f.name] = max(1, int(raw))
                except ValueError:
                    continue
            elif f.name == "page_size":
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
            out[f.name] = iso(value) if not isinstance(value, str) else value
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
    return cached(("raw", len(columns), str(session.get_bind().url)), 60.0, compute)


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
            .outerjoin(r, and_(r.series_id == Series.id, is_latest(r))))
    conds = []
    if flt.date_from:
        conds.append(Series.last_received_at >= dt.datetime.combine(flt.date_from, dt.time(), dt.timezone.utc))
    if flt.date_to and flt.date_to < dt.date.max:  # the last date there is: no upper bound
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
        count = count.join(r, and_(r.series_id == Series.id, is_latest(r)))
    return stmt.order_by(key, tie), count.where(*conds)


def _series_row(row: Any) -> dict[str, Any]:
    out = {k: iso(v) for k, v in row._mapping.items()}
    for k in ("mean_score", "min_score", "fraction_below", "noise_hu", "ctdivol_mgy", "ssde_mgy", "dlp_mgycm"):
        out[k] = rounded(out.get(k))
    return out


def list_series(session: Session, flt: SeriesFilter, show_patient_key: bool) -> dict[str, Any]:
    """One page of the filtered, sorted series list: ``{"total", "page", "page_size", "rows"}``."""
    stmt, count = _series_select(session, flt, show_patient_key)
    total = int(session.scalar(count) or 0)
    offset = (flt.page - 1) * flt.page_size
    rows = session.execute(stmt.limit(flt.page_size).offset(offset)).all() if offset < total else []
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
    return cached(("choices", str(bind.url)), 60.0, compute)


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
        "study_instance_uid": study.study_instance_uid, "study_date": iso(study.study_date),
        "description": series.series_description, "protocol": protocol, "scanner": scanner,
        "body_part": series.body_part, "modality": series.modality, "series_number": series.series_number,
        "manufacturer": series.manufacturer, "model_name": series.model_name, "station_name": series.station_name,
        "device_serial": series.device_serial, "status": series.status, "version": series.version,
        "failures": series.failures, "instance_count": series.instance_count,
        "first_received_at": iso(series.first_received_at), "last_received_at": iso(series.last_received_at),
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
                 "last_error": (d.last_error or "")[:300] or None, "delivered_at": iso(d.delivered_at)})
    out["results"] = [
        {"series_result_id": x.id, "version": x.version, "model_version": x.model_version, "verdict": x.verdict,
         "n_slices": x.n_slices, "n_skipped": x.n_skipped, "mean_score": rounded(x.mean_score),
         "min_score": rounded(x.min_score), "p10_score": rounded(x.p10_score),
         "fraction_below": rounded(x.fraction_below), "noise_hu": rounded(x.noise_hu),
         "ctdivol_mgy": rounded(x.ctdivol_mgy), "dw_cm": rounded(x.dw_cm), "ssde_mgy": rounded(x.ssde_mgy),
         "dlp_mgycm": rounded(x.dlp_mgycm), "sr_sop_instance_uid": x.sr_sop_instance_uid,
         "scored_at": iso(x.created_at), "deliveries": deliveries.get(x.id, [])}
        for x in results]
    out["latest"] = out["results"][0] if results else None
    out["slices"] = slices(session, series_id, results[0].version) if results else []
    acq = session.execute(select(func.avg(Instance.kvp), func.avg(Instance.tube_current_ma),
                                 func.avg(Instance.exposure_mas), func.avg(Instance.pitch),
                                 func.avg(Instance.slice_thickness_mm), func.avg(Instance.ctdivol_mgy),
                                 func.min(Instance.kernel), func.max(Instance.kernel),
                                 func.count(Instance.id))
                          .where(Instance.series_id == series_id)).one()
    out["acquisition"] = {"kvp": rounded(acq[0], 1), "tube_current_ma": rounded(acq[1], 1),
                          "exposure_mas": rounded(acq[2], 1), "pitch": rounded(acq[3]),
                          "slice_thickness_mm": rounded(acq[4], 2), "ctdivol_mgy": rounded(acq[5]),
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
                    "instance_number": x.instance_number, "slice_location": rounded(x.slice_location, 2),
                    "position": rounded(position, 2), "score": rounded(x.score), "score_low": rounded(x.score_low),
                    "score_high": rounded(x.score_high), "noise_hu": rounded(x.noise_hu), "dw_cm": rounded(x.dw_cm),
                    "ssde_mgy": rounded(x.ssde_mgy), "ctdivol_mgy": rounded(x.ctdivol_mgy), "kernel": x.kernel,
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
