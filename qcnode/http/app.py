"""The FastAPI application of the HTTP server: health checks, STOW-RS, token middleware.

``HttpNode`` holds what the routes share in the HTTP process: the config, the database, the spool,
and the receiving side (``InstanceStore`` with this process's own group-commit recorder, exactly
as one more Storage SCP process would have).
"""
from __future__ import annotations

from typing import Any, Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.orm import Session

from qcnode.config import Config
from qcnode.http.auth import TokenAuth
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


def create_app(node: HttpNode) -> FastAPI:
    """The application (no OpenAPI pages: nothing is served that the config did not ask for)."""
    app = FastAPI(title="qcnode", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.node = node
    app.include_router(stow_router)
    app.add_middleware(TokenAuth, http=node.cfg.http)

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
