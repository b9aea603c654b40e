"""What the dashboard's pages and JSON API share: the sessions, page rendering, the CSRF check and the
two mutating actions (acknowledge an alert, score a series again), built once per router."""
from __future__ import annotations

import datetime as dt
import json
from typing import Any, Callable

from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from qcnode.alerts.store import acknowledge
from qcnode.config import Config
from qcnode.dashboard import csrf
from qcnode.dashboard.alert_queries import alert_exists
from qcnode.dashboard.palette import protocol_colour
from qcnode.dashboard.series_queries import series_exists
from qcnode.db.alert_models import ALERT_KINDS
from qcnode.db.engine import read_only_sessions
from qcnode.db.models import utcnow
from qcnode.log import get_logger

log = get_logger("qcnode.dashboard")


def user_name(user: Any) -> str:
    """A printable name of whatever ``current_user`` returned (a string, a dict or an object)."""
    if user is None:
        return "anonymous"
    if isinstance(user, str):
        return user
    if isinstance(user, dict):
        return str(user.get("name") or user.get("user") or user.get("id") or "anonymous")
    return str(getattr(user, "name", None) or getattr(user, "id", None) or user)


def _date(value: str | None, default: dt.date) -> dt.date:
    try:
        return dt.date.fromisoformat(value) if value else default
    except ValueError:
        return default


class Dashboard:
    """The state and helpers of one dashboard router (see ``qcnode.dashboard.router.build_router``).

    Reads go through read-only sessions (on SQLite they never take the write lock receiving needs)."""

    def __init__(self, session_factory: Callable[[], Any], cfg: Config, *, require_admin: Callable[..., Any],
                 current_user: Callable[..., Any]):
        self.session_factory = session_factory
        self.cfg = cfg
        self.read_sf = read_only_sessions(session_factory) if hasattr(session_factory, "kw") else session_factory
        self.show_key = cfg.privacy.pseudonymise_patient_id  # a raw PatientID is never shown
        self.spool_dir = cfg.path(cfg.storage.spool_dir)
        self.current_user = current_user
        self.protector = csrf.Csrf(csrf.load_or_create_key(cfg.path(cfg.dashboard.secret_key_file)))
        self.env = Environment(loader=PackageLoader("qcnode.dashboard", "templates"),
                               autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
        self.env.filters["colour"] = protocol_colour
        self.env.filters["num"] = lambda v, d=2: "" if v is None else f"{v:.{d}f}"
        self.env.filters["tojson_attr"] = lambda v: json.dumps(v, separators=(",", ":"))
        self.mutating = [Depends(require_admin), Depends(self.check_csrf)]  # dependencies of mutating routes

    def page(self, request: Request, template: str, title: str, **ctx: Any) -> HTMLResponse:
        """Render ``template``; sets the CSRF cookie when the browser has no valid one yet."""
        token = request.cookies.get(csrf.COOKIE)
        fresh = not self.protector.valid(token)
        if fresh:
            token = self.protector.new_token()
        base = request.scope.get("root_path", "").rstrip("/")
        path = request.url.path
        nav = (path[len(base):] or "/") if base and path.startswith(base) else path
        html = self.env.get_template(template).render(request=request, base=base, title=title, csrf_token=token,
                                                      csrf_field=csrf.FIELD, nav=nav, **ctx)
        resp = HTMLResponse(html)
        if fresh:
            resp.set_cookie(csrf.COOKIE, token, httponly=True, samesite="strict", path=base or "/",
                            secure=csrf.secure_cookies(self.cfg.http, request.url.scheme))
        return resp

    async def check_csrf(self, request: Request) -> None:
        """Refuse a mutating request without the matching signed token (``csrf.Csrf.check``)."""
        await self.protector.check(request)

    def do_ack(self, kind: str, ref_id: int, user: Any, comment: str | None) -> tuple[int, str]:
        if kind not in ALERT_KINDS:
            raise HTTPException(404, "unknown alert kind")
        with self.session_factory() as s:
            if not alert_exists(s, kind, ref_id):
                raise HTTPException(404, "no such alert")
            ack = acknowledge(s, kind, ref_id, user_name(user), comment)
        return (200, "acknowledged") if ack is not None else (409, "already acknowledged")

    def do_rescore(self, series_id: int, user: Any) -> int | None:
        from qcnode.tracking.series import rescore_series
        with self.read_sf() as s:
            if not series_exists(s, series_id):
                raise HTTPException(404, "no such series")
        version = rescore_series(self.session_factory, series_id)
        log.info("series_rescore_requested", series_id=series_id, user=user_name(user), queued_version=version)
        return version

    def protocol_args(self, request: Request) -> dict[str, Any]:
        p = request.query_params
        until = _date(p.get("until"), utcnow().date())
        days = max(0, self.cfg.dashboard.protocols_days - 1)
        default_since = until - dt.timedelta(days=days) if until.toordinal() > days else dt.date.min
        since = _date(p.get("since"), default_since)
        return {"since": min(since, until), "until": until, "scanner": p.get("scanner") or None,
                "protocol": p.get("protocol") or None}
