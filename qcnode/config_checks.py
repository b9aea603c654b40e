"""The checks a loaded configuration must pass: one line (``ConfigError``) for the first problem.

Apart from ``qcnode.config`` (the keys and their defaults) so that either stays short to read.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any

from qcnode.config import (DESTINATION_TYPES, DICOM_ONLY_KEYS, DICOMWEB_ONLY_KEYS, DEVICE_RE, LOG_LEVELS, Config,
                           ConfigError, Destination, HttpConfig)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_ae_title(value: Any) -> bool:
    return isinstance(value, str) and 1 <= len(value.strip()) <= 16


def _is_network(value: Any) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return isinstance(value, str)


def validate(cfg: Config) -> None:
    node, outbox, v = cfg.node, cfg.outbox, cfg.verdict
    _check(_is_ae_title(node.ae_title), "node.ae_title must be 1-16 characters")
    _check(0 < node.port < 65536, "node.port must be 1-65535")
    _check(node.max_associations >= 1, "node.max_associations must be at least 1")
    _check(node.artim_timeout > 0, "node.artim_timeout must be positive")
    _check(0 <= node.scp_processes <= 64, "node.scp_processes must be 0 (one per CPU core) to 64")
    _check(node.max_pdu_size == 0 or node.max_pdu_size >= 4096,
           "node.max_pdu_size must be 0 (unlimited) or at least 4096 bytes")
    for a in node.allowed_ae_titles:
        _check(_is_ae_title(a), f"node.allowed_ae_titles: {a!r} is not a 1-16 character AE title")
    for n in node.allowed_ips:
        _check(_is_network(n), f"node.allowed_ips: {n!r} is not an IP address or network (e.g. 10.0.0.0/8)")
    _check(not node.tls_enabled or bool(node.tls_cert and node.tls_key),
           "node.tls_enabled needs node.tls_cert and node.tls_key (PEM files)")
    _check(cfg.series.stable_seconds >= 0, "series.stable_seconds must not be negative")
    _check(cfg.model.batch_size >= 1, "model.batch_size must be at least 1")
    _check(bool(DEVICE_RE.fullmatch(cfg.model.device)),
           f"model.device must be cpu, cuda, cuda:N or mps, got {cfg.model.device!r}")
    _check(v.warn_mean_below >= v.fail_mean_below,
           "verdict.warn_mean_below must not be below verdict.fail_mean_below (WARN is the milder verdict)")
    _check(v.warn_fraction_below <= v.fail_fraction_below,
           "verdict.warn_fraction_below must not be above verdict.fail_fraction_below (WARN is the milder verdict)")
    _check(cfg.worker.max_attempts >= 1, "worker.max_attempts must be at least 1")
    _check(cfg.worker.max_interruptions >= 0, "worker.max_interruptions must not be negative")
    _check(cfg.worker.retry_failed_seconds >= 0, "worker.retry_failed_seconds must not be negative")
    _check(cfg.worker.lease_seconds > 0, "worker.lease_seconds must be positive")
    _check(0.0 < cfg.worker.duty_while_receiving <= 1.0,
           "worker.duty_while_receiving must be in (0, 1] (1 = never hold back)")
    _check(cfg.worker.receiving_window_seconds >= 0, "worker.receiving_window_seconds must not be negative")
    _check(1 <= outbox.max_attempts <= 100, "outbox.max_attempts must be 1-100")
    _check(outbox.lease_seconds > 0, "outbox.lease_seconds must be positive")
    _check(0 < outbox.backoff_initial_seconds <= outbox.backoff_max_seconds,
           "outbox.backoff_initial_seconds and outbox.backoff_max_seconds must be positive, initial <= max")
    _check(cfg.logging.level.lower() in LOG_LEVELS,
           f"logging.level must be one of {', '.join(LOG_LEVELS)}, got {cfg.logging.level!r}")
    names = [d.name for d in cfg.destinations]
    _check(len(set(names)) == len(names) and all(names), "every [[destinations]] needs a unique, non-empty name")
    for d in cfg.destinations:
        _check(d.type in DESTINATION_TYPES, f"destination {d.name}: type must be "
               f"{' or '.join(repr(t) for t in DESTINATION_TYPES)}, got {d.type!r}")
        _check(d.timeout_seconds >= 0, f"destination {d.name}: timeout_seconds must not be negative "
               "(0 = outbox.send_timeout_seconds)")
        if d.type == "dicomweb":
            _validate_dicomweb(d)
        else:
            _check(_is_ae_title(d.ae_title), f"destination {d.name}: ae_title must be 1-16 characters")
            _check(bool(d.host.strip()), f"destination {d.name}: host must not be empty")
            _check(0 < d.port < 65536, f"destination {d.name}: port must be 1-65535")
        for rule in d.send:
            _check(isinstance(rule, str) and rule in SEND_RULES,
                   f"destination {d.name}: unknown send rule {rule!r}; use one of {sorted(SEND_RULES)}")
    problem = database_url_problem(cfg.database_url)
    _check(problem is None, f"storage.database_url: {problem}")
    hh, _, mm = cfg.audit.time_of_day.partition(":")
    _check(hh.isdigit() and mm.isdigit() and 0 <= int(hh) < 24 and 0 <= int(mm) < 60,
           f"audit.time_of_day must be HH:MM (24 h), got {cfg.audit.time_of_day!r}")
    _check(cfg.audit.baseline_days >= 1, "audit.baseline_days must be at least 1")
    _check(1 <= cfg.dashboard.page_size <= 1000, "dashboard.page_size must be 1-1000")
    _check(cfg.dashboard.protocols_days >= 1, "dashboard.protocols_days must be at least 1")
    _check(cfg.dashboard.scatter_max_points >= 1, "dashboard.scatter_max_points must be at least 1")
    for key in ("webhook_verdict_fail", "webhook_audit_flag"):
        url = getattr(cfg.alerts, key)
        _check(not url or url.startswith(("http://", "https://")),
               f"alerts.{key} must be an http:// or https:// URL (or empty), got {url!r}")
    _check(cfg.alerts.webhook_timeout_seconds > 0, "alerts.webhook_timeout_seconds must be positive")
    _check(cfg.alerts.webhook_lookback_hours > 0, "alerts.webhook_lookback_hours must be positive")
    _validate_http(cfg.http)


HTTP_ROLES = ("read", "store", "admin")
MAX_SESSION_HOURS = 720
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def is_loopback(host: str) -> bool:
    """True for a loopback bind address (127.0.0.0/8, ::1, localhost): only this host can connect."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:
        return False


def _validate_http(http: HttpConfig) -> None:
    _check(bool(http.host.strip()), "http.host must not be empty (127.0.0.1: this host only)")
    _check(0 < http.port < 65536, "http.port must be 1-65535")
    _check(http.max_body_mb >= 1, "http.max_body_mb must be at least 1")
    _check(not http.root_path or (http.root_path.startswith("/") and not http.root_path.endswith("/")),
           'http.root_path must be "" or a path like "/qcnode" (leading slash, none at the end)')
    _check(bool(http.tls_cert) == bool(http.tls_key), "http.tls_cert and http.tls_key go together (PEM files)")
    _check(bool(http.session_key_file.strip()),
           'http.session_key_file must not be empty (the sign-in key, e.g. "var/http_session.key")')
    _check(0 < http.session_hours <= MAX_SESSION_HOURS,
           f"http.session_hours must be more than 0 and at most {MAX_SESSION_HOURS} (30 days), "
           f"got {http.session_hours!r}")
    names = [t.name for t in http.tokens]
    _check(all(names) and len(set(names)) == len(names), "every [[http.tokens]] needs a unique, non-empty name")
    for t in http.tokens:
        _check(bool(_SHA256_RE.fullmatch(t.sha256.lower())),
               f"http token {t.name}: sha256 must be the 64 hex digits of the token's SHA-256 (not the token)")
        _check(t.role in HTTP_ROLES,
               f"http token {t.name}: role must be one of {', '.join(HTTP_ROLES)}, got {t.role!r}")
    _check(not http.enabled or is_loopback(http.host) or bool(http.tokens),
           f"http.host {http.host} is not a loopback address: configure [[http.tokens]] (anyone could store "
           f"instances otherwise) or bind to 127.0.0.1")


def _validate_dicomweb(d: Destination) -> None:
    """A ``type = "dicomweb"`` destination: an http(s) url without credentials, one auth method."""
    from urllib.parse import urlsplit
    where = f"destination {d.name}"
    _check(bool(d.url.strip()), f'{where}: type = "dicomweb" needs url (the DICOMweb root, e.g. '
           '"https://pacs.example.org/dicom-web")')
    try:
        parts = urlsplit(d.url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: url is not a valid URL ({exc})") from None
    _check(parts.scheme in ("http", "https") and bool(parts.hostname),
           f"{where}: url must be an http:// or https:// URL with a host, got scheme {parts.scheme!r}")
    _check(port is None or 0 < port < 65536, f"{where}: url port must be 1-65535")
    _check(parts.username is None and parts.password is None,
           f"{where}: url must not hold credentials; use username + password_file or bearer_token_file")
    _check(not parts.query and not parts.fragment, f"{where}: url must have no query or fragment")
    _check(bool(d.username) == bool(d.password_file),
           f"{where}: username and password_file go together (HTTP basic auth)")
    _check(not (d.username and d.bearer_token_file),
           f"{where}: use either username + password_file or bearer_token_file, not both")
    _check(not d.tls_ca or parts.scheme == "https", f"{where}: tls_ca needs an https:// url")


def check_destination_keys(cfg: Config, tables: list[dict[str, Any]]) -> None:
    """Keys a destination's table sets that belong to the other destination type."""
    for d, table in zip(cfg.destinations, tables):
        if d.type not in DESTINATION_TYPES:
            continue  # _validate names the type
        if d.type == "dicomweb":
            wrong = [k for k in DICOM_ONLY_KEYS if k in table]
            _check(not wrong, f"destination {d.name}: {', '.join(wrong)} "
                   f"{'does' if len(wrong) == 1 else 'do'} not apply to type = \"dicomweb\" (it is reached by url)")
        else:
            wrong = [k for k in DICOMWEB_ONLY_KEYS if k in table]
            _check(not wrong, f"destination {d.name}: {', '.join(wrong)} "
                   f"{'needs' if len(wrong) == 1 else 'need'} type = \"dicomweb\"")


def database_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be used as qcnode's database (unparseable, not SQLite or PostgreSQL, or
    its driver not installed), or None. Never quotes the URL (it may hold a password)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    try:
        parsed = make_url(url)
    except ArgumentError:
        return "not a database URL (sqlite:///path/to/qcnode.db or postgresql://user@host/db)"
    if parsed.get_backend_name() not in SUPPORTED_DATABASES:
        return (f"{parsed.get_backend_name()!r} databases are not supported; use "
                f"{' or '.join(SUPPORTED_DATABASES)}")
    try:
        parsed.get_dialect().import_dbapi()
    except NoSuchModuleError:
        return f"unknown driver {parsed.drivername!r}"
    except ImportError as exc:
        return (f"the driver of {parsed.drivername!r} is not installed ({exc}); use postgresql:// "
                f"(psycopg2, which qcnode installs) or install the driver into qcnode's environment")
    return None


SUPPORTED_DATABASES = ("sqlite", "postgresql")
SEND_RULES = {"sr", "series", "series:PASS", "series:WARN", "series:FAIL", "kos:WARN", "kos:FAIL"}
