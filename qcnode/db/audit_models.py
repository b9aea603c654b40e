"""ORM classes of the dose-protocol audit tables (created by migration 0002).

One ``audit_runs`` row per audit (nightly or on demand), its per protocol x scanner
statistics in ``audit_protocol_stats`` and the raised flags in ``audit_flags``.
"""
from __future__ import annotations

import datetime as dt
from typing import Optional

from sqlalchemy import Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from qcnode.db.models import Base, utcnow
from qcnode.db.states import AuditRunState


class AuditRun(Base):
    """One audit over the scored-date range [since, until] (inclusive)."""
    __tablename__ = "audit_runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trigger: Mapped[str] = mapped_column(String(16))               # nightly | manual
    since: Mapped[dt.date] = mapped_column()
    until: Mapped[dt.date] = mapped_column(index=True)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column()
    status: Mapped[str] = mapped_column(String(16), default=AuditRunState.RUNNING)  # AuditRunState
    n_series: Mapped[int] = mapped_column(default=0)
    n_groups: Mapped[int] = mapped_column(default=0)
    n_flags: Mapped[int] = mapped_column(default=0)
    message: Mapped[Optional[str]] = mapped_column(Text)
    report_path: Mapped[Optional[str]] = mapped_column(String(512))
    csv_path: Mapped[Optional[str]] = mapped_column(String(512))


class AuditProtocolStat(Base):
    """Statistics of one protocol x scanner group in one audit run (medians and quartiles)."""
    __tablename__ = "audit_protocol_stats"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("audit_runs.id"), index=True)
    protocol: Mapped[str] = mapped_column(String(128))
    scanner: Mapped[str] = mapped_column(String(256))
    n_series: Mapped[int] = mapped_column()
    n_fail: Mapped[int] = mapped_column(default=0)
    fail_fraction: Mapped[float] = mapped_column(Float, default=0.0)
    score_median: Mapped[Optional[float]] = mapped_column(Float)
    score_q1: Mapped[Optional[float]] = mapped_column(Float)
    score_q3: Mapped[Optional[float]] = mapped_column(Float)
    noise_median: Mapped[Optional[float]] = mapped_column(Float)
    noise_q1: Mapped[Optional[float]] = mapped_column(Float)
    noise_q3: Mapped[Optional[float]] = mapped_column(Float)
    ctdivol_median: Mapped[Optional[float]] = mapped_column(Float)
    ctdivol_q1: Mapped[Optional[float]] = mapped_column(Float)
    ctdivol_q3: Mapped[Optional[float]] = mapped_column(Float)
    ssde_median: Mapped[Optional[float]] = mapped_column(Float)
    ssde_q1: Mapped[Optional[float]] = mapped_column(Float)
    ssde_q3: Mapped[Optional[float]] = mapped_column(Float)
    baseline_n: Mapped[int] = mapped_column(default=0)
    baseline_score_median: Mapped[Optional[float]] = mapped_column(Float)
    baseline_noise_median: Mapped[Optional[float]] = mapped_column(Float)
    reference_ctdivol_mgy: Mapped[Optional[float]] = mapped_column(Float)


class AuditFlag(Base):
    """A raised flag: ctdivol_above_reference, noise_drift or score_drift."""
    __tablename__ = "audit_flags"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("audit_runs.id"), index=True)
    protocol: Mapped[str] = mapped_column(String(128))
    scanner: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(String(32), index=True)
    value: Mapped[Optional[float]] = mapped_column(Float)
    reference: Mapped[Optional[float]] = mapped_column(Float)
    message: Mapped[str] = mapped_column(Text)
