"""Durable files: received instances, produced SRs, and the quarantine.

Every write goes to a temporary file in the target directory, is fsync'ed, renamed over
the final name and the directory is fsync'ed, so a file either exists completely or not
at all after a crash. File names are built only from validated DICOM UIDs (digits and
dots), never from raw strings, so nothing can escape the spool. Files are 0600, folders 0700.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any


FILE_MODE = 0o600
DIR_MODE = 0o700
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_STRICT_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")  # PS3.5 9.1: no leading zeros
# what instance_relpath / sr_relpath build: UID folders and a UID file name (no resolve() needed)
_SAFE_RELPATH_RE = re.compile(r"(sr/)?([0-9]+(\.[0-9]+)*/){2}[0-9]+(\.[0-9]+)*\.dcm")


class InvalidUID(ValueError):
    """A UID that is not a valid DICOM UID was to be used in a file name."""


def check_uid(value: Any, what: str = "UID", strict: bool = False) -> str:
    """Return ``value`` as str if it is a valid DICOM UID, else raise InvalidUID.

    Digits and dots only: safe as a file name. A component with a leading zero (which DICOM forbids)
    is tolerated unless ``strict`` (the SCP refuses it at receipt; files already spooled keep working)."""
    text = str(value) if value is not None else ""
    if len(text) > 64 or not (_STRICT_UID_RE if strict else _UID_RE).fullmatch(text):
        raise InvalidUID(f"invalid {what}: {text[:80]!r}")
    return text


def make_dirs(path: Path) -> None:
    """Create ``path`` and missing parents with mode 0700, fsync'ing each new entry's parent."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(d, DIR_MODE)  # umask may have dropped bits
        _fsync_dir(d.parent)


def fsync_dir(path: Path) -> None:
    """fsync a folder: makes the renames/creations done in it so far durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_fsync_dir = fsync_dir


def write_atomic(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write ``data`` to ``path`` durably: temp file, fsync, rename, directory fsync.

    With ``sync_dir=False`` the caller must ``fsync_dir(path.parent)`` before relying on the
    rename (the SCP's group commit does it once per batch for many files).
    """
    make_dirs(path.parent)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def free_disk_mb(path: Path) -> float:
    """Free space (MiB) on the file system holding ``path`` (or its nearest existing parent)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / (1024 * 1024)


class Spool:
    """The spool folder (instances and SRs) and the quarantine folder."""

    def __init__(self, root: str | os.PathLike[str], quarantine_dir: str | os.PathLike[str]):
        self.root = Path(root).resolve()
        self.quarantine_dir = Path(quarantine_dir).resolve()
        make_dirs(self.root)
        make_dirs(self.quarantine_dir)

    # ---- received instances and produced SRs -------------------------------------------------
    @staticmethod
    def instance_relpath(study_uid: str, series_uid: str, sop_uid: str) -> str:
        """``<study>/<series>/<sop>.dcm`` from validated UIDs (raises InvalidUID)."""
        return "/".join((check_uid(study_uid, "Study Instance UID"), check_uid(series_uid, "Series Instance UID"),
                         check_uid(sop_uid, "SOP Instance UID") + ".dcm"))

    @staticmethod
    def sr_relpath(study_uid: str, series_uid: str, sr_uid: str) -> str:
        """``sr/<study>/<series>/<sr sop>.dcm`` for a produced Structured Report."""
        return "sr/" + Spool.instance_relpath(study_uid, series_uid, sr_uid)

    def abspath(self, relpath: str) -> Path:
        """Absolute path of a spool-relative path; refuses anything outside the spool."""
        if _SAFE_RELPATH_RE.fullmatch(relpath):  # built from validated UIDs: no "..", no "/" prefix
            return self.root / relpath
        p = (self.root / relpath).resolve()
        if p != self.root and self.root not in p.parents:
            raise InvalidUID(f"path escapes the spool: {relpath[:120]!r}")
        return p

    def write(self, relpath: str, data: bytes, sync_dir: bool = True) -> Path:
        """Durably write ``data`` at spool-relative ``relpath``; returns the absolute path.

        ``sync_dir=False``: the folder fsync is left to the caller (see ``write_atomic``)."""
        path = self.abspath(relpath)
        write_atomic(path, data, sync_dir=sync_dir)
        return path

    def same_content(self, relpath: str, data: bytes) -> bool:
        """True when the file at ``relpath`` exists and holds exactly ``data``."""
        path = self.abspath(relpath)
        try:
            if path.stat().st_size != len(data):
                return False
            return path.read_bytes() == data
        except FileNotFoundError:
            return False

    def free_disk_mb(self) -> float:
        """Free MiB on the spool's file system."""
        return free_disk_mb(self.root)

    # ---- quarantine ------------------------------------------------------------------------------
    def quarantine(self, data: bytes | None, reason: str, info: dict[str, Any] | None = None) -> str:
        """Keep a copy of refused input with a ``.reason.json`` next to it.

        Returns the path relative to the quarantine folder. File names are random (uuid4),
        never taken from the input. ``info`` must hold no patient data (UIDs, AE, IP, status).
        """
        day = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d")
        name = uuid.uuid4().hex
        rel = f"{day}/{name}.dcm"
        path = self.quarantine_dir / rel
        if data is not None:
            write_atomic(path, data)
        record = {"reason": reason, "quarantined_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                  "has_copy": data is not None, **(info or {})}
        write_atomic(path.with_suffix(".reason.json"), json.dumps(record, indent=1, default=str).encode())
        return rel

    def quarantine_file(self, src: Path, reason: str, info: dict[str, Any] | None = None) -> str:
        """Quarantine a copy of an existing file (e.g. a spooled slice the worker cannot decode)."""
        try:
            data = src.read_bytes()
        except OSError:
            data = None
        return self.quarantine(data, reason, info)

    def quarantine_count(self) -> int:
        """Number of quarantined items (``.reason.json`` files)."""
        return sum(1 for _ in self.quarantine_dir.glob("*/*.reason.json"))
