"""The dashboard's router: the pages (``pages``), the JSON API under /api/v1 (``api``), the static
assets and /metrics, on one shared ``context.Dashboard``.

``build_router`` takes the authentication as FastAPI dependencies from the app that serves it
(``qcnode.http.app``): ``require_read`` guards every route but the style sheet, ``require_admin`` the
mutating ones (acknowledge an alert, score a series again), ``current_user`` names who acts (stored
with an acknowledgement, logged with every mutating action). Mutating routes also need the CSRF token
(``qcnode.dashboard.csrf``). Links honour the ASGI ``root_path`` (a reverse proxy's path prefix).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse, PlainTextResponse

from qcnode.config import Config
from qcnode.dashboard.api import add_api
from qcnode.dashboard.context import Dashboard
from qcnode.dashboard.metrics import registry_for
from qcnode.dashboard.pages import add_pages

STATIC_DIR = Path(__file__).resolve().parent / "static"


def _plotly_js() -> Path:
    import plotly
    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


def build_router(session_factory: Callable[[], Any], cfg: Config, *, require_read: Callable[..., Any],
                 require_admin: Callable[..., Any], current_user: Callable[..., Any]) -> APIRouter:
    """The dashboard, API and /metrics on ``session_factory`` (a sessionmaker of qcnode's database)."""
    ctx = Dashboard(session_factory, cfg, require_admin=require_admin, current_user=current_user)
    registry = registry_for(ctx.read_sf)
    statics = {"plotly.min.js": (_plotly_js(), "application/javascript"),
               "dashboard.js": (STATIC_DIR / "dashboard.js", "application/javascript"),
               "dashboard.css": (STATIC_DIR / "dashboard.css", "text/css")}

    router = APIRouter(dependencies=[Depends(require_read)])
    public = APIRouter()  # the style sheet: the sign-in page needs it before any token

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

    add_pages(router, ctx)
    add_api(router, ctx)

    # ---- Prometheus -----------------------------------------------------------------------------------
    @router.get("/metrics", include_in_schema=False)
    def metrics() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    public.include_router(router)
    return public
