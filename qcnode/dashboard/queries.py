"""The ground the dashboard's queries share: SQL expressions, value formatting, a small cache.

The queries live beside it by subject (``series_queries``, ``protocol_queries``, ``alert_queries``,
``status_queries``) and return JSON-ready dicts and lists. No patient name is stored anywhere; the only
patient column, ``studies.patient_key``, is shown only while it is pseudonymised
(``privacy.pseudonymise_patient_id``), else left out.
"""
from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from qcnode.db.models import Series, SeriesResult
from qcnode.db.queue import as_utc

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


def is_latest(r: Any) -> Any:
    """``r`` (a series_results alias joined to ``series``) is its series' latest round. A result of
    the round last queued (``series.version``) is the latest by construction: tested first, it spares
    most rows the subquery (the databases stop at the first true term of an OR)."""
    return sa.or_(r.version == Series.version, r.version == _latest_version())


def iso(value: Any) -> Any:
    """Dates and (UTC) datetimes as ISO strings; anything else unchanged."""
    if isinstance(value, dt.datetime):
        return as_utc(value).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def utc_day(session: Session, column: Any) -> Any:
    """SQL for the UTC calendar date of a timestamp column, computed by the database (parsing 10^4
    timestamps in Python costs more than the query): 'YYYY-MM-DD' text on SQLite, a DATE on PostgreSQL."""
    if session.get_bind().dialect.name == "postgresql":
        return sa.cast(func.timezone("UTC", column), sa.Date)
    return sa.type_coerce(func.date(column), sa.String)


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


# ---- small TTL cache for filter choices (distinct values change rarely) --------------------------------
_cache: dict[tuple[Any, ...], tuple[float, Any]] = {}
_cache_lock = threading.Lock()


def cached(key: tuple[Any, ...], ttl: float, compute: Callable[[], Any]) -> Any:
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
