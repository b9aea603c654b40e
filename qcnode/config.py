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
    behind_tls_proxy: bool = False  # a TLS-terminating proxy serves the node over HTTPS: cookies are Secure
    session_key_file: str = "var/http_session.key"  # signs the browser's sign-in sessions (created 0600)
    session_hours: float = 12.0  # a browser's sign-in lasts this long
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
    from qcnode.config_checks import check_destination_keys, validate
    check_destination_keys(cfg, data.get("destinations") or [])
    validate(cfg)
    return cfg
