"""ORM classes of the alert tables (created by migration 0004).

An alert is a FAIL verdict (a ``series_results`` row) or an audit flag (an ``audit_flags`` row):
``(kind, ref_id)`` names it, so alerts need no table of their own. ``alert_acks`` stores who
acknowledged one, when and why; ``alert_webhooks`` is the outbox of their optional webhook POSTs,
claimed and retried like ``deliveries`` (same lease columns, same back-off policy).
"""
from __future__ import annotations

import datetime as dt
from typing import Optional

from sqlalchemy import Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from qcnode.db.models import Base, OutboxRow, utcnow

ALERT_VERDICT_FAIL = "verdict_fail"
ALERT_AUDIT_FLAG = "audit_flag"
ALERT_KINDS = (ALERT_VERDICT_FAIL, ALERT_AUDIT_FLAG)


class AlertAck(Base):
    """One acknowledgement of one alert (at most one per alert)."""
    __tablename__ = "alert_acks"
    __table_args__ = (UniqueConstraint("kind", "ref_id", name="uq_alert_ack"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    ref_id: Mapped[int] = mapped_column()
    acknowledged_by: Mapped[str] = mapped_column(String(128))
    acknowledged_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    comment: Mapped[Optional[str]] = mapped_column(Text)


class AlertWebhook(OutboxRow, Base):
    """Outbox row: the webhook POST of one alert (pending / sending / delivered / dead)."""
    __tablename__ = "alert_webhooks"
    __table_args__ = (UniqueConstraint("kind", "ref_id", name="uq_alert_webhook"),
                      Index("ix_alert_webhooks_status_next", "status", "next_attempt_at"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    ref_id: Mapped[int] = mapped_column()
