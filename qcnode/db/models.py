"""SQLAlchemy 2.0 typed ORM models.

The schema itself is created and changed only by the Alembic migrations in
``migrations/``; these classes must match them (a test compares the two).
Times are timezone-aware UTC. No patient name is ever stored; the patient ID is
stored pseudonymised (keyed hash) unless ``privacy.pseudonymise_patient_id`` is off.
"""
from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer,
                        String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from qcnode.db.states import DeliveryState, JobState, SeriesState


def utcnow() -> dt.datetime:
    """Current time, timezone-aware UTC."""
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: DateTime(timezone=True), dict[str, Any]: JSON, list[Any]: JSON}


UID = String(64)


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_key: Mapped[Optional[str]] = mapped_column(String(128))  # pseudonymised patient ID
    study_date: Mapped[Optional[dt.date]] = mapped_column()
    study_time: Mapped[Optional[str]] = mapped_column(String(16))
    accession_key: Mapped[Optional[str]] = mapped_column(String(128))  # pseudonymised accession
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    series: Mapped[list["Series"]] = relationship(back_populates="study")


class Series(Base):
    """One DICOM series. ``version`` counts scoring rounds: a late instance reopens the series
    (status back to ``receiving``) and the next scoring gets ``version + 1``."""
    __tablename__ = "series"
    __table_args__ = (Index("ix_series_protocol_name", "protocol_name"),  # dashboard filters
                      Index("ix_series_scanner", "manufacturer", "model_name", "station_name"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[Optional[str]] = mapped_column(String(16))
    series_number: Mapped[Optional[int]] = mapped_column()
    series_description: Mapped[Optional[str]] = mapped_column(String(128))
    protocol_name: Mapped[Optional[str]] = mapped_column(String(128))
    body_part: Mapped[Optional[str]] = mapped_column(String(64))
    manufacturer: Mapped[Optional[str]] = mapped_column(String(128))
    model_name: Mapped[Optional[str]] = mapped_column(String(128))
    station_name: Mapped[Optional[str]] = mapped_column(String(128))
    device_serial: Mapped[Optional[str]] = mapped_column(String(128))
    # SeriesState: receiving -> stable (job queued) -> scored / skipped / failed (its job gave up:
    # queued again at retry_at, or by `qcnode rescore`); a late instance sets receiving again
    status: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING, index=True)
    version: Mapped[int] = mapped_column(default=0)  # last version queued for scoring
    failures: Mapped[int] = mapped_column(default=0, server_default="0")  # scoring rounds that gave up
    retry_at: Mapped[Optional[dt.datetime]] = mapped_column()  # when a failed series is queued again
    instance_count: Mapped[int] = mapped_column(default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list["Instance"]] = relationship(back_populates="series")


class Instance(Base):
    """One received SOP instance, durable in the spool. Header dose fields are per instance."""
    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_kernel_series", "kernel", "series_id"),)  # dashboard filter
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[Optional[str]] = mapped_column(UID)
    instance_number: Mapped[Optional[int]] = mapped_column()
    spool_path: Mapped[str] = mapped_column(String(512))  # relative to storage.spool_dir
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    calling_ae: Mapped[Optional[str]] = mapped_column(String(16))
    source_ip: Mapped[Optional[str]] = mapped_column(String(64))
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # set at receipt: False for localizers, non-axial images, dose SRs (stored, not scored)
    scorable: Mapped[bool] = mapped_column(Boolean, default=True)
    skip_reason: Mapped[Optional[str]] = mapped_column(String(256))
    # dose and acquisition header fields (AAPM/DICOM): None where the header lacks them
    ctdivol_mgy: Mapped[Optional[float]] = mapped_column(Float)
    kvp: Mapped[Optional[float]] = mapped_column(Float)
    tube_current_ma: Mapped[Optional[float]] = mapped_column(Float)
    exposure_mas: Mapped[Optional[float]] = mapped_column(Float)
    pitch: Mapped[Optional[float]] = mapped_column(Float)
    kernel: Mapped[Optional[str]] = mapped_column(String(64))
    slice_thickness_mm: Mapped[Optional[float]] = mapped_column(Float)
    slice_location: Mapped[Optional[float]] = mapped_column(Float)
    series: Mapped[Series] = relationship(back_populates="instances")


class SliceScore(Base):
    """Per-slice result of one scoring round (series version) with the physics next to it."""
    __tablename__ = "slice_scores"
    __table_args__ = (UniqueConstraint("instance_id", "series_version", name="uq_slice_score_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    series_version: Mapped[int] = mapped_column()
    model_version: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    score_low: Mapped[float] = mapped_column(Float)
    score_high: Mapped[float] = mapped_column(Float)
    noise_hu: Mapped[Optional[float]] = mapped_column(Float)   # global noise level (GNL)
    dw_cm: Mapped[Optional[float]] = mapped_column(Float)      # water-equivalent diameter
    ssde_mgy: Mapped[Optional[float]] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class SeriesResult(Base):
    """Summary and verdict of one scoring round of a series; one SR per row."""
    __tablename__ = "series_results"
    __table_args__ = (UniqueConstraint("series_id", "version", name="uq_series_result_version"),
                      Index("ix_series_results_verdict_created", "verdict", "created_at"))  # alert list
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    version: Mapped[int] = mapped_column()
    model_version: Mapped[str] = mapped_column(String(64))
    n_slices: Mapped[int] = mapped_column()
    n_skipped: Mapped[int] = mapped_column(default=0)
    mean_score: Mapped[Optional[float]] = mapped_column(Float)
    min_score: Mapped[Optional[float]] = mapped_column(Float)
    p10_score: Mapped[Optional[float]] = mapped_column(Float)
    fraction_below: Mapped[Optional[float]] = mapped_column(Float)
    verdict: Mapped[str] = mapped_column(String(8), index=True)  # PASS / WARN / FAIL
    noise_hu: Mapped[Optional[float]] = mapped_column(Float)      # median over slices
    ctdivol_mgy: Mapped[Optional[float]] = mapped_column(Float)   # mean over slices (headers)
    dw_cm: Mapped[Optional[float]] = mapped_column(Float)         # mean over slices
    ssde_mgy: Mapped[Optional[float]] = mapped_column(Float)      # mean over slices
    dlp_mgycm: Mapped[Optional[float]] = mapped_column(Float)     # from a dose SR, when received
    sr_sop_instance_uid: Mapped[Optional[str]] = mapped_column(UID)
    sr_path: Mapped[Optional[str]] = mapped_column(String(512))   # relative to spool_dir
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class OutboxRow:
    """The columns of an outbox row (deliveries, alert webhooks): state, attempts, back-off, lease."""
    status: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)  # DeliveryState
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    lease_owner: Mapped[Optional[str]] = mapped_column(String(128))
    lease_expires_at: Mapped[Optional[dt.datetime]] = mapped_column()
    last_error: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[Optional[dt.datetime]] = mapped_column()


class Delivery(OutboxRow, Base):
    """Outbox row: one payload (``sr``, ``kos`` or ``series``) for one destination."""
    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("series_result_id", "destination", "kind", name="uq_delivery"),
                      Index("ix_deliveries_status_next", "status", "next_attempt_at"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_result_id: Mapped[int] = mapped_column(ForeignKey("series_results.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # sr | kos | series


class Job(Base):
    """Durable work queue row, claimed with a lease (row locks on PostgreSQL)."""
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("kind", "series_id", "series_version", name="uq_job"),
                      Index("ix_jobs_status_not_before", "status", "not_before"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # score_series
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    series_version: Mapped[int] = mapped_column()
    status: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)  # JobState
    attempts: Mapped[int] = mapped_column(default=0)  # claims that ran to an outcome (or are running)
    # claims of an expired lease: its process died mid-job (not counted against worker.max_attempts)
    interruptions: Mapped[int] = mapped_column(default=0, server_default="0")
    not_before: Mapped[dt.datetime] = mapped_column(default=utcnow)
    lease_owner: Mapped[Optional[str]] = mapped_column(String(128))
    lease_expires_at: Mapped[Optional[dt.datetime]] = mapped_column()
    last_error: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[Optional[dt.datetime]] = mapped_column()


class QuarantineRecord(Base):
    """Input refused at receipt (or found bad later): a copy lies in the quarantine folder."""
    __tablename__ = "quarantine"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    reason: Mapped[str] = mapped_column(Text)
    status_code: Mapped[Optional[int]] = mapped_column()  # DIMSE status returned
    path: Mapped[Optional[str]] = mapped_column(String(512))  # relative to quarantine_dir
    calling_ae: Mapped[Optional[str]] = mapped_column(String(16))
    source_ip: Mapped[Optional[str]] = mapped_column(String(64))
    sop_class_uid: Mapped[Optional[str]] = mapped_column(UID)
    sop_instance_uid: Mapped[Optional[str]] = mapped_column(UID)


class DoseReport(Base):
    """A CT Radiation Dose SR received for a study (stored for the audit, never scored)."""
    __tablename__ = "dose_reports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    total_dlp_mgycm: Mapped[Optional[float]] = mapped_column(Float)
    # [{"protocol": str|None, "ctdivol_mgy": float|None, "dlp_mgycm": float|None,
    #   "phantom": "head"|"body"|None, "target_region": str|None}, ...]
    events: Mapped[list[Any]] = mapped_column(default=list)
    spool_path: Mapped[str] = mapped_column(String(512))
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


from qcnode.db import audit_models as _audit_models  # noqa: E402,F401  (audit tables, migration 0002)
from qcnode.db import alert_models as _alert_models  # noqa: E402,F401  (alert tables, migration 0004)
