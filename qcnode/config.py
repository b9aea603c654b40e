"""Configuration: one TOML file (``config.toml``), every key with a default.

Relative paths in the file are resolved against the directory of the file.
Environment variables ``QCNODE__SECTION__KEY=value`` override single keys
(for example ``QCNODE__STORAGE__DATABASE_URL=postgresql://...``); values are
parsed as TOML scalars when possible, else taken as strings.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config.toml"


class ConfigError(ValueError):
    """A configuration file or value is invalid."""


@dataclass
class NodeConfig:
    ae_title: str = "QCNODE"
    host: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 16
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu_size: int = 262144
    scp_processes: int = 0
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
    checkpoint: str = "models/mdiqa-default.pt"
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
    ae_title: str = ""
    host: str = "127.0.0.1"
    port: int = 104
    send: list[str] = field(default_factory=lambda: ["sr"])
    tls_enabled: bool = False
    tls_ca: str = ""


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
    base_dir: Path = field(default=PROJECT_ROOT)

    def path(self, value: str) -> Path:
        """Resolve a path from the config against the config file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL, with a relative SQLite path made absolute."""
        url = self.storage.database_url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(self.path(url[len(prefix):]))
        return url


_LIST_TYPES = {"destinations": Destination, "reference_levels": ReferenceLevel}


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
            kwargs[key] = [_build(_LIST_TYPES[key], v, f"{where}{key}[].") for v in value]
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
    for key, raw in environ.items():
        if not key.startswith("QCNODE__"):
            continue
        parts = key[len("QCNODE__"):].lower().split("__")
        if len(parts) != 2:
            raise ConfigError(f"environment override {key} must be QCNODE__SECTION__KEY")
        section, name = parts
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        data.setdefault(section, {})[name] = value


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Load ``path`` (default: the project's ``config.toml``) with env overrides applied."""
    cfg_path = Path(path) if path else DEFAULT_CONFIG_PATH
    if path and not cfg_path.is_file():
        raise ConfigError(f"config file not found: {cfg_path}")
    data: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            data = tomllib.loads(cfg_path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{cfg_path}: {exc}") from exc
    _env_overrides(data, dict(os.environ) if environ is None else environ)
    cfg = _build(Config, data, "")
    cfg.base_dir = cfg_path.resolve().parent
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    if not (1 <= len(cfg.node.ae_title) <= 16):
        raise ConfigError("node.ae_title must be 1-16 characters")
    if not (0 < cfg.node.port < 65536):
        raise ConfigError("node.port must be 1-65535")
    if not 0 <= cfg.node.scp_processes <= 64:
        raise ConfigError("node.scp_processes must be 0 (one per CPU core) to 64")
    if cfg.node.max_pdu_size != 0 and cfg.node.max_pdu_size < 4096:
        raise ConfigError("node.max_pdu_size must be 0 (unlimited) or at least 4096 bytes")
    names = [d.name for d in cfg.destinations]
    if len(set(names)) != len(names) or any(not n for n in names):
        raise ConfigError("every [[destinations]] needs a unique, non-empty name")
    for d in cfg.destinations:
        for rule in d.send:
            if rule not in SEND_RULES:
                raise ConfigError(f"destination {d.name}: unknown send rule {rule!r}; use one of {sorted(SEND_RULES)}")
    hh, _, mm = cfg.audit.time_of_day.partition(":")
    if not (hh.isdigit() and mm.isdigit() and 0 <= int(hh) < 24 and 0 <= int(mm) < 60):
        raise ConfigError(f"audit.time_of_day must be HH:MM (24 h), got {cfg.audit.time_of_day!r}")
    if cfg.audit.baseline_days < 1:
        raise ConfigError("audit.baseline_days must be at least 1")
    if not 0.0 < cfg.worker.duty_while_receiving <= 1.0:
        raise ConfigError("worker.duty_while_receiving must be in (0, 1] (1 = never hold back)")
    if cfg.worker.receiving_window_seconds < 0:
        raise ConfigError("worker.receiving_window_seconds must not be negative")


SEND_RULES = {"sr", "series", "series:PASS", "series:WARN", "series:FAIL"}
