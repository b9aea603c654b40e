"""Bearer tokens and roles for the HTTP server.

Bound to a loopback address with no token configured, the server is open (only this host can reach
it). Otherwise every route except the open ones (health checks, the sign-in page and its style
sheet) needs a token: ``Authorization: Bearer <token>``, or for a browser, which cannot send that
header, the signed session the sign-in page (``qcnode.http.login``) keeps in an HttpOnly cookie
(``qcnode.http.session``: the token's name and expiry, never the token). A missing or unknown
token, or a session that is forged, expired or names a token no longer configured, is answered 401
before any route runs (unknown paths included, so the server reveals nothing to strangers; a
browser asking for a page is sent to /login instead); a known token whose role lacks a route's
permission gets 403. Only the SHA-256 of each token is configured; a presented
token is hashed and compared in constant time. Tokens are never logged, only the configured name.

Roles: ``store`` may only store (STOW-RS: what a PACS or modality needs), ``read`` may only read
(pages, API, /metrics), ``admin`` may do everything (acknowledge alerts, score a series again).
"""
from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from fastapi import HTTPException, Request
from starlette.requests import cookie_parser

from qcnode.config import Config, HttpConfig
from qcnode.config_checks import is_loopback
from qcnode.dashboard.csrf import BEARER_SCOPE_KEY, load_or_create_key
from qcnode.http.session import COOKIE, SessionSigner

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/login", "/logout", "/static/dashboard.css"})
GRANTS = {"read": frozenset({"read"}), "store": frozenset({"store"}),
          "admin": frozenset({"read", "store", "admin"})}
SCOPE_KEY = "qcnode.caller"  # the authenticated Caller, in the ASGI scope
BEARER_KEY = BEARER_SCOPE_KEY  # True in the scope when a valid bearer header (not a cookie) identified the caller
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})


@dataclass(frozen=True)
class Caller:
    """Who made a request: the token's configured name and role (``local``/admin when open)."""
    name: str
    role: str

    def may(self, permission: str) -> bool:
        return permission in GRANTS.get(self.role, frozenset())


OPEN_CALLER = Caller("local", "admin")
NOBODY = Caller("anonymous", "")  # an open path's caller without a valid token: may nothing


def token_sha256(token: str) -> str:
    """The hex SHA-256 that ``[[http.tokens]]`` holds for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def auth_required(http: HttpConfig) -> bool:
    """Tokens are needed unless the server is bound to loopback and none is configured."""
    return bool(http.tokens) or not is_loopback(http.host)


class Tokens:
    """The configured tokens: which Caller a presented token or sign-in session is (shared by
    TokenAuth and /login); ``sessions`` signs the sessions (None: no sign-in, e.g. an open server)."""

    def __init__(self, http: HttpConfig, sessions: SessionSigner | None = None):
        self.required = auth_required(http)
        self.known = [(t.sha256.lower(), Caller(t.name, t.role)) for t in http.tokens]
        self.by_name = {caller.name: (sha, caller) for sha, caller in self.known}
        self.sessions = sessions

    def identify(self, token: str | None) -> Caller | None:
        """The Caller of ``token``; None if it is empty or unknown."""
        if not token or not token.strip():
            return None
        digest = token_sha256(token.strip())
        found = None
        for sha, caller in self.known:  # all compared: no timing hint which one matched
            if hmac.compare_digest(sha, digest):
                found = caller
        return found

    def new_session(self, caller: Caller) -> str:
        """A fresh signed session of ``caller``'s configured token: the sign-in cookie's value."""
        if self.sessions is None:
            raise RuntimeError("no session key: sign-in needs a server that requires tokens")
        return self.sessions.issue(caller.name, self.by_name[caller.name][0])

    def from_session(self, value: str | None) -> Caller | None:
        """The Caller of a valid session (its role the configured token's now); None otherwise."""
        if self.sessions is None:
            return None
        name = self.sessions.verify(value, lambda n: self.by_name[n][0] if n in self.by_name else None)
        return self.by_name[name][1] if name is not None else None

    def caller(self, headers: list[tuple[bytes, bytes]]) -> Caller | None:
        """The Caller of a request with these headers (the bearer header, else the sign-in
        cookie's session); None if its token is missing or unknown or its session invalid."""
        if not self.required:
            return OPEN_CALLER
        value = next((v for k, v in headers if k == b"authorization"), None)
        if value is not None:
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return self.identify(token) if scheme.lower() == "bearer" else None
        cookie = next((v for k, v in headers if k == b"cookie"), None)
        return self.from_session(cookie_parser(cookie.decode("latin-1")).get(COOKIE)) if cookie else None


def load_tokens(cfg: Config) -> Tokens:
    """The tokens of ``cfg.http`` with their session signer; the key file
    (``http.session_key_file``) is read, or created 0600, only where tokens are required."""
    http = cfg.http
    if not auth_required(http):
        return Tokens(http)
    return Tokens(http, SessionSigner(load_or_create_key(cfg.path(http.session_key_file)), http.session_hours))


def _wants_page(scope: dict[str, Any]) -> bool:
    """A browser navigating to a page (GET/HEAD accepting HTML, not the API, /metrics or STOW-RS)."""
    accept = next((v for k, v in scope.get("headers", []) if k == b"accept"), b"")
    path = local_path(scope)
    return (scope.get("method") in ("GET", "HEAD") and b"text/html" in accept
            and not path.startswith(("/api/", "/metrics", "/dicomweb/")))


def local_path(scope: dict[str, Any]) -> str:
    """The request path without a reverse proxy's ``root_path`` prefix."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class TokenAuth:
    """ASGI middleware: puts the request's Caller into the scope, or answers 401 (a browser asking
    for a page: a redirect to /login)."""

    def __init__(self, app: Any, tokens: Tokens):
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        if not self.tokens.required and not _loopback_host(headers):
            # an open server answers only requests addressed to loopback: a web page whose name was
            # rebound to 127.0.0.1 (DNS rebinding) must not become an admin of this node
            await _send_json(send, 400, {"detail": "open (tokenless) server: address it as localhost or 127.0.0.1"})
            return
        caller = self.tokens.caller(headers)
        if caller is not None and self.tokens.required and any(k == b"authorization" for k, _ in headers):
            scope[BEARER_KEY] = True
        if caller is None and local_path(scope) in OPEN_PATHS:
            caller = NOBODY
        if caller is None:
            if _wants_page(scope):
                location = scope.get("root_path", "").rstrip("/") + "/login"
                headers = [(b"location", location.encode("latin-1")), (b"content-length", b"0")]
                await send({"type": "http.response.start", "status": 303, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return
            await _send_json(send, 401, {"detail": "a valid bearer token is required"},
                             [(b"www-authenticate", b'Bearer realm="qcnode"')])
            return
        scope[SCOPE_KEY] = caller
        await self.app(scope, receive, send)


def _loopback_host(headers: list[tuple[bytes, bytes]]) -> bool:
    """The request's Host names this host's loopback (any port)."""
    host = next((v for k, v in headers if k == b"host"), b"").decode("latin-1").strip().lower()
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name in LOOPBACK_NAMES or name.startswith("127.")


async def _send_json(send: Callable[[Any], Awaitable[None]], status: int, doc: dict[str, Any],
                     extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(doc).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


def caller_of(scope: dict[str, Any]) -> Caller:
    """The Caller that ``TokenAuth`` put into the scope; one that may nothing when it put none
    (a route outside the middleware is closed, not open)."""
    return scope.get(SCOPE_KEY, NOBODY)


def require(permission: str) -> Callable[[Request], None]:
    """A FastAPI dependency: 403 unless the caller's role grants ``permission``."""
    def check(request: Request) -> None:
        caller = caller_of(request.scope)
        if not caller.may(permission):
            raise HTTPException(403, f"the {caller.role or 'anonymous'} role may not {permission}"
                                     + (": an admin token is needed" if permission == "admin" else ""))
    return check


def current_user(request: Request) -> str:
    """The caller's configured token name (``local`` on an open server): who acknowledged."""
    return caller_of(request.scope).name
