"""The dashboard's audit and alert queries: audit runs with their flags, and the alerts (FAIL
verdicts and audit flags) with their acknowledgement and webhook state."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from qcnode.dashboard.queries import iso, protocol_expr, rounded, scanner_expr
from qcnode.db.alert_models import ALERT_AUDIT_FLAG, ALERT_VERDICT_FAIL, AlertAck, AlertWebhook
from qcnode.db.audit_models import AuditFlag, AuditRun
from qcnode.db.models import Series, SeriesResult
from qcnode.db.queue import as_utc


def audit_runs(session: Session, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
    """Audit runs, newest first, each with its flags."""
    runs = session.scalars(select(AuditRun).order_by(AuditRun.id.desc()).limit(limit).offset(offset)).all()
    flags: dict[int, list[dict[str, Any]]] = {}
    if runs:
        for f in session.scalars(select(AuditFlag).where(AuditFlag.run_id.in_([x.id for x in runs]))
                                 .order_by(AuditFlag.id)):
            flags.setdefault(f.run_id, []).append(_flag(f))
    return [{"run_id": x.id, "trigger": x.trigger, "since": iso(x.since), "until": iso(x.until),
             "started_at": iso(x.started_at), "finished_at": iso(x.finished_at), "status": x.status,
             "n_series": x.n_series, "n_groups": x.n_groups, "n_flags": x.n_flags, "message": x.message,
             "has_report": bool(x.report_path), "flags": flags.get(x.id, [])} for x in runs]


def _flag(f: AuditFlag) -> dict[str, Any]:
    return {"flag_id": f.id, "run_id": f.run_id, "protocol": f.protocol, "scanner": f.scanner, "kind": f.kind,
            "value": rounded(f.value), "reference": rounded(f.reference), "message": f.message}


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
                                "at": iso(x.at), "protocol": x.protocol, "scanner": x.scanner,
                                "acknowledged": None, "webhook": hooks.get((x.kind, x.ref_id))}
        if x.kind == ALERT_VERDICT_FAIL:
            item.update(series_id=m["series_id"], version=m["version"], title="FAIL verdict",
                        message=f"mean score {rounded(m['mean_score'], 2)}, "
                                f"{round(100 * (m['fraction_below'] or 0))} % of slices low quality")
        else:
            item.update(run_id=m["run_id"], flag_kind=m["flag_kind"], title=f"audit flag {m['flag_kind']}",
                        message=m["message"])
        if x.acknowledged_by is not None:
            item["acknowledged"] = {"by": x.acknowledged_by, "at": iso(x.acknowledged_at), "comment": x.comment}
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
