"""Config loading, env overrides, validation, and one-line CLI errors (no tracebacks)."""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qcnode.config import PROJECT_ROOT, ConfigError, load_config


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def db_config(tmp_path: Path, extra: str = "") -> Path:
    """A valid config whose database and files live in ``tmp_path``."""
    return write(tmp_path, f'[storage]\ndatabase_url = "sqlite:///{tmp_path}/var/q.db"\n{extra}')


def qcnode(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QCNODE__")}
    return subprocess.run([sys.executable, "-m", "qcnode.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=PROJECT_ROOT, env={**clean, **(env or {})})


def assert_one_line(r: subprocess.CompletedProcess, prefix: str, code: int = 2, text: str = "") -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qcnode {prefix}: ") and text in lines[0], r.stderr


# ----------------------------------------------------------------------------- CLI (1, 5, 6)
@pytest.mark.parametrize("name,args", [("status", []), ("serve", []), ("db upgrade", []), ("db current", []),
                                       ("audit", []), ("score", [str(PROJECT_ROOT / "config.toml")])])
def test_missing_config_is_one_line_exit_2(tmp_path, name, args):
    r = qcnode(*name.split(), *args, "--config", str(tmp_path / "missing.toml"))
    assert_one_line(r, name, text="config file not found")


@pytest.mark.parametrize("text,expected", [
    ("[node]\nae_title = \n", "Invalid value"),
    ("[node]\nbogus = 1\n", "unknown config key node.bogus"),
    ("[node]\nport = \"x\"\n", "node.port must be a number"),
    ('destinations = ["a"]\n', "destinations[0] must be a table"),
], ids=["malformed", "unknown", "type", "array"])
def test_bad_config_status_one_line(tmp_path, text, expected):
    assert_one_line(qcnode("status", "--config", str(write(tmp_path, text))), "status", text=expected)


def test_bad_env_override_one_line(tmp_path):
    r = qcnode("db", "current", "--config", str(db_config(tmp_path)), env={"QCNODE__DESTINATIONS__NAME": "x"})
    assert_one_line(r, "db current", text="destinations cannot be overridden from the environment")


def test_bad_revision_one_line(tmp_path):
    r = qcnode("db", "upgrade", "--config", str(db_config(tmp_path)), "--revision", "bogus")
    assert_one_line(r, "db upgrade", code=1, text="bogus")


@pytest.mark.parametrize("cmd", [["status"], ["db", "current"], ["db", "upgrade"], ["serve"]], ids=" ".join)
def test_unusable_database_one_line(tmp_path, cmd):
    (tmp_path / "var" / "q.db").mkdir(parents=True)  # a folder where the SQLite file should be
    r = qcnode(*cmd, "--config", str(db_config(tmp_path)))
    assert_one_line(r, " ".join(cmd), code=1, text="database")


def test_serve_on_a_port_in_use_one_line(tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = db_config(tmp_path, f'[node]\nhost = "127.0.0.1"\nport = {port}\n')
        r = qcnode("serve", "--no-worker", "--config", str(cfg))
    # (serve's JSON log lines before it go to stderr too)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("qcnode serve: ") and "Address already in use" in r.stderr


def test_score_reports_broken_env_config():
    r = qcnode("score", str(PROJECT_ROOT / "config.toml"), env={"QCNODE__MODEL__BATCH_SIZE": "abc"})
    assert_one_line(r, "score", text="model.batch_size")


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_score_out_checked_before_scoring(tmp_path, where):
    (tmp_path / "file").write_text("")
    out = tmp_path if where == "folder" else tmp_path / "file" / "out.json"
    # a missing model would exit 1 when loaded: exit 2 shows --out is checked first
    r = qcnode("score", str(PROJECT_ROOT / "config.toml"), "--model", str(tmp_path / "none.pt"), "--out", str(out))
    assert_one_line(r, "score", text="--out")


@pytest.mark.parametrize("cmd", [["audit"], ["serve"]])
def test_unopenable_log_file_one_line(tmp_path, cmd):
    (tmp_path / "file").write_text("")
    cfg = db_config(tmp_path, f'[logging]\nfile = "{tmp_path}/file/qcnode.log"\n')
    assert_one_line(qcnode(*cmd, "--config", str(cfg)), cmd[0], text="logging.file")


def test_audit_out_checked_before_the_run(tmp_path):
    (tmp_path / "file").write_text("")
    cfg = db_config(tmp_path)
    assert_one_line(qcnode("audit", "--config", str(cfg), "--out", str(tmp_path / "file" / "reports")), "audit",
                    text="cannot write the report")
    assert not (tmp_path / "var" / "q.db").exists()  # no run was started, so no error row either


def test_score_help_percent():
    r = qcnode("score", "--help")
    assert r.returncode == 0 and "5-95 % interval" in r.stdout and "%%" not in r.stdout


# ------------------------------------------------------------------------- load_config (2-4, 7, 8)
@pytest.mark.parametrize("text,expected", [
    ('destinations = ["a"]\n', "destinations[0] must be a table"),
    ('destinations = [{name = "a", ae_title = "A"}, 5]\n', "destinations[1] must be a table"),
    ("[audit]\nreference_levels = [1]\n", "audit.reference_levels[0] must be a table"),
    ('[[audit.reference_levels]]\nprotocol = "X"\nbogus = 1\n', "audit.reference_levels[0].bogus"),
])
def test_array_of_tables_entries(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(write(tmp_path, text), environ={})


@pytest.mark.parametrize("var,where", [("QCNODE__DESTINATIONS__NAME", "destinations"),
                                       ("QCNODE__AUDIT__REFERENCE_LEVELS", "audit.reference_levels")])
@pytest.mark.parametrize("file_has_destination", [False, True])
def test_array_sections_not_overridable(tmp_path, var, where, file_has_destination):
    text = '[[destinations]]\nname = "a"\nae_title = "A"\n' if file_has_destination else ""
    with pytest.raises(ConfigError, match=f"^{where} cannot be overridden from the environment"):
        load_config(write(tmp_path, text), environ={var: "x"})


def test_env_values_typed_by_key(tmp_path):
    cfg = load_config(write(tmp_path, ""), environ={
        "QCNODE__NODE__AE_TITLE": "1234", "QCNODE__AUDIT__TIME_OF_DAY": "03:30",
        "QCNODE__STORAGE__SPOOL_DIR": "true", "QCNODE__NODE__ALLOWED_IPS": "10.0.0.0/8, 127.0.0.1",
        "QCNODE__NODE__ALLOWED_AE_TITLES": '["PACS", "CT1"]', "QCNODE__NODE__PORT": "4242",
        "QCNODE__WORKER__ENABLED": "false", "QCNODE__OUTBOX__BACKOFF_MAX_SECONDS": "60",
    })
    assert cfg.node.ae_title == "1234" and cfg.audit.time_of_day == "03:30" and cfg.storage.spool_dir == "true"
    assert cfg.node.allowed_ips == ["10.0.0.0/8", "127.0.0.1"] and cfg.node.allowed_ae_titles == ["PACS", "CT1"]
    assert cfg.node.port == 4242 and cfg.worker.enabled is False and cfg.outbox.backoff_max_seconds == 60.0
    assert load_config(write(tmp_path, ""), environ={"QCNODE__NODE__ALLOWED_IPS": ""}).node.allowed_ips == []
    assert load_config(write(tmp_path, ""), environ={"QCNODE__NODE__ALLOWED_AE_TITLES": "1234"}
                       ).node.allowed_ae_titles == ["1234"]
    with pytest.raises(ConfigError, match="node.port must be a number"):
        load_config(write(tmp_path, ""), environ={"QCNODE__NODE__PORT": "abc"})
    with pytest.raises(ConfigError, match="unknown config key node.bogus"):
        load_config(write(tmp_path, ""), environ={"QCNODE__NODE__BOGUS": "1"})


@pytest.mark.parametrize("text,key", [
    ('[logging]\nlevel = "verbose"', "logging.level"),
    ('[node]\nallowed_ips = ["10.0.0.0/33"]', "node.allowed_ips"),
    ('[node]\nallowed_ips = ["pacs.local"]', "node.allowed_ips"),
    ("[node]\nallowed_ips = [10]", "node.allowed_ips"),
    ('[node]\nallowed_ae_titles = ["SEVENTEEN_CHARS_X"]', "node.allowed_ae_titles"),
    ('[node]\nallowed_ae_titles = [""]', "node.allowed_ae_titles"),
    ("[node]\nallowed_ae_titles = [1]", "node.allowed_ae_titles"),
    ('[[destinations]]\nname = "p"', "ae_title"),
    ('[[destinations]]\nname = "p"\nae_title = "SEVENTEEN_CHARS_X"', "ae_title"),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nport = 0', "port"),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nport = 70000', "port"),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = ""', "host"),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nsend = [["sr"]]', "send rule"),
    ("[model]\nbatch_size = 0", "model.batch_size"),
    ("[series]\nstable_seconds = -1", "series.stable_seconds"),
    ("[node]\nmax_associations = 0", "node.max_associations"),
    ("[worker]\nmax_attempts = 0", "worker.max_attempts"),
    ("[outbox]\nmax_attempts = 0", "outbox.max_attempts"),
    ("[outbox]\nmax_attempts = 101", "outbox.max_attempts"),
    ("[worker]\nlease_seconds = 0", "worker.lease_seconds"),
    ("[outbox]\nlease_seconds = -1", "outbox.lease_seconds"),
    ("[outbox]\nbackoff_initial_seconds = 0", "outbox.backoff_initial_seconds"),
    ("[outbox]\nbackoff_max_seconds = -5", "outbox.backoff"),
    ("[outbox]\nbackoff_initial_seconds = 10\nbackoff_max_seconds = 5", "outbox.backoff"),
    ("[node]\ntls_enabled = true", "node.tls_cert"),
    ('[node]\ntls_enabled = true\ntls_cert = "c.pem"', "node.tls_key"),
    ('[model]\ndevice = "auto"', "model.device"),
    ('[model]\ndevice = "gpu"', "model.device"),
    ("[verdict]\nwarn_mean_below = 1.0\nfail_mean_below = 1.5", "verdict.warn_mean_below"),
    ("[verdict]\nwarn_fraction_below = 0.6\nfail_fraction_below = 0.5", "verdict.warn_fraction_below"),
])
def test_validation_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(write(tmp_path, text + "\n"), environ={})


def test_valid_values_pass(tmp_path):
    cfg = load_config(write(tmp_path, """
[node]
allowed_ips = ["10.0.0.0/8", "192.168.1.7", "::1", "fd00::/8"]
allowed_ae_titles = ["PACS", "SIXTEEN_CHARS_XX"]
tls_enabled = true
tls_cert = "c.pem"
tls_key = "k.pem"
[model]
device = "cuda:1"
[logging]
level = "WARNING"
[verdict]
warn_mean_below = 1.5
fail_mean_below = 1.5
[outbox]
backoff_initial_seconds = 5.0
backoff_max_seconds = 5.0
max_attempts = 100
[series]
stable_seconds = 0
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
"""), environ={})
    assert cfg.destinations[0].host == "127.0.0.1" and cfg.destinations[0].port == 104
    assert load_config(environ={}).model.device == "cpu"  # the project's config.toml


def test_default_checkpoint_is_the_shipped_model(tmp_path):
    shipped = PROJECT_ROOT / "models" / "mdiqa-default.pt"
    cfg = load_config(write(tmp_path, '[model]\nbatch_size = 4\n'), environ={})
    assert cfg.path(cfg.model.checkpoint) == shipped
    cfg = load_config(write(tmp_path, '[model]\ncheckpoint = "m.pt"\n'), environ={})
    assert cfg.path(cfg.model.checkpoint) == tmp_path / "m.pt"
    cfg = load_config(write(tmp_path, ""), environ={"QCNODE__MODEL__CHECKPOINT": "sub/m.pt"})
    assert cfg.path(cfg.model.checkpoint) == tmp_path / "sub" / "m.pt"
    assert load_config(environ={}).path(load_config(environ={}).model.checkpoint) == shipped


def test_sqlite_folder_is_owner_only(tmp_path):
    from qcnode.db.engine import make_engine

    make_engine(f"sqlite:///{tmp_path}/newdir/q.db").dispose()
    assert stat.S_IMODE((tmp_path / "newdir").stat().st_mode) == 0o700


@pytest.mark.parametrize("url,expected", [
    ("postgresql+psycopg://qc:secret@db/qcnode", "the driver of 'postgresql+psycopg' is not installed"),
    ("postgresql+nosuch://qc:secret@db/qcnode", "unknown driver 'postgresql+nosuch'"),
    ("mysql://qc:secret@db/qcnode", "'mysql' databases are not supported"),
    ("qcnode.db", "not a database URL"),
], ids=["driver-missing", "driver-unknown", "backend", "not-a-url"])
def test_unusable_database_url_is_one_line_before_connecting(tmp_path, url, expected):
    """A driver that is not installed was a ModuleNotFoundError traceback; the password is never shown."""
    r = qcnode("status", "--config", str(write(tmp_path, f'[storage]\ndatabase_url = "{url}"\n')))
    assert_one_line(r, "status", text=f"storage.database_url: {expected}")
    assert "secret" not in r.stderr


def test_bare_postgresql_url_uses_the_installed_psycopg2(tmp_path):
    """SQLAlchemy 2.1 maps postgresql:// to psycopg 3, which qcnode does not install."""
    cfg = load_config(write(tmp_path, '[storage]\ndatabase_url = "postgresql://qc@db/qcnode"\n'), environ={})
    assert cfg.database_url == "postgresql+psycopg2://qc@db/qcnode"
    cfg = load_config(write(tmp_path, '[storage]\ndatabase_url = "postgresql+psycopg2://qc@db/x"\n'), environ={})
    assert cfg.database_url == "postgresql+psycopg2://qc@db/x"


# ------------------------------------------------------------------------- DICOMweb destinations
WEB = '[[destinations]]\nname = "web"\ntype = "dicomweb"\n'


@pytest.mark.parametrize("text,expected", [
    ('[[destinations]]\nname = "p"\ntype = "web"', "destination p: type must be 'dicom' or 'dicomweb', got 'web'"),
    (WEB, 'destination web: type = "dicomweb" needs url'),
    (WEB + 'url = "ftp://pacs/dicom-web"', "destination web: url must be an http:// or https:// URL with a host"),
    (WEB + 'url = "pacs/dicom-web"', "url must be an http:// or https:// URL"),
    (WEB + 'url = "https:///dicom-web"', "url must be an http:// or https:// URL with a host"),
    (WEB + 'url = "https://pacs:99999/dicom-web"', "destination web: url is not a valid URL"),
    (WEB + 'url = "https://pacs/dicom-web?x=1"', "url must have no query or fragment"),
    (WEB + 'url = "https://qc:hunter2@pacs/dicom-web"',
     "url must not hold credentials; use username + password_file"),
    (WEB + 'url = "https://pacs/dw"\nae_title = "PACS"',
     'destination web: ae_title does not apply to type = "dicomweb" (it is reached by url)'),
    (WEB + 'url = "https://pacs/dw"\nhost = "pacs"\nport = 443', 'host, port do not apply to type = "dicomweb"'),
    (WEB + 'url = "https://pacs/dw"\ntls_enabled = true', "tls_enabled does not apply"),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nurl = "https://pacs/dw"',
     'destination p: url needs type = "dicomweb"'),
    ('[[destinations]]\nname = "p"\nurl = "https://pacs/dw"\nusername = "u"', 'url, username need type = "dicomweb"'),
    (WEB + 'url = "https://pacs/dw"\nusername = "qc"', "username and password_file go together"),
    (WEB + 'url = "https://pacs/dw"\npassword_file = "pw"', "username and password_file go together"),
    (WEB + 'url = "https://pacs/dw"\nusername = "qc"\npassword_file = "pw"\nbearer_token_file = "t"',
     "either username + password_file or bearer_token_file"),
    (WEB + 'url = "http://pacs/dw"\ntls_ca = "ca.pem"', "destination web: tls_ca needs an https:// url"),
    (WEB + 'url = "https://pacs/dw"\ntimeout_seconds = -1', "destination web: timeout_seconds must not be negative"),
    (WEB + 'url = "https://pacs/dw"\ntls_verify = "no"', "destinations[0].tls_verify must be true or false"),
], ids=["type", "no-url", "ftp", "no-scheme", "no-host", "bad-port", "query", "credentials", "ae_title", "host-port",
        "tls_enabled", "url-on-dicom", "keys-on-dicom", "user-only", "password-only", "two-auths", "tls_ca-http",
        "timeout", "tls_verify-type"])
def test_dicomweb_destination_checked_at_load(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)) as err:
        load_config(write(tmp_path, text + "\n"), environ={})
    assert "hunter2" not in str(err.value)


def test_dicomweb_destination_loads(tmp_path):
    cfg = load_config(write(tmp_path, '''
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
[[destinations]]
name = "web"
type = "dicomweb"
url = "https://pacs.example.org:8443/dicom-web"
username = "qcnode"
password_file = "secrets/pacs.pw"
tls_ca = "ca.pem"
timeout_seconds = 60
send = ["sr", "kos:FAIL"]
[[destinations]]
name = "cloud"
type = "dicomweb"
url = "http://127.0.0.1:8042/dicom-web/studies"
bearer_token_file = "token"
tls_verify = false
'''), environ={})
    pacs, web, cloud = cfg.destinations
    assert (pacs.type, pacs.ae_title, pacs.port, pacs.timeout_seconds) == ("dicom", "ORTHANC", 104, 0.0)
    assert (web.type, web.url, web.username, web.password_file, web.tls_verify) == (
        "dicomweb", "https://pacs.example.org:8443/dicom-web", "qcnode", "secrets/pacs.pw", True)
    assert web.timeout_seconds == 60.0 and web.send == ["sr", "kos:FAIL"]
    assert (cloud.bearer_token_file, cloud.tls_verify) == ("token", False)


def test_dicomweb_config_error_is_one_line(tmp_path):
    r = qcnode("status", "--config", str(write(tmp_path, WEB)))
    assert_one_line(r, "status", text='destination web: type = "dicomweb" needs url')


def test_fast_path_switch(tmp_path):
    """node.fast_path: qcnode's receive path (default) or pynetdicom's own (qcnode/net/)."""
    assert load_config(environ={}).node.fast_path is True  # the project's config.toml
    assert load_config(write(tmp_path, "[node]\nfast_path = false\n"), environ={}).node.fast_path is False
    assert load_config(write(tmp_path, ""), environ={"QCNODE__NODE__FAST_PATH": "false"}).node.fast_path is False
    with pytest.raises(ConfigError, match="node.fast_path must be true or false"):
        load_config(write(tmp_path, '[node]\nfast_path = "no"\n'), environ={})
