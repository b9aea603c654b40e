"""Helpers for the reliability tests (faults, bad input, load, security, multi-node): an in-process
Storage SCP, quick generation of many slices with fresh UIDs, parsing DCMTK storescu's verbose
output for acknowledged files, and a resident-memory sampler for a process tree."""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pydicom
from pydicom.uid import generate_uid

from daemon_helpers import write_config


@dataclass
class InProcessNode:
    """A StorageSCP running in this process on a real socket, with its database session factory."""
    scp: Any
    sf: Callable[[], Any]
    cfg: Any
    engine: Any

    def stop(self) -> None:
        self.scp.stop(grace_seconds=2)
        self.engine.dispose()


def start_scp(tmp_path: Path, port: int, **sections: dict[str, Any]) -> InProcessNode:
    """Start ``StorageSCP`` on 127.0.0.1:``port`` with config overrides per section (node=..., storage=...)."""
    from qcnode.config import load_config
    from qcnode.db.engine import make_engine, session_factory
    from qcnode.ingest.scp import StorageSCP
    from qcnode.ingest.spool import Spool
    from qcnode.db.migrate import migrate

    cfg = load_config(write_config(tmp_path, port, extra=dict(sections)))
    migrate(cfg.database_url)
    engine = make_engine(cfg.database_url)
    sf = session_factory(engine)
    scp = StorageSCP(cfg, sf, Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir)))
    scp.start()
    return InProcessNode(scp, sf, cfg, engine)


def make_slices(sources: Iterable[Path], dst: Path, n: int, *, series_uid: str | None = None,
                study_uid: str | None = None, patient: tuple[str, str] | None = None) -> list[Path]:
    """Write ``n`` slices into ``dst`` (one series), cycling over ``sources`` with fresh SOP UIDs."""
    dst.mkdir(parents=True, exist_ok=True)
    templates = [pydicom.dcmread(p) for p in sources]
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    out = []
    for i in range(n):
        ds = templates[i % len(templates)]
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        if patient is not None:
            ds.PatientName, ds.PatientID = patient
        p = dst / f"{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.+)\)")


def acknowledged_files(storescu_verbose_output: str) -> list[str]:
    """Files that DCMTK ``storescu -v`` reports as answered with Success."""
    done, current = [], None
    for line in storescu_verbose_output.splitlines():
        m = _SENDING.search(line)
        if m:
            current = m.group(1).strip()
            continue
        m = _RESPONSE.search(line)
        if m and current is not None:
            if m.group(1).strip() == "Success":
                done.append(current)
            current = None
    return done


class RssSampler:
    """Samples the resident memory (MiB) of a process and its children every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.25):
        import psutil
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak_mb = 0.0
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs) / 2**20
            except psutil.Error:
                break
            self.samples.append(rss)
            self.peak_mb = max(self.peak_mb, rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)
