"""The dashboard's routes: server-rendered pages, CSV downloads, the JSON API under /api/v1 and
/metrics, all on the queries of ``qcnode.dashboard.*_queries``.

``build_router`` takes the authentication as FastAPI dependencies from the app that serves it
(``qcnode.http.app``): ``require_read`` guards every route but the style sheet, ``require_admin`` the mutating ones (acknowledge an alert,
score a series again), ``current_user`` names who acts (stored with an acknowledgement, logged with
every mutating action). Mutating routes also need the CSRF token (``qcnode.dashboard.csrf``).
Links honour the ASGI ``root_path`` (a reverse proxy's path prefix).
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import (FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse,
                               Response, StreamingResponse)
from jinja2 import Environment, PackageLoader, select_autoescape

from qcnode.alerts.store import acknowledge
from qcnode.config import Config
from qcnode.dashboard import (alert_queries, charts, csrf, protocol_queries, queries, schemas, series_queries,
                              status_queries)
from qcnode.dashboard.metrics import registry_for
from qcnode.dashboard.palette import protocol_colour
from qcnode.db.alert_models import ALERT_KINDS
from qcnode.db.engine import read_only_sessions
from qcnode.db.models import utcnow
from qcnode.log import get_logger

log = get_logger("qcnode.dashboard")
STATIC_DIR = Path(__file__).resolve().parent / "static"
SERIES_CSV_COLUMNS = ["series_id", "series_instance_uid", "study_instance_uid", "patient_key", "study_date",
                      "received_at", "series_description", "protocol", "body_part", "scanner", "status",
                      "instance_count", "version", "model_version", "n_slices", "mean_score", "min_score",
                      "fraction_below", "verdict", "noise_hu", "ctdivol_mgy", "ssde_mgy", "dlp_mgycm", "scored_at"]


def _plotly_js() -> Path:
    import plotly
    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


def user_name(user: Any) -> str:
    """A printable name of whatever ``current_user`` returned (a string, a dict or an object)."""
    if user is None:
        return "anonymous"
    if isinstance(user, str):
        return user
    if isinstance(user, dict):
        return str(user.get("name") or user.get("user") or user.get("id") or "anonymous")
    return str(getattr(user, "name", None) or getattr(user, "id", None) or user)


def _csv_response(filename: str, columns: list[str], rows: Iterable[dict[str, Any]]) -> StreamingResponse:
    """Stream ``rows`` as CSV with the given columns (missing keys empty)."""
    def gen() -> Iterator[str]:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow(row)
            if i % 500 == 499:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue()
    return StreamingResponse(gen(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def _date(value: str | None, default: dt.date) -> dt.date:
    try:
        return dt.date.fromisoformat(value) if value else default
    except ValueError:
        return default


def build_router(session_factory: Callable[[], Any], cfg: Config, *, require_read: Callable[..., Any],
                 require_admin: Callable[..., Any], current_user: Callable[..., Any]) -> APIRouter:
    """The dashboard, API and /metrics on ``session_factory`` (a sessionmaker of qcnode's database).

    Reads go through read-only sessions (on SQLite they never take the write lock receiving needs)."""
    read_sf = read_only_sessions(session_factory) if hasattr(session_factory, "kw") else session_factory
    show_key = cfg.privacy.pseudonymise_patient_id  # a raw PatientID is never shown
    spool_dir = cfg.path(cfg.storage.spool_dir)
    protector = csrf.Csrf(csrf.load_or_create_key(cfg.path(cfg.dashboard.secret_key_file)))
    env = Environment(loader=PackageLoader("qcnode.dashboard", "templates"),
                      autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["colour"] = protocol_colour
    env.filters["num"] = lambda v, d=2: "" if v is None else f"{v:.{d}f}"
    env.filters["tojson_attr"] = lambda v: json.dumps(v, separators=(",", ":"))
    registry = registry_for(read_sf)
    statics = {"plotly.min.js": (_plotly_js(), "application/javascript"),
               "dashboard.js": (STATIC_DIR / "dashboard.js", "application/javascript"),
               "dashboard.css": (STATIC_DIR / "dashboard.css", "text/css")}

    router = APIRouter(dependencies=[Depends(require_read)])
    public = APIRouter()  # the style sheet: the sign-in page needs it before any token

    # ---- helpers ------------------------------------------------------------------------------------
    def page(request: Request, template: str, title: str, **ctx: Any) -> HTMLResponse:
        """Render ``template``; sets the CSRF cookie when the browser has no valid one yet."""
        token = request.cookies.get(csrf.COOKIE)
        fresh = not protector.valid(token)
        if fresh:
            token = protector.new_token()
        base = request.scope.get("root_path", "").rstrip("/")
        path = request.url.path
        nav = (path[len(base):] or "/") if base and path.startswith(base) else path
        html = env.get_template(template).render(request=request, base=base, title=title, csrf_token=token,
                                                 csrf_field=csrf.FIELD, nav=nav, **ctx)
        resp = HTMLResponse(html)
        if fresh:
            resp.set_cookie(csrf.COOKIE, token, httponly=True, samesite="strict", path=base or "/",
                            secure=request.url.scheme == "https")
        return resp

    async def check_csrf(request: Request) -> None:
        """Refuse a mutating request without the matching signed token (unless it carries an
        Authorization header, which a browser never sends cross-site on its own)."""
        if request.headers.get("authorization"):
            return
        submitted = request.headers.get(csrf.HEADER)
        if submitted is None and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")):
            submitted = (await request.form()).get(csrf.FIELD)
        if not protector.matches(request.cookies.get(csrf.COOKIE), submitted if isinstance(submitted, str) else None):
            log.warning("csrf_refused", path=request.url.path, client=request.client.host if request.client else None)
            raise HTTPException(403, "CSRF token missing or invalid: reload the page and try again")

    mutating = [Depends(require_admin), Depends(check_csrf)]

    def do_ack(kind: str, ref_id: int, user: Any, comment: str | None) -> tuple[int, str]:
        if kind not in ALERT_KINDS:
            raise HTTPException(404, "unknown alert kind")
        with session_factory() as s:
            if not alert_queries.alert_exists(s, kind, ref_id):
                raise HTTPException(404, "no such alert")
            ack = acknowledge(s, kind, ref_id, user_name(user), comment)
        return (200, "acknowledged") if ack is not None else (409, "already acknowledged")

    def do_rescore(series_id: int, user: Any) -> int | None:
        from qcnode.tracking.series import rescore_series
        with read_sf() as s:
            if not series_queries.series_exists(s, series_id):
                raise HTTPException(404, "no such series")
        version = rescore_series(session_factory, series_id)
        log.info("series_rescore_requested", series_id=series_id, user=user_name(user), queued_version=version)
        return version

    def protocol_args(request: Request) -> dict[str, Any]:
        p = request.query_params
        until = _date(p.get("until"), utcnow().date())
        since = _date(p.get("since"), until - dt.timedelta(days=cfg.dashboard.protocols_days - 1))
        return {"since": min(since, until), "until": until, "scanner": p.get("scanner") or None,
                "protocol": p.get("protocol") or None}

    # ---- static assets (Plotly.js from the installed wheel: nothing loads from the internet) ----------
    @public.get("/static/dashboard.css", include_in_schema=False)
    def style() -> FileResponse:
        return static("dashboard.css")

    @router.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        if name not in statics:
            raise HTTPException(404)
        path, media = statics[name]
        return FileResponse(path, media_type=media, headers={"Cache-Control": "public, max-age=86400"})

    # ---- pages ----------------------------------------------------------------------------------------
    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview_page(request: Request) -> HTMLResponse:
        with read_sf() as s:
            data = status_queries.overview(s, cfg)
        return page(request, "overview.html", "Overview", o=data)

    @router.get("/series", response_class=HTMLResponse, include_in_schema=False)
    def series_page(request: Request) -> HTMLResponse:
        flt = series_queries.SeriesFilter.from_params(dict(request.query_params), cfg.dashboard.page_size)
        with read_sf() as s:
            listing = series_queries.list_series(s, flt, show_key)
            choices = series_queries.filter_choices(s)
        pages = max(1, -(-listing["total"] // flt.page_size))
        return page(request, "series_list.html", "Series", flt=flt, listing=listing, choices=choices, pages=pages,
                    show_key=show_key, verdicts=queries.VERDICTS, sorts=list(series_queries.SORTS))

    @router.get("/series.csv", include_in_schema=False)
    def series_csv(request: Request) -> StreamingResponse:
        flt = series_queries.SeriesFilter.from_params(dict(request.query_params), cfg.dashboard.page_size)
        cols = [c for c in SERIES_CSV_COLUMNS if show_key or c != "patient_key"]

        def rows() -> Iterator[dict[str, Any]]:
            with read_sf() as s:
                yield from series_queries.iter_series(s, flt, show_key)
        return _csv_response("series.csv", cols, rows())

    @router.get("/series/{series_id}", response_class=HTMLResponse, include_in_schema=False)
    def series_detail_page(request: Request, series_id: int) -> HTMLResponse:
        with read_sf() as s:
            d = series_queries.series_detail(s, series_id, show_key, spool_dir)
        if d is None:
            raise HTTPException(404, "no such series")
        chart = charts.strip_chart(d["slices"], d["protocol"], series_queries.position_label(d["slices"])) if d["slices"] else None
        return page(request, "series_detail.html", f"Series {series_id}", d=d, strip=chart, show_key=show_key,
                    slices=series_queries.public_slices(d["slices"]), flash=request.query_params.get("msg"),
                    charts_needed=chart is not None)

    @router.get("/series/{series_id}/slices.csv", include_in_schema=False)
    def slices_csv(series_id: int) -> StreamingResponse:
        with read_sf() as s:
            rows = series_queries.public_slices(series_queries.slices(s, series_id))
        cols = ["instance_id", "sop_instance_uid", "instance_number", "slice_location", "position", "score",
                "score_low", "score_high", "noise_hu", "dw_cm", "ssde_mgy", "ctdivol_mgy", "kernel"]
        return _csv_response(f"series-{series_id}-slices.csv", cols, rows)

    @router.get("/series/{series_id}/thumbnail/{instance_id}.png", include_in_schema=False)
    def thumbnail(series_id: int, instance_id: int) -> Response:
        from qcnode.dashboard.thumbnails import render_png
        with read_sf() as s:
            rel = series_queries.instance_spool_path(s, series_id, instance_id)
        if rel is None:
            raise HTTPException(404, "no such instance in this series")
        path = (spool_dir / rel).resolve()
        if spool_dir.resolve() not in path.parents:
            raise HTTPException(404, "not in the spool")
        try:
            png = render_png(path)
        except FileNotFoundError:
            raise HTTPException(404, "the instance is no longer in the spool") from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    @router.post("/series/{series_id}/rescore", include_in_schema=False, dependencies=mutating)
    def rescore_form(request: Request, series_id: int, user: Any = Depends(current_user)) -> RedirectResponse:
        version = do_rescore(series_id, user)
        msg = f"queued for scoring (round {version})" if version is not None else "still receiving: scored once stable"
        base = request.scope.get("root_path", "").rstrip("/")
        return RedirectResponse(f"{base}/series/{series_id}?msg={msg.replace(' ', '+')}", status_code=303)

    @router.get("/protocols", response_class=HTMLResponse, include_in_schema=False)
    def protocols_page(request: Request) -> HTMLResponse:
        args = protocol_args(request)
        with read_sf() as s:
            data = protocol_queries.protocols(s, cfg, **args)
            choices = series_queries.filter_choices(s)
        figs = {f"box-{m}": charts.box_chart(data["groups"], m) for m in protocol_queries.METRICS}
        figs.update({f"trend-{m}": charts.trend_chart(data["trends"], m, data["since"], data["until"]) for m in ("score", "noise")})
        figs["scatter"] = charts.scatter_chart(data["scatter"])
        query = "&".join(f"{k}={v}" for k, v in (("since", args["since"]), ("until", args["until"]),
                                                 ("scanner", args["scanner"] or ""),
                                                 ("protocol", args["protocol"] or "")) if v)
        return page(request, "protocols.html", "Protocols", data=data, figs=figs, args=args, choices=choices,
                    query=query, charts_needed=True)

    @router.get("/protocols/{chart}.csv", include_in_schema=False)
    def protocols_csv(request: Request, chart: str) -> StreamingResponse:
        with read_sf() as s:
            data = protocol_queries.protocols(s, cfg, **protocol_args(request))
        if chart == "box":
            rows = [{"protocol": g["protocol"], "scanner": g["scanner"], "n_series": g["n_series"],
                     "n_fail": g["n_fail"], **{f"{m}_{k}": (g["box"][m] or {}).get(k) for m in protocol_queries.METRICS
                                               for k in ("lowerfence", "q1", "median", "q3", "upperfence")}}
                    for g in data["groups"]]
        elif chart == "trends":
            rows = [{"protocol": t["protocol"], "scanner": t["scanner"], **d,
                     **{f"baseline_{m}_{k}": ((t["baseline"] or {}).get(m) or {}).get(k)
                        for m in ("score", "noise") for k in ("low", "median", "high")}}
                    for t in data["trends"] for d in t["days"]]
        elif chart == "scatter":
            rows = data["scatter"]
        else:
            raise HTTPException(404, "charts: box, trends, scatter")
        cols = list(rows[0]) if rows else ["protocol", "scanner"]
        return _csv_response(f"protocols-{chart}.csv", cols, rows)

    @router.get("/audit", response_class=HTMLResponse, include_in_schema=False)
    def audit_page(request: Request) -> HTMLResponse:
        with read_sf() as s:
            runs = alert_queries.audit_runs(s, limit=100)
        return page(request, "audit.html", "Audit", runs=runs)

    @router.get("/audit/{run_id}/report", response_class=HTMLResponse, include_in_schema=False)
    def audit_report(run_id: int) -> FileResponse:
        with read_sf() as s:
            path = alert_queries.audit_report_path(s, run_id)
        if path is None or not path.is_file():
            raise HTTPException(404, "no report for this run")
        return FileResponse(path, media_type="text/html")

    @router.get("/alerts", response_class=HTMLResponse, include_in_schema=False)
    def alerts_page(request: Request) -> HTMLResponse:
        only_open = request.query_params.get("open", "1") != "0"
        raw_page = request.query_params.get("page", "1")
        p = max(1, int(raw_page)) if raw_page.isdigit() else 1
        with read_sf() as s:
            data = alert_queries.list_alerts(s, unacknowledged=only_open, limit=cfg.dashboard.page_size,
                                       offset=(p - 1) * cfg.dashboard.page_size)
        return page(request, "alerts.html", "Alerts", data=data, only_open=only_open, page_no=p,
                    page_size=cfg.dashboard.page_size,
                    flash=request.query_params.get("msg"))

    @router.post("/alerts/{kind}/{ref_id}/ack", include_in_schema=False, dependencies=mutating)
    async def ack_form(request: Request, kind: str, ref_id: int, user: Any = Depends(current_user)) -> RedirectResponse:
        form = await request.form()
        comment = form.get("comment")
        from starlette.concurrency import run_in_threadpool
        _code, msg = await run_in_threadpool(do_ack, kind, ref_id, user, comment if isinstance(comment, str) else None)
        base = request.scope.get("root_path", "").rstrip("/")
        return RedirectResponse(f"{base}/alerts?msg={msg.replace(' ', '+')}", status_code=303)

    # ---- JSON API -------------------------------------------------------------------------------------
    @router.get("/api/v1/series", tags=["series"], summary="Filtered, sorted, paginated series list",
                response_model=schemas.SeriesList, response_model_exclude_unset=True)
    def api_series(request: Request, date_from: dt.date | None = None, date_to: dt.date | None = None,
                   scanner: str | None = None, protocol: str | None = None, kernel: str | None = None,
                   body_part: str | None = None, verdict: str | None = Query(None, pattern="^(PASS|WARN|FAIL)$"),
                   model_version: str | None = None, text: str | None = None,
                   sort: str = Query("received", pattern="^(" + "|".join(series_queries.SORTS) + ")$"),
                   order: str = Query("desc", pattern="^(asc|desc)$"), page: int = Query(1, ge=1),
                   page_size: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        """Series with their latest scoring round (dates: UTC date of the last received instance)."""
        flt = series_queries.SeriesFilter.from_params(dict(request.query_params), page_size)
        with read_sf() as s:
            return series_queries.list_series(s, flt, show_key)

    @router.get("/api/v1/series/{series_id}", tags=["series"], summary="One series: rounds, SRs, deliveries")
    def api_series_detail(series_id: int) -> dict[str, Any]:
        with read_sf() as s:
            d = series_queries.series_detail(s, series_id, show_key, spool_dir)
        if d is None:
            raise HTTPException(404, "no such series")
        d["slices"] = series_queries.public_slices(d["slices"])
        return d

    @router.get("/api/v1/series/{series_id}/slices", tags=["series"], summary="Per-slice scores of a round",
                response_model=list[schemas.Slice])
    def api_slices(series_id: int, version: int | None = None) -> list[dict[str, Any]]:
        """Slice scores with the 5-95 % interval in slice order (default: the latest round)."""
        with read_sf() as s:
            return series_queries.public_slices(series_queries.slices(s, series_id, version))

    @router.post("/api/v1/series/{series_id}/rescore", tags=["series"], dependencies=mutating,
                 summary="Queue the series for scoring again (admin)", response_model=schemas.RescoreResult)
    def api_rescore(series_id: int, user: Any = Depends(current_user)) -> dict[str, Any]:
        version = do_rescore(series_id, user)
        return {"series_id": series_id, "queued_version": version,
                "status": "queued" if version is not None else "receiving"}

    @router.get("/api/v1/protocols", tags=["protocols"], summary="Per protocol x scanner statistics")
    def api_protocols(request: Request, since: dt.date | None = None, until: dt.date | None = None,
                      scanner: str | None = None, protocol: str | None = None) -> dict[str, Any]:
        """Box-plot statistics, daily medians with the audit baseline band, score vs SSDE points."""
        with read_sf() as s:
            data = protocol_queries.protocols(s, cfg, **protocol_args(request))
        for t in data["trends"]:
            t["colour"] = protocol_colour(t["protocol"])
        for g in data["groups"]:
            g["colour"] = protocol_colour(g["protocol"])
        return data

    @router.get("/api/v1/audit/runs", tags=["audit"], summary="Audit runs with their flags",
                response_model=list[schemas.AuditRun])
    def api_audit_runs(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0)) -> list[dict[str, Any]]:
        with read_sf() as s:
            return alert_queries.audit_runs(s, limit=limit, offset=offset)

    @router.get("/api/v1/audit/flags", tags=["audit"], summary="Audit flags, newest first",
                response_model=list[schemas.AuditFlag])
    def api_flags(limit: int = Query(100, ge=1, le=1000), kind: str | None = None) -> list[dict[str, Any]]:
        with read_sf() as s:
            return alert_queries.list_flags(s, limit=limit, kind=kind)

    @router.get("/api/v1/alerts", tags=["alerts"], summary="FAIL verdicts and audit flags as alerts",
                response_model=schemas.AlertList)
    def api_alerts(unacknowledged: bool = False, limit: int = Query(50, ge=1, le=500),
                   offset: int = Query(0, ge=0)) -> dict[str, Any]:
        with read_sf() as s:
            return alert_queries.list_alerts(s, unacknowledged=unacknowledged, limit=limit, offset=offset)

    @router.post("/api/v1/alerts/{kind}/{ref_id}/ack", tags=["alerts"], dependencies=mutating,
                 summary="Acknowledge an alert (admin)", response_model=schemas.AckResult,
                 responses={404: {"description": "no such alert"}, 409: {"description": "already acknowledged"}})
    async def api_ack(request: Request, kind: str, ref_id: int, user: Any = Depends(current_user)) -> JSONResponse:
        """Body (optional): ``{"comment": "..."}``. 409 when it was already acknowledged."""
        comment = None
        if request.headers.get("content-type", "").startswith("application/json"):
            body = await request.json()
            comment = body.get("comment") if isinstance(body, dict) else None
        from starlette.concurrency import run_in_threadpool
        code, msg = await run_in_threadpool(do_ack, kind, ref_id, user, comment if isinstance(comment, str) else None)
        return JSONResponse({"alert_id": f"{kind}:{ref_id}", "status": msg}, status_code=code)

    @router.get("/api/v1/status", tags=["status"], summary="What qcnode status shows, plus today's verdicts")
    def api_status() -> dict[str, Any]:
        with read_sf() as s:
            return status_queries.overview(s, cfg)

    # ---- Prometheus -----------------------------------------------------------------------------------
    @router.get("/metrics", include_in_schema=False)
    def metrics() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    public.include_router(router)
    return public
