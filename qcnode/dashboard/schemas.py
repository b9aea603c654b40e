"""Response models of the JSON API (they document /docs and /openapi.json; the queries return the
same fields as plain dicts). Optional fields are None where the header or the round lacks them."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel


class SeriesRow(BaseModel):
    series_id: int
    series_instance_uid: str
    study_instance_uid: str
    patient_key: Optional[str] = None  # only while pseudonymised
    study_date: Optional[str] = None
    received_at: str
    series_description: Optional[str] = None
    protocol: str
    body_part: Optional[str] = None
    scanner: str
    status: str
    instance_count: int
    version: Optional[int] = None
    model_version: Optional[str] = None
    n_slices: Optional[int] = None
    mean_score: Optional[float] = None
    min_score: Optional[float] = None
    fraction_below: Optional[float] = None
    verdict: Optional[str] = None
    noise_hu: Optional[float] = None
    ctdivol_mgy: Optional[float] = None
    ssde_mgy: Optional[float] = None
    dlp_mgycm: Optional[float] = None
    scored_at: Optional[str] = None


class SeriesList(BaseModel):
    total: int
    page: int
    page_size: int
    rows: list[SeriesRow]


class Slice(BaseModel):
    instance_id: int
    sop_instance_uid: str
    instance_number: Optional[int] = None
    slice_location: Optional[float] = None
    position: Optional[float] = None
    score: float
    score_low: float
    score_high: float
    noise_hu: Optional[float] = None
    dw_cm: Optional[float] = None
    ssde_mgy: Optional[float] = None
    ctdivol_mgy: Optional[float] = None
    kernel: Optional[str] = None


class Acknowledgement(BaseModel):
    by: str
    at: str
    comment: Optional[str] = None


class WebhookState(BaseModel):
    status: str
    attempts: int
    last_error: Optional[str] = None


class Alert(BaseModel):
    alert_id: str
    kind: str
    ref_id: int
    at: str
    title: str
    message: Optional[str] = None
    protocol: Optional[str] = None
    scanner: Optional[str] = None
    series_id: Optional[int] = None
    version: Optional[int] = None
    run_id: Optional[int] = None
    flag_kind: Optional[str] = None
    acknowledged: Optional[Acknowledgement] = None
    webhook: Optional[WebhookState] = None


class AlertList(BaseModel):
    total: int
    unacknowledged: int
    rows: list[Alert]


class AckResult(BaseModel):
    alert_id: str
    status: str


class RescoreResult(BaseModel):
    series_id: int
    queued_version: Optional[int] = None
    status: str


class AuditFlag(BaseModel):
    flag_id: int
    run_id: int
    protocol: str
    scanner: str
    kind: str
    value: Optional[float] = None
    reference: Optional[float] = None
    message: str


class AuditRun(BaseModel):
    run_id: int
    trigger: str
    since: str
    until: str
    started_at: str
    finished_at: Optional[str] = None
    status: str
    n_series: int
    n_groups: int
    n_flags: int
    message: Optional[str] = None
    has_report: bool
    flags: list[AuditFlag]
