"""The dashboard's JSON API under /api/v1 (documented at /docs); ``qcnode.dashboard.router`` mounts it."""
from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse

from qcnode.dashboard import alert_queries, protocol_queries, schemas, series_queries, status_queries
from qcnode.dashboard.context import Dashboard
from qcnode.dashboard.palette import protocol_colour


def add_api(router: APIRouter, ctx: Dashboard) -> None:
    """Add the JSON API's routes to ``router``."""
    cfg, read_sf, show_key, spool_dir = ctx.cfg, ctx.read_sf, ctx.show_key, ctx.spool_dir

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

    @router.post("/api/v1/series/{series_id}/rescore", tags=["series"], dependencies=ctx.mutating,
                 summary="Queue the series for scoring again (admin)", response_model=schemas.RescoreResult)
    def api_rescore(series_id: int, user: Any = Depends(ctx.current_user)) -> dict[str, Any]:
        version = ctx.do_rescore(series_id, user)
        return {"series_id": series_id, "queued_version": version,
                "status": "queued" if version is not None else "receiving"}

    @router.get("/api/v1/protocols", tags=["protocols"], summary="Per protocol x scanner statistics")
    def api_protocols(request: Request, since: dt.date | None = None, until: dt.date | None = None,
                      scanner: str | None = None, protocol: str | None = None) -> dict[str, Any]:
        """Box-plot statistics, daily medians with the audit baseline band, score vs SSDE points."""
        with read_sf() as s:
            data = protocol_queries.protocols(s, cfg, **ctx.protocol_args(request))
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

    @router.post("/api/v1/alerts/{kind}/{ref_id}/ack", tags=["alerts"], dependencies=ctx.mutating,
                 summary="Acknowledge an alert (admin)", response_model=schemas.AckResult,
                 responses={404: {"description": "no such alert"}, 409: {"description": "already acknowledged"}})
    async def api_ack(request: Request, kind: str, ref_id: int, user: Any = Depends(ctx.current_user)) -> JSONResponse:
        """Body (optional): ``{"comment": "..."}``. 409 when it was already acknowledged."""
        comment = None
        if request.headers.get("content-type", "").startswith("application/json"):
            body = await request.json()
            comment = body.get("comment") if isinstance(body, dict) else None
        from starlette.concurrency import run_in_threadpool
        code, msg = await run_in_threadpool(ctx.do_ack, kind, ref_id, user, comment if isinstance(comment, str) else None)
        return JSONResponse({"alert_id": f"{kind}:{ref_id}", "status": msg}, status_code=code)

    @router.get("/api/v1/status", tags=["status"], summary="What qcnode status shows, plus today's verdicts")
    def api_status() -> dict[str, Any]:
        with read_sf() as s:
            return status_queries.overview(s, cfg)
