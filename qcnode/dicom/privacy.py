"""Pseudonymisation of patient identifiers with a keyed hash (HMAC-SHA256)."""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path


def publish_once(path: str | os.PathLike[str], content: bytes) -> None:
    """Create ``path`` (mode 0600, folder 0700) holding ``content`` unless it exists. Written aside,
    fsynced and linked into place: a reader never sees it half written, and of several processes
    racing to create it the first wins."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, p)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def load_or_create_key(path: str | os.PathLike[str]) -> bytes:
    """Read the secret key at ``path``; create it (64 random hex characters, mode 0600) if missing."""
    p = Path(path)
    if not p.exists():
        publish_once(p, secrets.token_hex(32).encode("ascii"))
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
