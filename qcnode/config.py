"""Configuration: one TOML file (``config.toml``), every key with a default.

Relative paths in the file are resolved against the directory of the file; the default
``model.checkpoint`` (when neither the file nor the environment sets it) is the shipped model.
Environment variables ``QCNODE__SECTION__KEY=value`` override single keys
(for example ``QCNODE__STORAGE__DATABASE_URL=postgresql://...``): a string key takes the value as
it is, a list key a TOML array or a comma-separated list, other keys a TOML value (``true``, ``8``).
The array sections (``[[destinations]]``, ``[[audit.reference_levels]]``, ``[[http.tokens]]``) cannot be
overridden.
"""
from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config.toml"
DEFAULT_CHECKPOINT = PROJECT_ROOT / "models" / "mdiqa-default.pt"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEVICE_RE = re.compile(r"cpu|mps|cuda(:\d+)?")  # what torch's .to(device) takes here


class ConfigError(ValueError):
    """A configuration file or value is invalid."""


@dataclass
class NodeConfig:
    ae_title: str = "QCNODE"
    host: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 16
    acse_timeout: float = 30.0
    artim_timeout: float = 3.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu_size: int = 262144
    scp_processes: int = 0
    fast_path: bool = True
    allowed_ae_titles: list[str] = field(default_factory=list)
    allowed_ips: list[str] = field(default_factory=list)
    tls_enabled: bool = False
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_require_client_cert: bool = False


@dataclass
class StorageConfig:
    database_url: str = "sqlite:///var/qcnode.db"
    spool_dir: str = "var/spool"
    quarantine_dir: str = "var/quarantine"
    min_free_disk_mb: int = 1024


@dataclass
class SeriesConfig:
    stable_seconds: float = 10.0
    tracker_interval_seconds: float = 1.0


@dataclass
class ModelConfig:
    checkpoint: str = str(DEFAULT_CHECKPOINT)
    batch_size: int = 16
    device: str = "cpu"
    threads: int = 0


@dataclass
class VerdictConfig:
    slice_threshold: float = 2.0
    warn_mean_below: float = 2.5
    fail_mean_below: float = 1.5
    warn_fraction_below: float = 0.2
    fail_fraction_below: float = 0.5


@dataclass
class WorkerConfig:
    enabled: bool = True
    lease_seconds: float = 300.0
    poll_interval_seconds: float = 0.5
    max_attempts: int = 5
    max_interruptions: int = 10
    retry_failed_seconds: float = 600.0
    separate_process: bool = True
    nice: int = 10
    duty_while_receiving: float = 0.2
    receiving_window_seconds: float = 1.0


@dataclass
class OutboxConfig:
    max_attempts: int = 8
    backoff_initial_seconds: float = 2.0
    backoff_max_seconds: float = 300.0
    poll_interval_seconds: float = 1.0
    lease_seconds: float = 120.0
    send_timeout_seconds: float = 30.0
    batch_size: int = 16


@dataclass
class Destination:
    name: str = ""
    type: str = "dicom"  # "dicom": C-STORE SCU; "dicomweb": STOW-RS (qcnode.delivery.dicomweb)
    ae_title: str = ""
    host: str = "127.0.0.1"
    port: int = 104
    send: list[str] = field(default_factory=lambda: ["sr"])
    tls_enabled: bool = False
    tls_ca: str = ""
    timeout_seconds: float = 0.0  # 0 = outbox.send_timeout_seconds
    # type = "dicomweb" only: the service root (the URL before /studies) and its HTTP auth
    url: str = ""
    username: str = ""
    password_file: str = ""
    bearer_token_file: str = ""
    tls_verify: bool = True


DESTINATION_TYPES = ("dicom", "dicomweb")
# keys that belong to one destination type only (checked on the keys the file sets)
DICOM_ONLY_KEYS = ("ae_title", "host", "port", "tls_enabled")
DICOMWEB_ONLY_KEYS = ("url", "username", "password_file", "bearer_token_file", "tls_verify")


@dataclass
class LoggingConfig:
    level: str = "info"
    file: str = ""


@dataclass
class PrivacyConfig:
    pseudonymise_patient_id: bool = True
    pseudonym_key_file: str = "var/pseudonym.key"


@dataclass
class ReferenceLevel:
    protocol: str = ""
    ctdivol_mgy: float = 0.0


@dataclass
class AuditConfig:
    enabled: bool = True
    time_of_day: str = "02:00"
    out_dir: str = "var/audit"
    baseline_days: int = 30
    baseline_min_series: int = 3
    noise_drift_fraction: float = 0.25
    score_drift: float = 0.4
    default_reference_ctdivol_mgy: float = 0.0
    reference_levels: list[ReferenceLevel] = field(default_factory=list)


@dataclass
class DashboardConfig:
    secret_key_file: str = "var/dashboard.key"
    page_size: int = 50
    protocols_days: int = 90
    scatter_max_points: int = 3000


@dataclass
class AlertsConfig:
    webhook_verdict_fail: str = ""
    webhook_audit_flag: str = ""
    webhook_timeout_seconds: float = 10.0
    webhook_lookback_hours: float = 24.0


@dataclass
class HttpToken:
    """A bearer token of the HTTP server: only its SHA-256 is configured, never the token itself."""
    name: str = ""
    sha256: str = ""
    role: str = "read"


@dataclass
class HttpConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: str = ""
    tls_key: str = ""
    max_body_mb: int = 2048
    root_path: str = ""  # a reverse proxy's path prefix (e.g. "/qcnode"): links, forms and cookies carry it
    tokens: list[HttpToken] = field(default_factory=list)


@dataclass
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    verdict: VerdictConfig = field(default_factory=VerdictConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    destinations: list[Destination] = field(default_factory=list)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    base_dir: Path = field(default=PROJECT_ROOT)

    def path(self, value: str) -> Path:
        """Resolve a path from the config against the config file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL, with a relative SQLite path made absolute and a bare postgresql://
        bound to psycopg2, the driver qcnode installs (SQLAlchemy 2.1 would pick psycopg 3)."""
        url = self.storage.database_url
        if url.startswith("postgresql://"):
            return "postgresql+psycopg2://" + url[len("postgresql://"):]
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(self.path(url[len(prefix):]))
        return url


_LIST_TYPES = {"destinations": Destination, "reference_levels": ReferenceLevel, "tokens": HttpToken}


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known or key == "base_dir":
            raise ConfigError(f"unknown config key {where}{key}")
        default = getattr(cls(), key)
        if key in _LIST_TYPES:
            if not isinstance(value, list):
                raise ConfigError(f"{where}{key} must be an array of tables")
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise ConfigError(f"{where}{key}[{i}] must be a table, got {item!r}")
            kwargs[key] = [_build(_LIST_TYPES[key], v, f"{where}{key}[{i}].") for i, v in enumerate(value)]
        elif is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"[{where}{key}] must be a table")
            kwargs[key] = _build(type(default), value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, default, f"{where}{key}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, name: str) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if isinstance(default, float):
            return float(value)
        if not float(value).is_integer():
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be an array, got {value!r}")
        return value
    return value


def _env_overrides(data: dict[str, Any], environ: dict[str, str]) -> None:
    defaults = Config()
    for key, raw in environ.items():
        if not key.startswith("QCNODE__"):
            continue
        parts = key[len("QCNODE__"):].lower().split("__")
        if len(parts) != 2:
            raise ConfigError(f"environment override {key} must be QCNODE__SECTION__KEY")
        section, name = parts
        table_default = getattr(defaults, section, None)
        default = getattr(table_default, name, None)
        if isinstance(table_default, list) or (name in _LIST_TYPES and default is not None):
            where = section if section in _LIST_TYPES else f"{section}.{name}"
            raise ConfigError(f"{where} cannot be overridden from the environment ({key}); edit the file")
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table")
        table[name] = _env_value(raw, default)


def _env_value(raw: str, default: Any) -> Any:
    """An env string as the type of ``default``: strings verbatim, lists also comma-separated."""
    if isinstance(default, str):
        return raw
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if isinstance(default, list) and not isinstance(value, list):
        return [item.strip() for item in raw.split(",") if item.strip()]
    return value


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load ``path`` (default: the project's ``config.toml``) with env overrides applied."""
    cfg_path = Path(path) if path else DEFAULT_CONFIG_PATH
    if path and not cfg_path.is_file():
        raise ConfigError(f"config file not found: {cfg_path}")
    data: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            data = tomllib.loads(cfg_path.read_text())
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{cfg_path}: {exc}") from exc
    _env_overrides(data, dict(os.environ) if environ is None else environ)
    cfg = _build(Config, data, "")
    cfg.base_dir = cfg_path.resolve().parent
    _check_destination_keys(cfg, data.get("destinations") or [])
    _validate(cfg)
    return cfg


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


def _validate(cfg: Config) -> None:
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


def _check_destination_keys(cfg: Config, tables: list[dict[str, Any]]) -> None:
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
