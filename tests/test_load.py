"""Load: 8 concurrent DCMTK storescu associations x 300 real 512x512 CT slices (3 series of 100 each,
so the worker scores earlier series while later ones still arrive). Everything is stored, nothing is
refused, every series is scored, and the resident memory of `qcnode serve` stays bounded."""
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
SERIES_PER_ASSOCIATION = 3
RSS_LIMIT_MB = 3072


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
        engine = make_engine(cfg.database_url)
        sf = session_factory(engine)
        with RssSampler(proc.pid) as rss:
            t0 = time.monotonic()
            senders = [subprocess.Popen([STORESCU, "-aet", f"MOD{i}", "-aec", "QCNODE", "-nh", "127.0.0.1", str(port),
                                         *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True) for i, files in enumerate(per_assoc)]
            outputs = [s.communicate(timeout=800)[0] for s in senders]
            receive_s = time.monotonic() - t0
            with sf() as s:
                scored_during_receive = s.scalar(select(func.count(SeriesResult.id)))
            assert all(s.returncode == 0 for s in senders), [o[-500:] for o in outputs if o]
            assert not any("Failed" in o or "Error" in o or "Refused" in o for o in outputs)

            def all_scored():
                with sf() as s:
                    open_jobs = s.scalar(select(func.count(Job.id)).where(Job.status.in_(["pending", "running"])))
                    open_series = s.scalar(select(func.count(Series.id)).where(
                        Series.status.in_(["receiving", "stable"])))
                    return open_jobs == 0 and open_series == 0
            wait_for(all_scored, 800, interval=1.0, what="every series scored")
            total_s = time.monotonic() - t0
        with sf() as s:
            assert s.scalar(select(func.count(Instance.id))) == total
            assert s.scalar(select(func.count(QuarantineRecord.id))) == 0
            n_series = ASSOCIATIONS * SERIES_PER_ASSOCIATION
            assert s.scalar(select(func.count(func.distinct(SeriesResult.series_id)))) == n_series
        print(f"\nload: {ASSOCIATIONS} concurrent associations x {SLICES} slices = {total} slices received in "
              f"{receive_s:.1f}s ({total / receive_s:.1f} slices/s), {scored_during_receive} series already scored "
              f"while receiving; all {n_series} series scored after {total_s:.1f}s ({total / total_s:.1f} slices/s "
              f"end to end); peak RSS of qcnode serve {rss.peak_mb:.0f} MiB")
        assert rss.peak_mb < RSS_LIMIT_MB
    finally:
        stop_process(proc)
        if engine is not None:
            engine.dispose()
