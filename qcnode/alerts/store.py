"""Acknowledging alerts (who, when, comment), stored in ``alert_acks``; every acknowledgement logged."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qcnode.db.alert_models import ALERT_KINDS, AlertAck
from qcnode.log import get_logger

log = get_logger("qcnode.alerts")
MAX_COMMENT = 2000


def acknowledge(session: Session, kind: str, ref_id: int, user: str, comment: str | None) -> AlertAck | None:
    """Store the acknowledgement of alert (kind, ref_id) by ``user`` and commit; None when it was
    already acknowledged (the first acknowledgement stays). The comment itself is not logged (free
    text a user typed), only its length."""
    if kind not in ALERT_KINDS:
        raise ValueError(f"unknown alert kind {kind!r}")
    comment = (comment or "").strip()[:MAX_COMMENT] or None
    ack = AlertAck(kind=kind, ref_id=ref_id, acknowledged_by=user[:128], comment=comment)
    try:
        with session.begin_nested():
            session.add(ack)
        session.commit()
    except IntegrityError:
        session.rollback()
        return None
    log.info("alert_acknowledged", alert_kind=kind, ref_id=ref_id, user=user,
             comment_chars=len(comment or ""))
    return ack


def acknowledgement(session: Session, kind: str, ref_id: int) -> AlertAck | None:
    return session.scalar(select(AlertAck).where(AlertAck.kind == kind, AlertAck.ref_id == ref_id))
