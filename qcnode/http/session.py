"""Signed sign-in sessions: what the browser's cookie holds instead of the bearer token.

A session is ``<name>.<expires>.<signature>``: the token's configured name (base64url), the Unix time
it ends, and the hex HMAC-SHA256 over both and the token's configured SHA-256, keyed with the server
secret ``http.session_key_file`` (32 random bytes, created 0600 on first use). A stolen cookie thus
reveals neither the token nor its hash and ends by itself; the signature binds it to the token as
configured when the server started, so removing a token (or giving its name a new token) and
restarting ends its sessions, and a new key file (delete it and restart) ends them all. The role is
never in the cookie: it is the configured token's.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from typing import Callable

COOKIE = "qcnode_session"  # the browser's signed session, set by /login (HttpOnly, SameSite=Strict)
MAX_VALUE_CHARS = 4096  # longer cookie values (more than a browser keeps) are not parsed at all
_UNKNOWN = "0" * 64  # signed against when the name is not configured, so both cases cost the same


def _b64(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode("utf-8")).decode("ascii").rstrip("=")


def _unb64(text: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):
        return None


class SessionSigner:
    """Issues and checks signed sessions with ``key``; a session lasts ``hours``."""

    def __init__(self, key: bytes, hours: float):
        self.key = key
        self.seconds = hours * 3600.0

    def _signature(self, encoded_name: str, expires: str, sha256: str) -> str:
        message = f"{encoded_name}.{expires}.{sha256.lower()}".encode("ascii")
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()

    def sign(self, name: str, sha256: str, expires: int) -> str:
        """The session of the token ``name`` (configured with ``sha256``) ending at ``expires``."""
        encoded = _b64(name)
        return f"{encoded}.{expires}.{self._signature(encoded, str(expires), sha256)}"

    def issue(self, name: str, sha256: str, now: float | None = None) -> str:
        """A fresh session of the token ``name``, ending ``hours`` from now."""
        return self.sign(name, sha256, int((time.time() if now is None else now) + self.seconds))

    def verify(self, value: str | None, sha256_of: Callable[[str], str | None],
               now: float | None = None) -> str | None:
        """The token name of a valid session: well formed, signed for the SHA-256 that
        ``sha256_of(name)`` configures now, not expired and not ending further ahead than a session
        lasts (a shortened ``http.session_hours`` shortens the sessions already issued); else None."""
        if not value or len(value) > MAX_VALUE_CHARS or not value.isascii() or value.count(".") != 2:
            return None
        encoded, expires, signature = value.split(".")
        name = _unb64(encoded)
        if name is None or _b64(name) != encoded or not expires.isdigit() or len(expires) > 12:
            return None
        sha256 = sha256_of(name)
        expected = self._signature(encoded, expires, sha256 or _UNKNOWN)
        if not hmac.compare_digest(signature, expected) or sha256 is None:
            return None
        now = time.time() if now is None else now
        return name if now < int(expires) <= now + self.seconds else None
