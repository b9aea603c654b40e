"""kill -9 during ingest and during scoring, restart: every acknowledged instance is scored and each
series' SR is delivered exactly once."""
from __future__ import annotations

import subprocess
import time

import pytest
from sqlalchemy import func, select

from conftest import free_port
from daemon_helpers import (STORESCU, Destination, checkpoint_for_tests, kill9, serve_process, stop_process,
                            storescu, wait_for, wait_port, write_config)
from qcnode.config import load_config
from qcnode.db.engine import make_engine, session_factory
from qcnode.db.models import Instance, Job, SeriesResult, SliceScore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _setup(tmp_path, port):
    dest = Destination(free_port()).start()
    cfg_path = write_config(tmp_path, port, destinations=[dest.config()], checkpoint=checkpoint_for_tests(tmp_path),
                            extra={"series": {"stable_seconds": 2.0}})
    cfg = load_config(cfg_path)
    return dest, cfg_path, cfg


def _check_exactly_once(sf, dest, n_scored_series: int) -> None:
    def settled():
        with sf() as s:
            open_jobs = s.scalar(select(func.count(Job.id)).where(Job.status.in_(["pending", "running"])))
            return open_jobs == 0 and len(dest.srs()) >= n_scored_series
    wait_for(settled, 300, what="all jobs done and SRs delivered")
    time.sleep(1.0)  # nothing more may arrive
    with sf() as s:
        scorable = s.scalars(select(Instance.id).where(Instance.scorable.is_(True))).all()
        scored = set(s.scalars(select(SliceScore.instance_id)).all())
        assert set(scorable) <= scored
        assert s.scalar(select(func.count(SeriesResult.id))) == n_scored_series
    uids = [str(d.SOPInstanceUID) for d in dest.srs()]
    assert len(uids) == n_scored_series == len(set(uids))


def test_kill_during_ingest(tmp_path, port, shared_ct):
    dest, cfg_path, cfg = _setup(tmp_path, port)
    files = sorted(shared_ct.glob("*/*.dcm"))
    proc = serve_process(cfg_path)
    engine = None
    try:
        wait_port(port, 120, proc)
        engine = make_engine(cfg.database_url)
        sf = session_factory(engine)
        sender = subprocess.Popen([STORESCU, "-aet", "PACS", "-aec", "QCNODE", "127.0.0.1", str(port),
                                   *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def some_stored():
            with sf() as s:
                return s.scalar(select(func.count(Instance.id))) >= 10
        wait_for(some_stored, 60, interval=0.02, what="10 stored instances")
        kill9(proc)
        sender.wait(60)
        with sf() as s:
            acknowledged_before = s.scalar(select(func.count(Instance.id)))
        assert acknowledged_before < len(files)  # the kill really interrupted the ingest
        proc = serve_process(cfg_path)  # restart; the PACS sends again what was not acknowledged (all)
        wait_port(port, 120, proc)
        assert storescu(port, files, "PACS").returncode == 0
        _check_exactly_once(sf, dest, 2)
        with sf() as s:
            assert s.scalar(select(func.count(Instance.id))) == len(files)
    finally:
        stop_process(proc)
        dest.stop()
        if engine is not None:
            engine.dispose()


def test_kill_during_scoring(tmp_path, port, shared_ct):
    dest, cfg_path, cfg = _setup(tmp_path, port)
    files = sorted(shared_ct.glob("*/*.dcm"))
    proc = serve_process(cfg_path)
    engine = None
    try:
        wait_port(port, 120, proc)
        engine = make_engine(cfg.database_url)
        sf = session_factory(engine)
        assert storescu(port, files, "PACS").returncode == 0

        def a_job_running():
            with sf() as s:
                return s.scalar(select(func.count(Job.id)).where(Job.status == "running"))
        wait_for(a_job_running, 120, interval=0.02, what="a running scoring job")
        kill9(proc)
        with sf() as s:
            assert s.scalar(select(func.count(Job.id)).where(Job.status == "running")) >= 1
            before = s.scalar(select(func.count(SeriesResult.id)))
        assert before < 2
        proc = serve_process(cfg_path)  # restart: the dead worker's lease is released at once
        _check_exactly_once(sf, dest, 2)
    finally:
        stop_process(proc)
        dest.stop()
        if engine is not None:
            engine.dispose()
