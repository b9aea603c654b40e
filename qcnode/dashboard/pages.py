"""The dashboard's server-rendered pages and their CSV downloads (the routes a browser navigates);
``qcnode.dashboard.router`` mounts them."""
from __future__ import annotations

import csv
import io
from typing import Any, Iterable, Iterator
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse

from qcnode.dashboard import alert_queries, charts, protocol_queries, queries, series_queries, status_queries
from qcnode.dashboard.context import Dashboard

SERIES_CSV_COLUMNS = ["series_id", "series_instance_uid", "study_instance_uid", "patient_key", "study_date",
                      "received_at", "series_description", "protocol", "body_part", "scanner", "status",
                      "instance_count", "version", "model_version", "n_slices", "mean_score", "min_score",
                      "fraction_below", "verdict", "noise_hu", "ctdivol_mgy", "ssde_mgy", "dlp_mgycm", "scored_at"]


# what a spreadsheet reads as the start of a formula (CSV injection): such text cells get a leading '
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

# the flash messages a redirect may ask a page to show (``?msg=<code>``): any other code shows nothing,
# so a link from elsewhere cannot put its own text on the dashboard
FLASH = {"acknowledged": "acknowledged", "already-acknowledged": "already acknowledged",
         "queued": "queued for scoring", "receiving": "still receiving: scored once stable"}


def _flash(params: Any) -> str | None:
    """The fixed message of the query's ``msg`` code (``queued`` with its ``round`` number), else None."""
    code = params.get("msg")
    if code not in FLASH:
        return None
    round_ = params.get("round", "")
    if code == "queued" and round_.isascii() and round_.isdigit() and len(round_) <= 9:
        return f"{FLASH[code]} (round {int(round_)})"
    return FLASH[code]


def _csv_cell(value: Any) -> Any:
    """``value`` as written to CSV: text a spreadsheet would run as a formula gets a leading '."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def _csv_response(filename: str, columns: list[str], rows: Iterable[dict[str, Any]]) -> StreamingResponse:
    """Stream ``rows`` as CSV with the given columns (missing keys empty; formula-like text defused)."""
    def gen() -> Iterator[str]:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow({k: _csv_cell(v) for k, v in row.items()})
            if i % 500 == 499:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue()
    return StreamingResponse(gen(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def add_pages(router: APIRouter, ctx: Dashboard) -> None:
    """Add the pages, their forms and CSV downloads to ``router``."""
    cfg, read_sf, show_key, spool_dir, page = ctx.cfg, ctx.read_sf, ctx.show_key, ctx.spool_dir, ctx.page

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
        chart = (charts.strip_chart(d["slices"], d["protocol"], series_queries.position_label(d["slices"]))
                 if d["slices"] else None)
        return page(request, "series_detail.html", f"Series {series_id}", d=d, strip=chart, show_key=show_key,
                    slices=series_queries.public_slices(d["slices"]), flash=_flash(request.query_params),
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

    @router.post("/series/{series_id}/rescore", include_in_schema=False, dependencies=ctx.mutating)
    def rescore_form(request: Request, series_id: int, user: Any = Depends(ctx.current_user)) -> RedirectResponse:
        version = ctx.do_rescore(series_id, user)
        query = urlencode({"msg": "queued", "round": version} if version is not None else {"msg": "receiving"})
        base = request.scope.get("root_path", "").rstrip("/")
        return RedirectResponse(f"{base}/series/{series_id}?{query}", status_code=303)

    @router.get("/protocols", response_class=HTMLResponse, include_in_schema=False)
    def protocols_page(request: Request) -> HTMLResponse:
        args = ctx.protocol_args(request)
        with read_sf() as s:
            data = protocol_queries.protocols(s, cfg, **args)
            choices = series_queries.filter_choices(s)
        figs = {f"box-{m}": charts.box_chart(data["groups"], m) for m in protocol_queries.METRICS}
        figs.update({f"trend-{m}": charts.trend_chart(data["trends"], m, data["since"], data["until"]) for m in ("score", "noise")})
        figs["scatter"] = charts.scatter_chart(data["scatter"])
        query = urlencode([(k, str(v)) for k, v in (("since", args["since"]), ("until", args["until"]),
                                                    ("scanner", args["scanner"]), ("protocol", args["protocol"]))
                           if v])
        return page(request, "protocols.html", "Protocols", data=data, figs=figs, args=args, choices=choices,
                    query=query, charts_needed=True)

    @router.get("/protocols/{chart}.csv", include_in_schema=False)
    def protocols_csv(request: Request, chart: str) -> StreamingResponse:
        with read_sf() as s:
            data = protocol_queries.protocols(s, cfg, **ctx.protocol_args(request))
        if chart == "box":
            rows = [{"protocol": g["protocol"], "scanner": g["scanner"], "n_series": g["n_series"],
                     "n_fail": g["n_fail"], **{f"{m}_{k}": (g["box"][m] or {}).get(k)
                                               for m in protocol_queries.METRICS
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
        """The run's HTML report, only from inside ``audit.out_dir`` (a stored path elsewhere, say from
        ``qcnode audit --out DIR``, is not served), sandboxed: it runs no script and opens nothing."""
        with read_sf() as s:
            stored = alert_queries.audit_report_path(s, run_id)
        if stored is None:
            raise HTTPException(404, "no report for this run")
        root = cfg.path(cfg.audit.out_dir).resolve()
        path = stored.resolve()
        if root not in path.parents:
            raise HTTPException(404, "this run's report is outside audit.out_dir: open it where it was written")
        if not path.is_file():
            raise HTTPException(404, "no report for this run")
        return FileResponse(path, media_type="text/html",
                            headers={"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"})

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
                    flash=_flash(request.query_params))

    @router.post("/alerts/{kind}/{ref_id}/ack", include_in_schema=False, dependencies=ctx.mutating)
    async def ack_form(request: Request, kind: str, ref_id: int, user: Any = Depends(ctx.current_user)) -> RedirectResponse:
        form = await request.form()
        comment = form.get("comment")
        from starlette.concurrency import run_in_threadpool
        code, _msg = await run_in_threadpool(ctx.do_ack, kind, ref_id, user, comment if isinstance(comment, str) else None)
        base = request.scope.get("root_path", "").rstrip("/")
        return RedirectResponse(f"{base}/alerts?msg={'acknowledged' if code == 200 else 'already-acknowledged'}",
                                status_code=303)
