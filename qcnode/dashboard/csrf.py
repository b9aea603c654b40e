"""CSRF protection of the forms (sign-out included) and mutating API calls: a signed double-submit token.

The token ``nonce.HMAC(key, nonce)`` is set as an HttpOnly, SameSite=Strict cookie and rendered
into each form; a mutating request must send the same, validly signed token back in the form field
``csrf_token`` or the ``X-CSRF-Token`` header. Another site can neither read the cookie nor forge a
signature without the key (``dashboard.secret_key_file``, created 0600). Requests authenticated by
a valid bearer token in the ``Authorization`` header need no token: a browser never adds one on its
own to a cross-site request. Any other ``Authorization`` header (Basic credentials a browser resends
by itself, or any header on the open server, where no token is checked) still needs it.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from fastapi import HTTPException, Request

from qcnode.config import HttpConfig
from qcnode.dicom.privacy import publish_once
from qcnode.log import get_logger

log = get_logger("qcnode.dashboard")

COOKIE = "qcnode_csrf"
FIELD = "csrf_token"
HEADER = "x-csrf-token"
BEARER_SCOPE_KEY = "qcnode.bearer"  # True when qcnode.http.auth.TokenAuth accepted a bearer header


def load_or_create_key(path: Path) -> bytes:
    """The secret key in ``path`` (32 random bytes, created owner-only if missing)."""
    try:
        data = path.read_bytes()
        if len(data) >= 32:
            return data
    except FileNotFoundError:
        pass
    publish_once(path, secrets.token_bytes(32))
    return path.read_bytes()


def secure_cookies(http: HttpConfig, scheme: str) -> bool:
    """Whether the node's cookies get ``Secure``: qcnode terminates TLS (``http.tls_cert``), a
    TLS-terminating proxy serves it (``http.behind_tls_proxy``), or the request came over HTTPS
    (as uvicorn sees it, trusted ``X-Forwarded-Proto`` included). The browser then never sends them
    over plain HTTP."""
    return bool(http.tls_cert) or http.behind_tls_proxy or scheme == "https"


class Csrf:
    """Issues and checks signed double-submit tokens with ``key``."""

    def __init__(self, key: bytes):
        self.key = key

    def _sign(self, nonce: str) -> str:
        return hmac.new(self.key, nonce.encode(), hashlib.sha256).hexdigest()

    def new_token(self) -> str:
        nonce = secrets.token_urlsafe(24)
        return f"{nonce}.{self._sign(nonce)}"

    def valid(self, token: str | None) -> bool:
        """Whether ``token`` carries our signature."""
        if not token or "." not in token:
            return False
        nonce, sig = token.rsplit(".", 1)
        return hmac.compare_digest(sig, self._sign(nonce))

    def matches(self, cookie: str | None, submitted: str | None) -> bool:
        """Whether the submitted token is the cookie's and validly signed."""
        return bool(cookie and submitted) and hmac.compare_digest(cookie, submitted) and self.valid(cookie)

    async def check(self, request: Request) -> None:
        """A FastAPI dependency: 403 for a mutating request without the matching signed token
        (``X-CSRF-Token`` header or ``csrf_token`` form field), unless ``TokenAuth`` authenticated it
        by a valid bearer token in its Authorization header (``qcnode.bearer`` in the scope), which a
        browser never attaches on its own. Any other Authorization header (Basic credentials a
        browser remembers and resends, any header on the open server) or the sign-in cookie still
        needs the token."""
        if request.scope.get(BEARER_SCOPE_KEY) is True:
            return
        submitted = request.headers.get(HEADER)
        if submitted is None and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")):
            submitted = (await request.form()).get(FIELD)
        if not self.matches(request.cookies.get(COOKIE), submitted if isinstance(submitted, str) else None):
            log.warning("csrf_refused", path=request.url.path, client=request.client.host if request.client else None)
            raise HTTPException(403, "CSRF token missing or invalid: reload the page and try again")
