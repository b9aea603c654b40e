"""structlog JSON logging for every qcnode process.

One JSON object per line (stderr, or appended to ``logging.file``). Standard-library
loggers (pynetdicom, alembic, apscheduler) are routed through the same renderer.
A processor drops any key that could carry a patient name or ID, as a safety net:
code must never log those (nor dataset reprs) in the first place.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

# Normalised (lower-case, no separators) keys that are never written to a log line.
PHI_KEYS = {"patientname", "patientid", "patientsname", "patientbirthdate", "patientbirthname",
            "otherpatientids", "otherpatientnames", "patientaddress", "accessionnumber",
            "patient", "dataset", "ds"}
REDACTED = "[redacted]"

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


def _norm(key: str) -> str:
    return "".join(ch for ch in key.lower() if ch.isalnum())


def redact_phi(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: replace values of PHI-like keys with ``[redacted]``."""
    for key in list(event_dict):
        if _norm(key) in PHI_KEYS:
            event_dict[key] = REDACTED
    return event_dict


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_phi,
        structlog.processors.format_exc_info,
    ]


def configure_logging(level: str = "info", file: str | os.PathLike[str] | None = None) -> None:
    """Configure structlog + stdlib logging to write JSON lines at ``level`` to stderr or ``file``."""
    lvl = _LEVELS.get(str(level).lower())
    if lvl is None:
        raise ValueError(f"unknown log level {level!r}; use one of {sorted(_LEVELS)}")
    stream: TextIO
    if file:
        path = os.fspath(file)
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        stream = os.fdopen(fd, "a", buffering=1)
    else:
        stream = sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer()]))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)
    # pynetdicom logs PDU/dataset details at debug level: keep it at warning unless debugging
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if lvl > logging.DEBUG else logging.INFO)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    structlog.configure(
        # filter_by_level first: a disabled level (e.g. the per-instance debug line) costs ~nothing
        processors=[structlog.stdlib.filter_by_level, *_shared_processors(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None) -> Any:
    """A structlog logger (JSON once ``configure_logging`` ran)."""
    return structlog.get_logger(name)
