"""Reference for bench_ingest.py: how fast a bare pynetdicom Storage SCP takes the same load on this host.

The SCP writes ``event.encoded_dataset()`` to a file and answers Success: no fsync, no database,
no checks, one process (pynetdicom's own receive path, none of qcnode's). DCMTK's storescu sends
``--slices`` fresh copies of the shared 512x512 CT slices over ``--parallel`` associations, as
bench_ingest.py does. The host's speed varies between sessions by up to 2-3x, so compare qcnode's
ingest with this number measured in runs interleaved with it, not with figures from another day.
Usage:
    .venv/bin/python bench/bench_reference_scp.py [--slices 320] [--parallel 4] [--runs 1]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pynetdicom import AE, AllStoragePresentationContexts, evt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import SHARED_CT, free_port  # noqa: E402
from daemon_helpers import STORESCU, copy_series  # noqa: E402


def prepare(folder: Path, slices: int, parallel: int) -> list[list[Path]]:
    """``parallel`` groups of fresh-UID copies of the shared CT slices, ``slices`` in all."""
    groups: list[list[Path]] = [[] for _ in range(parallel)]
    per = -(-slices // parallel)
    for g, group in enumerate(groups):
        while len(group) < per:
            for name in ("ge_head", "philips_head_phantom"):
                group += copy_series(SHARED_CT / name, folder / f"g{g}_{len(group)}", n=per - len(group),
                                     pattern="I*.dcm" if "philips" in name else "*.dcm")
    return groups


def run_once(groups: list[list[Path]], out: Path) -> tuple[int, float, float]:
    """(slices stored, seconds, SCP CPU seconds) for one send of every group at once."""
    stored = [0]

    def on_store(event: evt.Event) -> int:
        with open(out / event.request.AffectedSOPInstanceUID, "wb") as f:
            f.write(event.encoded_dataset())
        stored[0] += 1
        return 0x0000

    ae = AE(ae_title="REFSCP")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.maximum_pdu_size = 0
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        cpu0, t0 = os.times(), time.perf_counter()
        senders = [subprocess.Popen([STORESCU, "-aec", "REFSCP", "127.0.0.1", str(port), *map(str, g)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for g in groups]
        rcs = [p.wait() for p in senders]
        dt, cpu1 = time.perf_counter() - t0, os.times()
    finally:
        server.shutdown()
    if any(rcs):
        print(f"warning: storescu exit codes {rcs}")
    return stored[0], dt, (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)


def describe(n: int, dt: float, cpu: float) -> str:
    """One line for a run of :func:`run_once`."""
    return (f"reference (bare pynetdicom, write only, no fsync or database): {n} slices in {dt:.2f} s "
            f"= {n / dt:.0f} slices/s; SCP CPU {cpu * 1000 / max(n, 1):.1f} ms/slice")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=320)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qcnode-refscp-") as td:
        tmp = Path(td)
        print(f"preparing {args.slices} slices of 512x512 with fresh UIDs ...", flush=True)
        groups = prepare(tmp / "src", args.slices, args.parallel)
        for i in range(args.runs):
            out = tmp / f"out{i}"
            out.mkdir()
            print(f"{describe(*run_once(groups, out))} ({args.parallel} associations)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
