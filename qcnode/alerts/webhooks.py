"""Optional webhooks: an HTTP POST of a JSON alert per alert kind (``[alerts]`` URLs).

``enqueue_webhooks`` adds an ``alert_webhooks`` row for every alert of a kind with a URL that is
younger than ``alerts.webhook_lookback_hours`` and has none yet (so setting a URL does not replay
the whole history); ``WebhookSender.run_once`` claims due rows with the outbox's machinery
(``claim_rows``: leases, FOR UPDATE SKIP LOCKED on PostgreSQL), POSTs them and records the outcome
with the deliveries' policy (``settle_attempt``: back-off ``outbox.backoff_*``, dead letter after
``outbox.max_attempts``). Runs in ``qcnode serve``'s worker side. The JSON carries no patient data.
"""
from __future__ import annotations

import datetime as dt
import json
import urllib.error
import urllib.request
from typing import Any, Callable

from sqlalchemy import and_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qcnode.config import Config
from qcnode.db.alert_models import ALERT_AUDIT_FLAG, ALERT_VERDICT_FAIL, AlertWebhook
from qcnode.db.audit_models import AuditFlag, AuditRun
from qcnode.db.models import Series, SeriesResult, utcnow
from qcnode.db.queue import LeaseKeeper, as_utc, claim_rows, settle_attempt
from qcnode.db.states import DeliveryState
from qcnode.log import get_logger

log = get_logger("qcnode.alerts.webhooks")
SENDING = DeliveryState.SENDING


def webhook_url(cfg: Config, kind: str) -> str:
    return {ALERT_VERDICT_FAIL: cfg.alerts.webhook_verdict_fail, ALERT_AUDIT_FLAG: cfg.alerts.webhook_audit_flag}[kind]


def enqueue_webhooks(session: Session, cfg: Config, now: dt.datetime | None = None) -> int:
    """Queue the POST of every recent alert of a kind with a URL (idempotent); commits. Returns how many."""
    since = (now or utcnow()) - dt.timedelta(hours=cfg.alerts.webhook_lookback_hours)
    queued = []
    none_yet = lambda kind, ref: ~select(AlertWebhook.id).where(  # noqa: E731
        AlertWebhook.kind == kind, AlertWebhook.ref_id == ref).exists()
    if cfg.alerts.webhook_verdict_fail:
        queued += [(ALERT_VERDICT_FAIL, i) for i in session.scalars(select(SeriesResult.id).where(
            SeriesResult.verdict == "FAIL", SeriesResult.created_at >= since,
            none_yet(ALERT_VERDICT_FAIL, SeriesResult.id)))]
    if cfg.alerts.webhook_audit_flag:
        queued += [(ALERT_AUDIT_FLAG, i) for i in session.scalars(
            select(AuditFlag.id).join(AuditRun, AuditRun.id == AuditFlag.run_id).where(
                AuditRun.started_at >= since, none_yet(ALERT_AUDIT_FLAG, AuditFlag.id)))]
    n = 0
    for kind, ref_id in queued:
        try:
            with session.begin_nested():
                session.add(AlertWebhook(kind=kind, ref_id=ref_id, status=DeliveryState.PENDING, attempts=0,
                                         next_attempt_at=utcnow()))
            n += 1
        except IntegrityError:  # queued concurrently by another node
            pass
    session.commit()
    return n


def alert_payload(session: Session, kind: str, ref_id: int) -> dict[str, Any] | None:
    """The JSON body of one alert (None when its row no longer exists): no patient data."""
    if kind == ALERT_VERDICT_FAIL:
        row = session.execute(select(SeriesResult, Series).join(Series, Series.id == SeriesResult.series_id)
                              .where(SeriesResult.id == ref_id)).first()
        if row is None:
            return None
        r, s = row
        return {"alert_id": f"{kind}:{ref_id}", "kind": kind, "at": as_utc(r.created_at).isoformat(),
                "series_id": s.id, "series_instance_uid": s.series_instance_uid, "version": r.version,
                "protocol": s.protocol_name, "series_description": s.series_description,
                "scanner": " ".join(x for x in (s.manufacturer, s.model_name, s.station_name) if x),
                "verdict": r.verdict, "mean_score": r.mean_score, "fraction_below": r.fraction_below,
                "model_version": r.model_version}
    f = session.get(AuditFlag, ref_id)
    if f is None:
        return None
    return {"alert_id": f"{kind}:{ref_id}", "kind": kind, "flag": f.kind, "run_id": f.run_id,
            "protocol": f.protocol, "scanner": f.scanner, "value": f.value, "reference": f.reference,
            "message": f.message}


def post_json(url: str, body: dict[str, Any], timeout: float) -> None:
    """POST ``body`` as JSON; raises on a network error or a non-2xx answer."""
    req = urllib.request.Request(url, data=json.dumps(body, default=str).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "qcnode-alerts"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - URL from the config
            if not 200 <= resp.status < 300:
                raise RuntimeError(f"HTTP {resp.status}")
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"HTTP {exc.code}") from None


class WebhookSender:
    """Queues and sends due webhook POSTs; ``run_once`` is called in a loop by ``qcnode serve``."""

    def __init__(self, cfg: Config, session_factory: Callable[[], Session], owner: str):
        self.cfg = cfg
        self.session_factory = session_factory
        self.owner = owner

    def run_once(self) -> int:
        """Queue new alerts, then send up to ``outbox.batch_size`` due POSTs; returns how many were tried."""
        with self.session_factory() as session:
            enqueue_webhooks(session, self.cfg)
        done = 0
        while done < max(1, self.cfg.outbox.batch_size):
            with self.session_factory() as session:
                now = utcnow()
                rows = claim_rows(session, AlertWebhook, self.owner, self.cfg.outbox.lease_seconds, now=now,
                                  due=and_(AlertWebhook.status == DeliveryState.PENDING, AlertWebhook.next_attempt_at <= now),
                                  running_status=SENDING, order_by=(AlertWebhook.next_attempt_at, AlertWebhook.id))
                claimed = [(w.id, w.kind, w.ref_id, w.attempts) for w in rows]
                session.commit()
            if not claimed:
                break
            self._send(*claimed[0])
            done += 1
        return done

    def _send(self, row_id: int, kind: str, ref_id: int, attempt: int) -> None:
        url = webhook_url(self.cfg, kind)
        error, dead = None, False
        if not url:
            error, dead = "no webhook URL configured for this alert kind any more", True
        else:
            try:
                with self.session_factory() as session:
                    body = alert_payload(session, kind, ref_id)
                if body is None:
                    error, dead = "the alert no longer exists", True
                else:
                    with LeaseKeeper(self.session_factory, AlertWebhook, row_id, self.owner,
                                     self.cfg.outbox.lease_seconds):
                        post_json(url, body, self.cfg.alerts.webhook_timeout_seconds)
            except Exception as exc:  # noqa: BLE001 - any failure is recorded and retried
                error = f"{type(exc).__name__}: {exc}"
        with self.session_factory() as session:
            w = session.get(AlertWebhook, row_id, with_for_update=True)
            if w is None or w.lease_owner != self.owner or w.status != SENDING:
                session.commit()
                return
            ob = self.cfg.outbox
            info = settle_attempt(w, error, max_attempts=ob.max_attempts, backoff_initial=ob.backoff_initial_seconds,
                                  backoff_max=ob.backoff_max_seconds, dead=dead)
            session.commit()
        (log.info if error is None else log.warning)("webhook_attempt", alert_kind=kind, ref_id=ref_id,
                                                      attempt=attempt, error=error, **info)
