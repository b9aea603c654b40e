"""Bearer tokens and roles for the HTTP server.

Bound to a loopback address with no token configured, the server is open (only this host can reach
it). Otherwise every route except the health checks needs ``Authorization: Bearer <token>``: a
missing or unknown token is answered 401 before any route runs (unknown paths included, so the
server reveals nothing to strangers); a known token whose role lacks a route's permission gets 403.
Only the SHA-256 of each token is configured; a presented token is hashed and compared in constant
time. Tokens are never logged, only the configured name.

Roles: ``store`` may only store (STOW-RS: what a PACS or modality needs), ``read`` may only read,
``admin`` may do everything.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from qcnode.config import HttpConfig, is_loopback

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
GRANTS = {"read": frozenset({"read"}), "store": frozenset({"store"}),
          "admin": frozenset({"read", "store", "admin"})}
SCOPE_KEY = "qcnode.caller"  # the authenticated Caller, in the ASGI scope


@dataclass(frozen=True)
class Caller:
    """Who made a request: the token's configured name and role (``local``/admin when open)."""
    name: str
    role: str

    def may(self, permission: str) -> bool:
        return permission in GRANTS.get(self.role, frozenset())


OPEN_CALLER = Caller("local", "admin")


def token_sha256(token: str) -> str:
    """The hex SHA-256 that ``[[http.tokens]]`` holds for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def auth_required(http: HttpConfig) -> bool:
    """Tokens are needed unless the server is bound to loopback and none is configured."""
    return bool(http.tokens) or not is_loopback(http.host)


class TokenAuth:
    """ASGI middleware: puts the request's Caller into the scope, or answers 401."""

    def __init__(self, app: Any, http: HttpConfig):
        self.app = app
        self.required = auth_required(http)
        self.tokens = [(t.sha256.lower(), Caller(t.name, t.role)) for t in http.tokens]

    def caller(self, headers: list[tuple[bytes, bytes]]) -> Caller | None:
        """The Caller of a request with these headers; None if its token is missing or unknown."""
        if not self.required:
            return OPEN_CALLER
        value = next((v for k, v in headers if k == b"authorization"), b"")
        scheme, _, token = value.decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = token_sha256(token.strip())
        found = None
        for sha, caller in self.tokens:  # all compared: no timing hint which one matched
            if hmac.compare_digest(sha, digest):
                found = caller
        return found

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        caller = self.caller(scope.get("headers", []))
        if caller is None:
            body = json.dumps({"detail": "a valid bearer token is required"}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"www-authenticate", b'Bearer realm="qcnode"')]})
            await send({"type": "http.response.body", "body": body})
            return
        scope[SCOPE_KEY] = caller
        await self.app(scope, receive, send)


def caller_of(scope: dict[str, Any]) -> Caller:
    """The Caller that ``TokenAuth`` put into the scope (the open caller when none)."""
    return scope.get(SCOPE_KEY, OPEN_CALLER)
