"""What ``qcnode status`` and the dashboard's overview show, read in one session.

Queue depths, series by state, deliveries by state, dead letters, last errors, quarantine and the
model version last used: shared by the CLI (``qcnode.cli.service.collect_status``) and the web
pages/API, so both always show the same numbers.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from qcnode.db.alert_models import AlertWebhook
from qcnode.db.models import Delivery, Job, QuarantineRecord, Series, SeriesResult
from qcnode.db.states import DeliveryState, JobState, SeriesState


def status_counts(s: Session) -> dict[str, Any]:
    """Series, jobs, deliveries and alert webhooks by state, failed series, last errors, dead letters
    (deliveries and webhooks), quarantine, the model version of the latest result and the number of
    results."""
    def counts(col: Any) -> dict[str, int]:
        return {str(k): int(v) for k, v in s.execute(select(col, func.count()).group_by(col)).all()}
    out: dict[str, Any] = {}
    out["series"] = counts(Series.status)
    out["jobs"] = counts(Job.status)
    out["deliveries"] = counts(Delivery.status)
    out["webhooks"] = counts(AlertWebhook.status)  # alert webhook POSTs ([alerts])
    out["quarantine"] = int(s.scalar(select(func.count(QuarantineRecord.id))) or 0)
    out["failed_series"] = [
        {"series_id": x.id, "series_instance_uid": x.series_instance_uid, "version": x.version,
         "failures": x.failures, "retry_at": str(x.retry_at) if x.retry_at else None}
        for x in s.scalars(select(Series).where(Series.status == SeriesState.FAILED).order_by(Series.id).limit(20))]
    out["last_job_errors"] = [
        {"job_id": j.id, "series_id": j.series_id, "version": j.series_version, "status": j.status,
         "attempts": j.attempts, "error": (j.last_error or "").splitlines()[0][:300]}
        for j in s.scalars(select(Job).where(Job.last_error.is_not(None), Job.status != JobState.DONE)
                           .order_by(Job.id.desc()).limit(5))]
    out["dead_letters"] = [
        {"delivery_id": d.id, "destination": d.destination, "kind": d.kind, "attempts": d.attempts,
         "error": (d.last_error or "")[:300]}
        for d in s.scalars(select(Delivery).where(Delivery.status == DeliveryState.DEAD)
                           .order_by(Delivery.id.desc()).limit(20))]
    out["dead_webhooks"] = [
        {"webhook_id": w.id, "alert": f"{w.kind}:{w.ref_id}", "attempts": w.attempts, "error": (w.last_error or "")[:300]}
        for w in s.scalars(select(AlertWebhook).where(AlertWebhook.status == DeliveryState.DEAD)
                           .order_by(AlertWebhook.id.desc()).limit(20))]
    out["last_delivery_errors"] = [
        {"delivery_id": d.id, "destination": d.destination, "status": d.status, "attempts": d.attempts,
         "error": (d.last_error or "")[:300]}
        for d in s.scalars(select(Delivery).where(Delivery.last_error.is_not(None),
                                                  Delivery.status == DeliveryState.PENDING)
                           .order_by(Delivery.id.desc()).limit(5))]
    out["last_quarantine"] = [
        {"at": str(q.received_at), "status": f"0x{q.status_code:04X}" if q.status_code is not None else None,
         "reason": q.reason[:200]}
        for q in s.scalars(select(QuarantineRecord).order_by(QuarantineRecord.id.desc()).limit(5))]
    out["last_model_version"] = s.scalar(select(SeriesResult.model_version)
                                         .order_by(SeriesResult.id.desc()).limit(1))
    out["results"] = int(s.scalar(select(func.count(SeriesResult.id))) or 0)
    return out
