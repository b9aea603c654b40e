"""Ingest benchmark: DCMTK storescu, 4 parallel associations, >= 300 CT slices of 512x512 into
`qcnode serve` (durable spool + SQLite), while the worker scores a series sent just before (the
ingest starts once a scoring job is running). Prints slices/s acknowledged, the CPU time the daemon
used per slice, its resident memory (all its processes) and the load average (the host is shared:
compare runs made under similar load). storescu runs with its defaults: it sends PDUs of
min(128 KiB, the node's node.max_pdu_size), its own -pdu option only sets what it receives. With
``--dashboard-refresh S`` serve's HTTP server is on (loopback, open) and a client loads the overview
and the series list every S seconds during the ingest, as a browser left open on the dashboard would
(its page times are printed). Usage:
    .venv/bin/python bench/bench_ingest.py [--slices 320] [--parallel 4] [--no-worker] [--reference]
                                           [--dashboard-refresh 1]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from bench_reference_scp import describe, prepare, run_once as run_reference  # noqa: E402 - same slices as the reference
from conftest import SHARED_CT, free_port  # noqa: E402
from daemon_helpers import (STORESCU, checkpoint_for_tests, copy_series, serve_process, stop_process,  # noqa: E402
                            storescu, wait_for, wait_port, write_config)


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def _cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for p in _tree(proc):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _cpu_by_role(proc: psutil.Process, port: int) -> dict[str, tuple[float, float]]:
    """(user, system) CPU seconds per kind of daemon process: SCP (listens on ``port``), worker, other."""
    out: dict[str, tuple[float, float]] = {}
    for p in _tree(proc):
        try:
            t = p.cpu_times()
            listens = any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                          for c in p.net_connections(kind="tcp"))
            role = "scp" if listens else ("worker" if p.memory_info().rss > 400 * 2**20 else "other")
        except psutil.Error:
            continue
        user, system = out.get(role, (0.0, 0.0))
        out[role] = (user + t.user, system + t.system)
    return out


def _associations_by_process(proc: psutil.Process, port: int) -> dict[int, int]:
    """Established connections on ``port`` per daemon process (which SCP process got which sender)."""
    out: dict[int, int] = {}
    for p in _tree(proc):
        try:
            n = sum(1 for c in p.net_connections(kind="tcp")
                    if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port)
        except psutil.Error:
            continue
        if n:
            out[p.pid] = n
    return out


def _rss(proc: psutil.Process) -> int:
    total = 0
    for p in _tree(proc):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} CPUs)"


def _host_cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole host since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def _jobs_running(cfg_path: Path) -> bool:
    from sqlalchemy import func, select
    from qcnode.config import load_config
    from qcnode.db.engine import make_engine
    from qcnode.db.models import Job
    engine = make_engine(load_config(cfg_path).database_url)
    try:
        with engine.connect() as conn:
            return bool(conn.scalar(select(func.count(Job.id)).where(Job.status == "running")))
    finally:
        engine.dispose()


def _refresh_pages(base: str, every: float, active: threading.Event, stop: threading.Event,
                   times: list[float]) -> None:
    """Load the overview and the series list every ``every`` seconds while ``active`` is set
    (each page load's seconds appended to ``times``)."""
    while not stop.is_set():
        if not active.wait(0.05):
            continue
        t_next = time.perf_counter() + every
        for path in ("/", "/series"):
            t0 = time.perf_counter()
            with urllib.request.urlopen(base + path, timeout=30) as r:
                r.read()
            times.append(time.perf_counter() - t0)
        stop.wait(max(0.0, t_next - time.perf_counter()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slices", type=int, default=320)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--no-worker", action="store_true", help="measure the receipt path alone")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint the worker scores with (default: shipped)")
    ap.add_argument("--scp-processes", type=int, default=None,
                    help="node.scp_processes for the run (default: config default)")
    ap.add_argument("--max-pdu", type=int, default=None, help="node.max_pdu_size for the run")
    ap.add_argument("--reference", action="store_true",
                    help="first send the same slices to a bare pynetdicom SCP (bench_reference_scp.py), "
                         "for a same-host comparison")
    ap.add_argument("--dashboard-refresh", type=float, default=0.0, metavar="S",
                    help="enable serve's HTTP server and load the overview and series list pages every S "
                         "seconds during the ingest (0: HTTP off)")
    args = ap.parse_args()
    if args.model is not None and not args.model.is_file():
        ap.error(f"--model: no such checkpoint: {args.model}")
    with tempfile.TemporaryDirectory(prefix="qcnode-bench-") as td:
        tmp = Path(td)
        print(f"preparing {args.slices} slices of 512x512 with fresh UIDs ...", flush=True)
        groups = prepare(tmp, args.slices, args.parallel)
        if args.reference:
            (tmp / "reference").mkdir()
            print(describe(*run_reference(groups, tmp / "reference")), flush=True)
        warm = copy_series(SHARED_CT / "ge_head", tmp / "warm")
        port = free_port()
        extra = {"series": {"stable_seconds": 0.5}, "logging": {"level": "warning"}}
        node = {"scp_processes": args.scp_processes, "max_pdu_size": args.max_pdu}
        extra["node"] = {k: v for k, v in node.items() if v is not None}
        web_port = free_port()
        if args.dashboard_refresh:
            extra["http"] = {"enabled": True, "host": "127.0.0.1", "port": web_port}
        cfg = write_config(tmp, port, checkpoint=args.model.resolve() if args.model else checkpoint_for_tests(tmp), extra=extra)
        proc = serve_process(cfg, *(["--no-worker"] if args.no_worker else []))
        peak = [0]
        spread: dict[int, int] = {}
        measuring = threading.Event()
        stop = threading.Event()
        daemon = psutil.Process(proc.pid)

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss(daemon))
                if measuring.is_set():
                    for pid, n in _associations_by_process(daemon, port).items():
                        spread[pid] = max(spread.get(pid, 0), n)
                time.sleep(0.1)
        threading.Thread(target=sample, daemon=True).start()
        page_times: list[float] = []
        if args.dashboard_refresh:
            threading.Thread(target=_refresh_pages, args=(f"http://127.0.0.1:{web_port}", args.dashboard_refresh,
                                                         measuring, stop, page_times), daemon=True).start()
        try:
            wait_port(port, 120, proc)
            if args.dashboard_refresh:
                wait_port(web_port, 60, proc)
            storescu(port, warm)  # the worker scores this series during the measured ingest
            if not args.no_worker:
                print("waiting for the worker to start scoring ...", flush=True)
                try:
                    wait_for(lambda: _jobs_running(cfg), 180, interval=0.1, what="a running scoring job")
                except TimeoutError as exc:
                    print(f"warning: {exc}; measuring anyway")
            else:
                time.sleep(1.0)
            total = sum(len(g) for g in groups)
            print(f"before: {_load()}")
            cpu0 = _cpu_seconds(daemon)
            host0 = _host_cpu_ticks()
            senders0 = os.times()
            roles0 = _cpu_by_role(daemon, port)
            measuring.set()
            t0 = time.perf_counter()
            procs = [subprocess.Popen([STORESCU, "-aet", f"BENCH{i}", "-aec", "QCNODE", "127.0.0.1", str(port),
                                       *map(str, g)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                     for i, g in enumerate(groups)]
            rcs = [p.wait() for p in procs]
            dt = time.perf_counter() - t0
            measuring.clear()
            cpu = _cpu_seconds(daemon) - cpu0
            host1 = _host_cpu_ticks()
            senders1 = os.times()
            host_busy = (host1[0] - host0[0]) / max(1, host1[1] - host0[1])
            senders_cpu = (senders1.children_user + senders1.children_system
                           - senders0.children_user - senders0.children_system)
            roles = {k: (u - roles0.get(k, (0.0, 0.0))[0], s - roles0.get(k, (0.0, 0.0))[1])
                     for k, (u, s) in _cpu_by_role(daemon, port).items()}
            scoring = "" if args.no_worker else f", worker scoring: {_jobs_running(cfg)}"
            print(f"ingest: {total} slices of 512x512 over {args.parallel} associations in {dt:.2f} s "
                  f"= {total / dt:.0f} slices/s acknowledged (storescu exit codes {rcs})")
            print(f"daemon CPU during the ingest: {cpu:.2f} s = {cpu * 1000 / total:.1f} ms/slice "
                  f"(all its processes{scoring}); by role: "
                  + ", ".join(f"{k} {u + s:.2f} s (user {u:.2f}, system {s:.2f})" for k, (u, s) in sorted(roles.items())))
            print(f"host CPU busy {host_busy:.0%} of {os.cpu_count()} cores during the ingest; "
                  f"the storescu senders used {senders_cpu:.2f} s")
            print(f"associations per receiving process (most seen at once): {sorted(spread.values())}")
            if args.dashboard_refresh:
                pages = sorted(page_times)
                print(f"dashboard: {len(pages)} page loads (overview + series list every {args.dashboard_refresh:g} s)"
                      + (f", median {statistics.median(pages) * 1000:.0f} ms, max {pages[-1] * 1000:.0f} ms"
                         if pages else ""))
            print(f"after:  {_load()}")
            time.sleep(3)
            print(f"daemon peak RSS so far: {peak[0] / 2**20:.0f} MiB (sum over its processes)")
            out = subprocess.run([sys.executable, "-m", "qcnode.cli", "status", "--config", str(cfg)],
                                 capture_output=True, text=True, cwd=ROOT)
            print(out.stdout)
        finally:
            stop.set()
            stop_process(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
