"""A stand-alone app around the dashboard router, for tests, benchmarks and development.

``qcnode serve`` mounts the same router in its own HTTP server (with its TLS and tokens); this
factory gives it a minimal bearer-token check instead: ``tokens`` maps a token to a role (``read``
or ``admin``), and ``loopback_role`` (optional) is the role of tokenless requests from 127.0.0.1/::1.

    python -m qcnode.dashboard.app --config config.toml --port 8080   # loopback, admin, no token
"""
from __future__ import annotations

import argparse
import ipaddress
from typing import Any, Callable

from fastapi import FastAPI, HTTPException, Request

from qcnode.config import Config
from qcnode.dashboard.router import build_router

ROLES = ("read", "admin")


def create_app(session_factory: Callable[[], Any], cfg: Config, tokens: dict[str, str] | None = None,
               loopback_role: str | None = None) -> FastAPI:
    """FastAPI app serving the dashboard with bearer tokens (token -> role)."""
    tokens = dict(tokens or {})

    def identify(request: Request) -> dict[str, str] | None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            role = tokens.get(auth[7:].strip())
            return {"name": f"{role}-token", "role": role} if role else None
        host = request.client.host if request.client else ""
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        return {"name": "local", "role": loopback_role} if loopback and loopback_role else None

    def require_read(request: Request) -> None:
        if identify(request) is None:
            raise HTTPException(401, "a bearer token is needed", headers={"WWW-Authenticate": "Bearer"})

    def require_admin(request: Request) -> None:
        user = identify(request)
        if user is None:
            raise HTTPException(401, "a bearer token is needed", headers={"WWW-Authenticate": "Bearer"})
        if user["role"] != "admin":
            raise HTTPException(403, "admin role required")

    def current_user(request: Request) -> dict[str, str] | None:
        return identify(request)

    app = FastAPI(title="qcnode", summary="Quality control of low-dose CT: dashboard and API")
    app.include_router(build_router(session_factory, cfg, require_read=require_read,
                                    require_admin=require_admin, current_user=current_user))
    return app


def main(argv: list[str] | None = None) -> int:
    """Serve the dashboard alone with uvicorn (loopback: admin without a token)."""
    import uvicorn

    from qcnode.config import load_config
    from qcnode.db.engine import make_engine, session_factory
    from qcnode.log import configure_logging
    p = argparse.ArgumentParser(prog="python -m qcnode.dashboard.app")
    p.add_argument("--config")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--root-path", default="", help="path prefix of a reverse proxy, e.g. /qcnode")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    configure_logging(cfg.logging.level, cfg.path(cfg.logging.file) if cfg.logging.file else None)
    app = create_app(session_factory(make_engine(cfg.database_url)), cfg, loopback_role="admin")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", proxy_headers=True,
                root_path=args.root_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
