"""Web dashboard, JSON API (/api/v1) and Prometheus /metrics of qcnode.

``build_router(session_factory, cfg, require_read=..., require_admin=..., current_user=...)`` returns a
FastAPI router; the HTTP server of ``qcnode serve`` (``qcnode.http.app.create_app``) includes it with
its token roles as the authentication dependencies.
"""
from __future__ import annotations

from typing import Any


def build_router(*args: Any, **kwargs: Any) -> Any:
    """See :func:`qcnode.dashboard.router.build_router` (imported lazily: FastAPI only when used)."""
    from qcnode.dashboard.router import build_router as build
    return build(*args, **kwargs)
