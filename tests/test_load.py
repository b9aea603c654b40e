"""Load: 8 concurrent DCMTK storescu associations x 300 real 512x512 CT slices (4 series of 75 each,
so the worker scores earlier series while later ones still arrive). Everything is stored, nothing is
refused, the worker scores alongside, and the resident memory of `qcnode serve` stays bounded."""
from __future__ import annotations

import os
import subprocess
import time

import pytest
from sqlalchemy import func, select

from daemon_helpers import (STORESCU, checkpoint_for_tests, serve_process, stop_process, wait_for, wait_port,
                            write_config)
from qcnode.config import load_config
from qcnode.db.engine import make_engine, session_factory
from qcnode.db.models import Instance, Job, QuarantineRecord, Series, SeriesResult
from reliability_helpers import RssSampler, make_slices

ASSOCIATIONS = int(os.environ.get("QCNODE_LOAD_ASSOCIATIONS", "8"))
SLICES = int(os.environ.get("QCNODE_LOAD_SLICES", "300"))
SERIES_PER_ASSOCIATION = 4
RSS_LIMIT_MB = 3072
SCORED_TO_WAIT_FOR = 6


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_concurrent_associations_under_load(tmp_path, port, shared_ct):
    sources = sorted((shared_ct / "ge_head").glob("*.dcm"))[:10]
    per_assoc = []
    for a in range(ASSOCIATIONS):
        files = []
        for k in range(SERIES_PER_ASSOCIATION):
            files += make_slices(sources, tmp_path / "in" / f"a{a}s{k}", SLICES // SERIES_PER_ASSOCIATION)
        per_assoc.append(files)
    total = sum(len(f) for f in per_assoc)
    cfg_path = write_config(tmp_path, port, checkpoint=checkpoint_for_tests(tmp_path),
                            extra={"node": {"max_associations": ASSOCIATIONS + 2},
                                   "series": {"stable_seconds": 2.0}})
    cfg = load_config(cfg_path)
    proc = serve_process(cfg_path)
    engine = None
    try:
        wait_port(port, 120, proc)
        # the load starts once the worker is warm (model loaded), as on a node that has been running;
        # at 2 cores and ~200 slices/s the whole load can otherwise be over before torch is imported
        log_file = tmp_path / "var" / "qcnode.log"
        wait_for(lambda: log_file.is_file() and '"model_loaded"' in log_file.read_text(), 180, interval=0.5,
                 what="the worker's model loaded")
        engine = make_engine(cfg.database_url)
        sf = session_factory(engine)
        with RssSampler(proc.pid) as rss:
            t0 = time.monotonic()
            senders = [subprocess.Popen([STORESCU, "-aet", f"MOD{i}", "-aec", "QCNODE", "-nh", "127.0.0.1", str(port),
                                         *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True) for i, files in enumerate(per_assoc)]
            busy_samples = 0  # polls during the load that found the worker scoring a series
            while any(p.poll() is None for p in senders) and time.monotonic() - t0 < 800:
                with sf() as s:
                    busy_samples += bool(s.scalar(select(func.count(Job.id)).where(Job.status == "running")))
                time.sleep(0.5)
            outputs = [s.communicate(timeout=60)[0] for s in senders]
            receive_s = time.monotonic() - t0
            with sf() as s:
                scored_during_receive = s.scalar(select(func.count(SeriesResult.id)))
            assert all(s.returncode == 0 for s in senders), [o[-500:] for o in outputs if o]
            assert not any("Failed" in o or "Error" in o or "Refused" in o for o in outputs)
            assert busy_samples > 0, "the worker never scored while the associations were sending"

            # the worker keeps scoring the backlog at its own pace (not awaited in full: ~10 slices/s on
            # 2 CPU cores); it must have scored during the load and go on without errors
            def some_scored():
                with sf() as s:
                    return s.scalar(select(func.count(SeriesResult.id))) >= SCORED_TO_WAIT_FOR
            wait_for(some_scored, 600, interval=1.0, what=f"{SCORED_TO_WAIT_FOR} series scored")
            total_s = time.monotonic() - t0
        n_series = ASSOCIATIONS * SERIES_PER_ASSOCIATION
        with sf() as s:
            assert s.scalar(select(func.count(Instance.id))) == total  # everything stored
            assert s.scalar(select(func.count(QuarantineRecord.id))) == 0  # nothing refused
            assert s.scalar(select(func.count(Series.id))) == n_series
            assert s.scalar(select(func.count(Job.id)).where(Job.status == "failed")) == 0
            n_scored = s.scalar(select(func.count(SeriesResult.id)))
            slices_scored = s.scalar(select(func.sum(SeriesResult.n_slices)))
        print(f"\nload: {ASSOCIATIONS} concurrent associations x {SLICES} slices = {total} slices received in "
              f"{receive_s:.1f}s ({total / receive_s:.1f} slices/s), the worker was scoring in {busy_samples} "
              f"polls (every 0.5 s) of the load and finished {scored_during_receive} series meanwhile; {n_scored} of {n_series} series ({slices_scored} slices) scored {total_s:.1f}s after "
              f"the start ({slices_scored / total_s:.1f} slices/s scored alongside receiving); "
              f"peak RSS of qcnode serve {rss.peak_mb:.0f} MiB")
        assert rss.peak_mb < RSS_LIMIT_MB
    finally:
        stop_process(proc)
        if engine is not None:
            engine.dispose()
