"""structlog JSON logging for every qcnode process.

One JSON object per line (stderr, or appended to ``logging.file``). Standard-library
loggers (pynetdicom, alembic, apscheduler) are routed through the same renderer.
A processor drops any key that could carry a patient name or ID, as a safety net:
code must never log those (nor dataset reprs) in the first place.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, TextIO

import structlog

from qcnode.config import LOG_LEVELS, ConfigError

# Normalised (lower-case, no separators) keys that are never written to a log line.
PHI_KEYS = {"patientname", "patientid", "patientsname", "patientbirthdate", "patientbirthname",
            "otherpatientids", "otherpatientnames", "patientaddress", "accessionnumber",
            "patient", "dataset", "ds"}
REDACTED = "[redacted]"

_LEVELS = {name: logging.getLevelName(name.upper()) for name in LOG_LEVELS}


def _norm(key: str) -> str:
    return "".join(ch for ch in key.lower() if ch.isalnum())


def redact_phi(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: replace values of PHI-like keys with ``[redacted]``."""
    for key in list(event_dict):
        if _norm(key) in PHI_KEYS:
            event_dict[key] = REDACTED
    return event_dict


# pydicom quotes element values in its warnings ("Invalid value for VR IS: 'SECRETID77'"), which
# may be a patient's name or ID: in its records, and in captured warnings, quoted text is redacted.
# Greedy, from the first to the last quote: a value holding a quote is still covered.
_QUOTED = re.compile(r"'.*'|\".*\"", re.DOTALL)
_QUOTE_REDACTED_LOGGERS = ("pydicom", "py.warnings")


def redact_quoted(text: str) -> str:
    """``text`` with quoted parts ('...' / "...") replaced by '<redacted>' (exception text about a
    header value may quote the value)."""
    return _QUOTED.sub("'<redacted>'", text)


def redact_quoted_values(record: logging.LogRecord) -> bool:
    """logging filter: in records of pydicom (and captured warnings) replace '...' / "..." with '<redacted>'."""
    name = record.name
    if name in _QUOTE_REDACTED_LOGGERS or name.startswith("pydicom."):
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: redact the raw message
            text = str(record.msg)
        record.msg = redact_quoted(text)
        record.args = None
    return True


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
    """Configure structlog + stdlib logging to write JSON lines at ``level`` to stderr or ``file``.

    Raises ConfigError when ``file`` cannot be opened."""
    lvl = _LEVELS.get(str(level).lower())
    if lvl is None:
        raise ValueError(f"unknown log level {level!r}; use one of {sorted(_LEVELS)}")
    stream: TextIO
    if file:
        path = os.fspath(file)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"logging.file: cannot open {path}: {exc.strerror or exc}") from exc
        stream = os.fdopen(fd, "a", buffering=1)
    else:
        stream = sys.stderr
    handler = logging.StreamHandler(stream)
    handler.addFilter(redact_quoted_values)  # pydicom's warnings quote element values (PHI)
    logging.captureWarnings(True)  # warnings.warn (pydicom's too) through the handler, not raw to stderr
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
