"""The FastAPI application of the HTTP server: health checks, STOW-RS, the dashboard with its JSON
API and /metrics, browser sign-in, all behind one token middleware (``qcnode.http.auth``).

``HttpNode`` holds what the routes share in the HTTP process: the config, the database, the spool,
and the receiving side (``InstanceStore`` with this process's own group-commit recorder, exactly
as one more Storage SCP process would have).
"""
from __future__ import annotations

from typing import Any, Callable

from html import escape

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy import text
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from qcnode.config import Config
from qcnode.dashboard.router import build_router
from qcnode.http.auth import TokenAuth, current_user, load_tokens, local_path, require
from qcnode.http.login import build_login_router
from qcnode.http.stow import StowIngest
from qcnode.http.stow import router as stow_router
from qcnode.ingest.activity import open_activity
from qcnode.ingest.recorder import InstanceRecorder
from qcnode.ingest.spool import Spool
from qcnode.ingest.store import InstanceStore
from qcnode.log import get_logger

log = get_logger("qcnode.http")
READY_DB_TIMEOUT_S = 5.0


class HttpNode:
    """The HTTP process's shared state (``app.state.node``)."""

    def __init__(self, cfg: Config, session_factory: Callable[[], Session], spool: Spool, engine: Any = None):
        self.cfg = cfg
        self.session_factory = session_factory
        self.spool = spool
        self.engine = engine
        self.stow = StowIngest(None, open_activity(spool.root))
        self.recorder = InstanceRecorder(session_factory, in_flight=self.stow.in_flight_now)
        self.stow.store = InstanceStore(cfg, session_factory, spool, self.recorder)

    def ping_database(self) -> None:
        """SELECT 1 on a pooled DBAPI connection: no SQLAlchemy transaction (on SQLite that would
        begin IMMEDIATE and take the write lock from the receiving processes)."""
        if self.engine is None:
            with self.session_factory() as s:
                s.execute(text("SELECT 1"))
            return
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
        finally:
            raw.close()

    def close(self) -> None:
        self.recorder.close()


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """An error as a small HTML page for a browser on a page (a refused acknowledgement says why);
    JSON as usual for the API and every other client."""
    if "text/html" in request.headers.get("accept", "") and not local_path(request.scope).startswith("/api/"):
        base = escape(request.scope.get("root_path", "").rstrip("/"))
        html = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{exc.status_code} - qcnode'
                f'</title><link rel="stylesheet" href="{base}/static/dashboard.css"></head><body><main>'
                f'<h1>{exc.status_code}</h1><p class="flash" id="error">{escape(str(exc.detail))}</p>'
                f'<p><a href="{base}/">Overview</a></p></main></body></html>')
        return HTMLResponse(html, status_code=exc.status_code, headers=getattr(exc, "headers", None))
    return await http_exception_handler(request, exc)


def create_app(node: HttpNode) -> FastAPI:
    """The application. The API's OpenAPI schema is served at /openapi.json (read role) but no
    documentation pages: FastAPI's /docs would load Swagger UI from a CDN."""
    app = FastAPI(title="qcnode", summary="Quality control of low-dose CT: DICOMweb in, dashboard and API",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.node = node
    tokens = load_tokens(node.cfg)  # one set of tokens and session key for the middleware and /login
    app.include_router(stow_router)
    app.include_router(build_login_router(node.cfg, tokens))
    app.include_router(build_router(node.session_factory, node.cfg, require_read=require("read"),
                                    require_admin=require("admin"), current_user=current_user))
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(TokenAuth, tokens=tokens)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require("read"))])
    def openapi() -> JSONResponse:
        """The OpenAPI schema of the JSON API (and STOW-RS)."""
        return JSONResponse(app.openapi())

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Alive: the HTTP process answers (no other check; see /readyz)."""
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        """Ready to receive: the database answers and free disk is above storage.min_free_disk_mb."""
        reasons = []
        try:
            with anyio.fail_after(READY_DB_TIMEOUT_S):
                await anyio.to_thread.run_sync(node.ping_database, abandon_on_cancel=True)
        except TimeoutError:
            reasons.append(f"database did not answer within {READY_DB_TIMEOUT_S:.0f} s")
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            log.warning("readyz_database", error=type(exc).__name__)
            reasons.append(f"database unreachable ({type(exc).__name__})")
        free = node.spool.free_disk_mb()
        if free < node.cfg.storage.min_free_disk_mb:
            reasons.append(f"free disk {free:.0f} MiB below storage.min_free_disk_mb "
                           f"({node.cfg.storage.min_free_disk_mb})")
        if reasons:
            return JSONResponse({"status": "not ready", "reasons": reasons}, status_code=503)
        return JSONResponse({"status": "ready"})

    return app
