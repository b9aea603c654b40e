"""Audit statistics: per protocol x scanner medians and IQRs over a range of scored dates.

Rows come from the ``v_series_qa`` view (latest scoring round per series), so the audit
reads exactly what users query in SQL.
"""
from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import Session

# The view as a lightweight table: typed columns make dates portable (SQLite stores text).
V_SERIES_QA = sa.table(
    "v_series_qa",
    sa.column("series_result_id", sa.Integer),
    sa.column("series_instance_uid", sa.String),
    sa.column("study_date", sa.Date),
    sa.column("scored_date", sa.Date),
    sa.column("qa_date", sa.Date),
    sa.column("protocol", sa.String),
    sa.column("scanner", sa.String),
    sa.column("mean_score", sa.Float),
    sa.column("verdict", sa.String),
    sa.column("noise_hu", sa.Float),
    sa.column("ctdivol_mgy", sa.Float),
    sa.column("ssde_mgy", sa.Float),
    sa.column("model_version", sa.String),
)

METRICS = ("score", "noise", "ctdivol", "ssde")


@dataclass(frozen=True)
class SeriesRow:
    """One scored series as the audit sees it."""
    protocol: str
    scanner: str
    scored_date: dt.date
    score: float | None
    verdict: str
    noise: float | None
    ctdivol: float | None
    ssde: float | None


@dataclass
class Quartiles:
    median: float | None = None
    q1: float | None = None
    q3: float | None = None
    n: int = 0


@dataclass
class GroupStats:
    """Statistics of one protocol x scanner group."""
    protocol: str
    scanner: str
    n_series: int
    n_fail: int
    fail_fraction: float
    metrics: dict[str, Quartiles] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.protocol, self.scanner)


def fetch_series(session: Session, since: dt.date, until: dt.date) -> list[SeriesRow]:
    """Scored series (latest version each) whose scored date lies in [since, until]."""
    v = V_SERIES_QA.c
    stmt = (sa.select(v.protocol, v.scanner, v.scored_date, v.mean_score, v.verdict, v.noise_hu,
                      v.ctdivol_mgy, v.ssde_mgy)
            .where(v.scored_date >= since, v.scored_date <= until)
            .order_by(v.scored_date, v.series_result_id))
    return [SeriesRow(protocol=r.protocol, scanner=r.scanner, scored_date=r.scored_date, score=r.mean_score,
                      verdict=r.verdict, noise=r.noise_hu, ctdivol=r.ctdivol_mgy, ssde=r.ssde_mgy)
            for r in session.execute(stmt)]


def quartiles(values: Iterable[float | None]) -> Quartiles:
    """Median and quartiles of the non-missing values (None when there are none)."""
    arr = np.array([float(v) for v in values if v is not None and np.isfinite(v)], dtype=float)
    if arr.size == 0:
        return Quartiles()
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return Quartiles(median=float(med), q1=float(q1), q3=float(q3), n=int(arr.size))


def group_rows(rows: Iterable[SeriesRow]) -> dict[tuple[str, str], list[SeriesRow]]:
    """Rows grouped by (protocol, scanner), in first-seen order."""
    groups: dict[tuple[str, str], list[SeriesRow]] = defaultdict(list)
    for row in rows:
        groups[(row.protocol, row.scanner)].append(row)
    return dict(groups)


def group_stats(rows: Iterable[SeriesRow]) -> list[GroupStats]:
    """Per protocol x scanner: count, FAIL fraction, median/IQR of score, noise, CTDIvol, SSDE.
    Sorted by protocol, then scanner."""
    out = []
    for (protocol, scanner), members in group_rows(rows).items():
        n_fail = sum(1 for r in members if (r.verdict or "").upper() == "FAIL")
        out.append(GroupStats(
            protocol=protocol, scanner=scanner, n_series=len(members), n_fail=n_fail,
            fail_fraction=n_fail / len(members),
            metrics={m: quartiles(getattr(r, m) for r in members) for m in METRICS}))
    return sorted(out, key=lambda g: (g.protocol.lower(), g.scanner.lower()))


def daily_medians(rows: Iterable[SeriesRow]) -> dict[tuple[str, str], list[tuple[dt.date, dict[str, float | None]]]]:
    """Per group, per scored date: the median of each metric (for the trend plots)."""
    out: dict[tuple[str, str], list[tuple[dt.date, dict[str, float | None]]]] = {}
    for key, members in group_rows(rows).items():
        by_day: dict[dt.date, list[SeriesRow]] = defaultdict(list)
        for r in members:
            by_day[r.scored_date].append(r)
        out[key] = [(day, {m: quartiles(getattr(r, m) for r in by_day[day]).median for m in METRICS})
                    for day in sorted(by_day)]
    return out
