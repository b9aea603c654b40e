"""Receiving goes first: the SCP marks when it last took a C-STORE, the worker paces itself by it.

Every SCP process writes ``time.monotonic()`` into an 8-byte memory-mapped file in the spool; while
that mark is recent the worker keeps to ``worker.duty_while_receiving`` (sleeping after each slice),
so a PACS waiting for C-STORE responses does not wait for the model on a small host.
"""
from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path

from qcnode.log import get_logger

log = get_logger("qcnode.ingest.activity")

ACTIVITY_FILE = ".receiving"  # in the spool root
_SLOT = struct.Struct("d")


class ReceiveActivity:
    """The host-wide time of the last C-STORE (``mark`` by the SCP, ``seconds_since`` by the worker)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < _SLOT.size:
                os.ftruncate(fd, _SLOT.size)
            self._map = mmap.mmap(fd, _SLOT.size)
        finally:
            os.close(fd)

    def mark(self, now: float | None = None) -> None:
        """Record that a C-STORE is being received now."""
        _SLOT.pack_into(self._map, 0, time.monotonic() if now is None else now)

    def seconds_since(self, now: float | None = None) -> float:
        """Seconds since the last mark (infinite when there was none, e.g. since boot)."""
        (last,) = _SLOT.unpack_from(self._map, 0)
        if not last > 0.0:  # 0 (never marked) or garbage
            return float("inf")
        return max(0.0, (time.monotonic() if now is None else now) - last)

    def close(self) -> None:
        self._map.close()


class Pacer:
    """Keeps a background task at ``duty`` of the time while receiving was seen within ``window_s``.

    Call ``pace()`` between small units of work (a decoded file, a model batch, a slice's physics).
    It measures how long the task ran since the last pause and, while receiving is active, sleeps
    ``busy * (1 - duty) / duty``. With ``duty >= 1`` or no activity it never sleeps.
    """

    def __init__(self, activity: ReceiveActivity | None, duty: float = 0.2, window_s: float = 1.0,
                 max_sleep_s: float = 1.0):
        self.activity = activity
        self.duty = duty
        self.window_s = window_s
        self.max_sleep_s = max_sleep_s
        self.slept_s = 0.0
        self._since = time.monotonic()

    def pace(self) -> float:
        """Pause if due; returns the seconds slept."""
        now = time.monotonic()
        busy = now - self._since
        if self.activity is None or self.duty >= 1.0 or self.activity.seconds_since(now) > self.window_s:
            self._since = now
            return 0.0
        pause = min(self.max_sleep_s, busy * (1.0 - max(self.duty, 0.01)) / max(self.duty, 0.01))
        time.sleep(pause)
        self.slept_s += pause
        self._since = time.monotonic()
        return pause


def open_activity(spool_root: str | os.PathLike[str]) -> ReceiveActivity | None:
    """The spool's activity file, or None (logged) when it cannot be mapped."""
    try:
        return ReceiveActivity(Path(spool_root) / ACTIVITY_FILE)
    except (OSError, ValueError) as exc:
        log.warning("receive_activity_unavailable", error=f"{type(exc).__name__}: {exc}")
        return None
