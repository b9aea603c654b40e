"""Latency benchmark: a 100-slice CT series sent with DCMTK storescu; seconds from the last
acknowledged instance until the SR arrives at a test destination, against stable_seconds + 15 s
(CPU). Also prints the daemon's peak resident memory. Usage:
    .venv/bin/python bench/bench_latency.py [--slices 100] [--stable-seconds 10]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import SHARED_CT, free_port  # noqa: E402
from reliability_helpers import RssSampler  # noqa: E402
from daemon_helpers import (Destination, checkpoint_for_tests, serve_process, stop_process, storescu,  # noqa: E402
                            wait_for, wait_port, write_config)


def _series(dst: Path, n: int) -> list[Path]:
    import pydicom
    from pydicom.uid import generate_uid
    src = [p for p in sorted(SHARED_CT.glob("*/*.dcm")) if "localizer" not in p.name]
    study, series = generate_uid(), generate_uid()
    dst.mkdir(parents=True)
    out = []
    for i in range(n):
        ds = pydicom.dcmread(src[i % len(src)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        p = dst / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--stable-seconds", type=float, default=10.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qcnode-bench-") as td:
        tmp = Path(td)
        files = _series(tmp / "in", args.slices)
        dest = Destination(free_port()).start()
        port = free_port()
        cfg = write_config(tmp, port, destinations=[dest.config()], checkpoint=checkpoint_for_tests(tmp),
                           extra={"series": {"stable_seconds": args.stable_seconds, "tracker_interval_seconds": 1.0},
                                  "model": {"batch_size": 16, "threads": 0}, "logging": {"level": "warning"}})
        proc = serve_process(cfg)
        rss = RssSampler(proc.pid).__enter__()
        try:
            wait_port(port, 120, proc)
            time.sleep(3)  # let the worker load the model
            t0 = time.perf_counter()
            assert storescu(port, files).returncode == 0
            t_last = time.perf_counter()
            wait_for(lambda: dest.srs(), 600, what="the SR")
            t_sr = time.perf_counter()
            budget = args.stable_seconds + 15
            print(f"latency: {args.slices} slices sent in {t_last - t0:.2f} s; SR at the destination "
                  f"{t_sr - t_last:.2f} s after the last instance (target <= stable_seconds + 15 = {budget:.1f} s; "
                  f"scoring+delivery {t_sr - t_last - args.stable_seconds:.2f} s)")
            print(f"daemon peak RSS: {rss.peak_mb:.0f} MiB, all its processes (target <= 1536 MiB)")
        finally:
            rss.__exit__(None, None, None)
            stop_process(proc)
            dest.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
