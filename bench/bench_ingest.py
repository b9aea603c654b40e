"""Ingest benchmark: DCMTK storescu, 4 parallel associations, >= 300 CT slices of 512x512 into
`qcnode serve` (durable spool + SQLite), while the worker scores a series sent just before.
Prints slices/s acknowledged and the daemon's resident memory. Usage:
    .venv/bin/python bench/bench_ingest.py [--slices 320] [--parallel 4]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import SHARED_CT, free_port  # noqa: E402
from daemon_helpers import (STORESCU, checkpoint_for_tests, copy_series, serve_process, stop_process,  # noqa: E402
                            storescu, wait_port, write_config)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slices", type=int, default=320)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--no-worker", action="store_true", help="measure the receipt path alone")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qcnode-bench-") as td:
        tmp = Path(td)
        src = sorted(SHARED_CT.glob("*/*.dcm"))
        src = [p for p in src if "localizer" not in p.name]
        print(f"preparing {args.slices} slices of 512x512 with fresh UIDs ...", flush=True)
        groups: list[list[Path]] = [[] for _ in range(args.parallel)]
        per = -(-args.slices // args.parallel)
        for g in range(args.parallel):
            while len(groups[g]) < per:
                for folder in ("ge_head", "philips_head_phantom"):
                    groups[g] += copy_series(SHARED_CT / folder, tmp / f"g{g}_{len(groups[g])}",
                                             n=per - len(groups[g]), pattern="I*.dcm" if "philips" in folder
                                             else "*.dcm")
        warm = copy_series(SHARED_CT / "ge_head", tmp / "warm")
        port = free_port()
        cfg = write_config(tmp, port, checkpoint=checkpoint_for_tests(tmp),
                           extra={"series": {"stable_seconds": 0.5}, "logging": {"level": "warning"}})
        proc = serve_process(cfg, *(["--no-worker"] if args.no_worker else []))
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            p = psutil.Process(proc.pid)
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], p.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.1)
        threading.Thread(target=sample, daemon=True).start()
        try:
            wait_port(port, 120, proc)
            storescu(port, warm)  # the worker scores this series during the measured ingest
            time.sleep(1.0)
            total = sum(len(g) for g in groups)
            t0 = time.perf_counter()
            procs = [subprocess.Popen([STORESCU, "-aet", f"BENCH{i}", "-aec", "QCNODE", "127.0.0.1", str(port),
                                       *map(str, g)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                     for i, g in enumerate(groups)]
            rcs = [p.wait() for p in procs]
            dt = time.perf_counter() - t0
            print(f"ingest: {total} slices of 512x512 over {args.parallel} associations in {dt:.2f} s "
                  f"= {total / dt:.0f} slices/s acknowledged (storescu exit codes {rcs})")
            time.sleep(3)
            print(f"daemon peak RSS so far: {peak[0] / 2**20:.0f} MiB")
            out = subprocess.run([sys.executable, "-m", "qcnode.cli", "status", "--config", str(cfg)],
                                 capture_output=True, text=True, cwd=ROOT)
            print(out.stdout)
        finally:
            stop.set()
            stop_process(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
