"""Pseudonymisation of patient identifiers with a keyed hash (HMAC-SHA256)."""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path


def load_or_create_key(path: str | os.PathLike[str]) -> bytes:
    """Read the secret key at ``path``; create it (32 random bytes, mode 0600) if missing."""
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
                fh.flush()
                os.fsync(fh.fileno())
    key = p.read_text().strip()
    if len(key) < 32:
        raise ValueError(f"pseudonym key file {p} is too short (need >= 32 hex characters)")
    return key.encode("ascii")


def pseudonymise(value: str | None, key: bytes) -> str | None:
    """Keyed hash of ``value`` (hex HMAC-SHA256); None/empty stays None."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).hexdigest()
