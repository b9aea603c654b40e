"""Helpers for the daemon tests: configs, test series with fresh UIDs, `qcnode serve` as a
subprocess, DCMTK storescu/echoscu, and a destination SCP that collects what it receives."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import pydicom
from pydicom.uid import generate_uid

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"


def checkpoint_for_tests(tmp_path: Path) -> Path:
    """The shipped default checkpoint if present, else an untrained one written for the test."""
    default = PROJECT_ROOT / "models" / "mdiqa-default.pt"
    if default.is_file():
        return default
    from qcnode.model.scorer import write_untrained_checkpoint
    path = tmp_path / "m.pt"
    if not path.exists():
        write_untrained_checkpoint(path)
    return path


def write_config(tmp_path: Path, port: int, *, destinations: Iterable[dict[str, Any]] = (),
                 checkpoint: Path | str | None = None, db_url: str | None = None,
                 extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """A config.toml in ``tmp_path`` for a test node on 127.0.0.1:``port`` (fast timings)."""
    sections: dict[str, dict[str, Any]] = {
        "node": {"ae_title": "QCNODE", "host": "127.0.0.1", "port": port, "network_timeout": 20.0},
        "storage": {"database_url": db_url or "sqlite:///var/qcnode.db", "spool_dir": "var/spool",
                    "quarantine_dir": "var/quarantine", "min_free_disk_mb": 1},
        "series": {"stable_seconds": 1.5, "tracker_interval_seconds": 0.2},
        "model": {"checkpoint": str(checkpoint or "models/none.pt"), "batch_size": 8, "threads": 1},
        "worker": {"poll_interval_seconds": 0.2, "lease_seconds": 30.0},
        "outbox": {"poll_interval_seconds": 0.2, "backoff_initial_seconds": 0.5, "backoff_max_seconds": 2.0},
        "audit": {"enabled": False},
        "logging": {"level": "info", "file": "var/qcnode.log"},
    }
    for sec, values in (extra or {}).items():
        sections.setdefault(sec, {}).update(values)
    lines = []
    for sec, values in sections.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    for d in destinations:
        lines.append("[[destinations]]")
        lines += [f"{k} = {_toml(v)}" for k, v in d.items()]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def copy_series(src: Path, dst: Path, n: int | None = None, pattern: str = "*.dcm",
                study_uid: str | None = None) -> list[Path]:
    """Copy up to ``n`` files of ``src`` to ``dst`` with fresh study/series/SOP UIDs (one series)."""
    dst.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    out = []
    for f in sorted(src.glob(pattern))[:n]:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = dst / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def serve_process(config: Path, *args: str, log_path: Path | None = None,
                  process_group: bool = False) -> subprocess.Popen:
    """Start ``qcnode serve --config`` as a subprocess (stderr to ``log_path``); with
    ``process_group`` in a process group of its own (signalled as a whole, as systemd does)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    err = open(log_path or (config.parent / "serve.stderr"), "ab")
    return subprocess.Popen([sys.executable, "-m", "qcnode.cli", "serve", "--config", str(config), *args],
                            cwd=PROJECT_ROOT, env=env, stdout=err, stderr=err,
                            process_group=0 if process_group else None)


def qcnode_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ``qcnode ARGS`` (e.g. status, rescore) and return the finished process."""
    return subprocess.run([sys.executable, "-m", "qcnode.cli", *args], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, timeout=timeout)


def wait_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until something listens on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def kill9(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGKILL ``serve`` and wait until its child processes (which die with it) are gone too, so that a
    restart cannot meet the dying children's listening socket."""
    import psutil
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout)
    psutil.wait_procs(children, timeout=timeout)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Send ``sig`` to ``proc`` and wait for it to exit; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def storescu(port: int, files: Iterable[Path | str], aet: str = "STORESCU", *extra: str,
             timeout: float = 120.0) -> subprocess.CompletedProcess:
    """DCMTK storescu to 127.0.0.1:``port`` (called AE QCNODE); returns the finished process."""
    cmd = [STORESCU, "-aet", aet, "-aec", "QCNODE", "-nh", *extra, "127.0.0.1", str(port),
           *[str(f) for f in files]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def echoscu(port: int, aet: str = "ECHOSCU") -> subprocess.CompletedProcess:
    """DCMTK echoscu to 127.0.0.1:``port``."""
    return subprocess.run([ECHOSCU, "-aet", aet, "-aec", "QCNODE", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


class Destination:
    """A pynetdicom Storage SCP on 127.0.0.1 that keeps every received dataset (a test PACS)."""

    def __init__(self, port: int, ae_title: str = "DEST", delay_s: float = 0.0):
        """``delay_s``: how long each C-STORE takes here (a slow PACS)."""
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        self.port = port
        self.ae_title = ae_title
        self.delay_s = delay_s
        self.received: list[pydicom.Dataset] = []
        self._lock = threading.Lock()
        self._ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            self._ae.add_supported_context(cx.abstract_syntax, cx.transfer_syntax)
        self._handlers = [(evt.EVT_C_STORE, self._on_store)]
        self._server = None

    def _on_store(self, event: Any) -> int:
        if self.delay_s:
            time.sleep(self.delay_s)
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return 0x0000

    def start(self) -> "Destination":
        self._server = self._ae.start_server(("127.0.0.1", self.port), block=False,
                                             evt_handlers=self._handlers)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def config(self, send: list[str] | None = None) -> dict[str, Any]:
        return {"name": "testpacs", "ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port,
                "send": send or ["sr"]}

    def srs(self) -> list[pydicom.Dataset]:
        with self._lock:
            return [d for d in self.received if d.get("Modality") == "SR"]


def wait_for(predicate: Any, timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll ``predicate`` until truthy; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
