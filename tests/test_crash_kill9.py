"""Crash safety: `qcnode serve` is killed with SIGKILL at random moments (>= 20 times) while DCMTK
storescu sends and the worker scores and the outbox delivers. After each kill every instance that
storescu saw answered with Success is stored (database row + readable spool file); after the last
restart every acknowledged instance is scored exactly once per series version and each series
version has exactly one SR, delivered to the destination."""
from __future__ import annotations

import os
import random
import subprocess
import time
from collections import Counter

import psutil
import pydicom
import pytest
from sqlalchemy import func, select

from conftest import free_port
from daemon_helpers import (STORESCU, Destination, checkpoint_for_tests, serve_process, stop_process, storescu,
                            wait_for, wait_port, write_config)
from qcnode.config import load_config
from qcnode.db.engine import make_engine, session_factory
from qcnode.db.models import Delivery, Instance, Job, Series, SeriesResult, SliceScore
from qcnode.ingest.spool import Spool
from reliability_helpers import acknowledged_files, make_slices

KILLS = int(os.environ.get("QCNODE_KILLS", "20"))
SLICES_PER_ROUND = 8


def _job_running(sf) -> bool:
    with sf() as s:
        return bool(s.scalar(select(func.count(Job.id)).where(Job.status == "running")))


def _stage_at_kill(sf) -> str:
    """Which stage the dead process was in, judged from what it left behind."""
    with sf() as s:
        if s.scalar(select(func.count(Job.id)).where(Job.status == "running")):
            return "scoring"
        if s.scalar(select(func.count(Delivery.id)).where(Delivery.status == "sending")):
            return "delivering"
        if s.scalar(select(func.count(Series.id)).where(Series.status == "receiving")):
            return "receiving"
        return "idle/other"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill9_at_random_moments(tmp_path, port, shared_ct):
    rng = random.Random(6020)
    dest = Destination(free_port()).start()
    cfg_path = write_config(tmp_path, port, destinations=[dest.config()], checkpoint=checkpoint_for_tests(tmp_path),
                            extra={"series": {"stable_seconds": 1.0}, "worker": {"lease_seconds": 60.0}})
    cfg = load_config(cfg_path)
    spool = Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir))
    sources = sorted((shared_ct / "ge_head").glob("*.dcm"))[:SLICES_PER_ROUND]
    all_files: dict[str, str] = {}  # file -> SOP Instance UID
    pending: list[str] = []  # files not yet acknowledged (the PACS sends them again)
    acked: set[str] = set()
    stages: Counter[str] = Counter()
    interrupted = 0  # kills that cut an association short
    engine = None
    proc = None
    try:
        for round_no in range(KILLS):
            new = make_slices(sources, tmp_path / f"in{round_no:02d}", SLICES_PER_ROUND)
            for p in new:
                all_files[str(p)] = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            pending += [str(p) for p in new]
            proc = serve_process(cfg_path)
            wait_port(port, 120, proc)
            if engine is None:
                engine = make_engine(cfg.database_url)
                sf = session_factory(engine)
            sender = subprocess.Popen([STORESCU, "-v", "-aet", "PACS", "-aec", "QCNODE", "-nh", "127.0.0.1",
                                       str(port), *pending], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
            # a third of the kills land while storescu is still sending, a third while the worker is
            # scoring a series, the rest anywhere later (tracker, model loading, SR building, delivery)
            mode = rng.random()
            if mode < 0.35:
                time.sleep(rng.uniform(0.02, 0.6))
            elif mode < 0.7:
                try:
                    wait_for(lambda: _job_running(sf), 60, interval=0.02, what="a running job")
                except TimeoutError:
                    pass
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                time.sleep(rng.uniform(0.6, 7.0))
            children = psutil.Process(proc.pid).children(recursive=True)  # e.g. the worker process
            proc.kill()  # SIGKILL
            proc.wait(30)
            _, orphans = psutil.wait_procs(children, timeout=15)
            for o in orphans:
                o.kill()
            assert not orphans, f"round {round_no}: processes outlived the killed daemon: {orphans}"
            out, _ = sender.communicate(timeout=60)
            interrupted += sender.returncode != 0
            stages[_stage_at_kill(sf)] += 1
            ok = set(acknowledged_files(out))
            acked |= ok
            pending = [p for p in pending if p not in ok]
            # every acknowledged instance is stored: a database row and a complete spool file
            with sf() as s:
                rows = dict(s.execute(select(Instance.sop_instance_uid, Instance.spool_path)
                                      .where(Instance.sop_instance_uid.in_([all_files[p] for p in acked]))).all())
            missing = [all_files[p] for p in acked if all_files[p] not in rows]
            assert not missing, f"round {round_no}: acknowledged but not stored: {missing[:3]}"
            for p in ok:
                stored = pydicom.dcmread(spool.abspath(rows[all_files[p]]), force=True)
                assert str(stored.SOPInstanceUID) == all_files[p]
                _ = stored.PixelData  # complete, not truncated
        assert stages["scoring"] >= 1, stages  # some kills really hit the worker mid-job
        # final restart: the PACS sends what was never acknowledged; everything settles
        proc = serve_process(cfg_path)
        wait_port(port, 120, proc)
        if pending:
            res = storescu(port, pending, "PACS")
            assert res.returncode == 0, res.stderr

        def settled():
            with sf() as s:
                busy = s.scalar(select(func.count(Job.id)).where(Job.status.in_(["pending", "running"])))
                undelivered = s.scalar(select(func.count(Delivery.id)).where(Delivery.status != "delivered"))
                unsettled = s.scalar(select(func.count(Series.id)).where(Series.status.in_(["receiving", "stable"])))
                return busy == 0 and undelivered == 0 and unsettled == 0
        wait_for(settled, 300, interval=0.5, what="all series scored and all SRs delivered")
        time.sleep(1.0)
        with sf() as s:
            uids = set(s.scalars(select(Instance.sop_instance_uid)))
            assert uids == set(all_files.values())  # nothing lost, nothing extra
            # each series: exactly one result (one SR) per version, the last one for the current version
            per_version = Counter(s.execute(select(SeriesResult.series_id, SeriesResult.version)).all())
            assert per_version and max(per_version.values()) == 1
            for series in s.scalars(select(Series)):
                versions = [v for (sid, v) in per_version if sid == series.id]
                assert series.status == "scored" and max(versions) == series.version, series.id
            # every scorable instance scored exactly once at its series' current version
            current = select(Series.id, Series.version).subquery()
            scored = Counter(s.execute(
                select(SliceScore.instance_id).join(current, (current.c.id == SliceScore.series_id)
                                                    & (current.c.version == SliceScore.series_version))).scalars())
            scorable = set(s.scalars(select(Instance.id).where(Instance.scorable.is_(True))))
            assert set(scored) == scorable and max(scored.values()) == 1
            dup_slice_scores = s.scalar(select(func.count()).select_from(
                select(SliceScore.instance_id, SliceScore.series_version)
                .group_by(SliceScore.instance_id, SliceScore.series_version)
                .having(func.count() > 1).subquery()))
            assert dup_slice_scores == 0
            sr_uids = set(s.scalars(select(SeriesResult.sr_sop_instance_uid)))
            n_results = len(per_version)
            n_series = s.scalar(select(func.count(Series.id)))
        received = Counter(str(d.SOPInstanceUID) for d in dest.srs())
        assert set(received) == sr_uids and len(sr_uids) == n_results  # one SR per series version, all delivered
        resent = sum(c - 1 for c in received.values())
        print(f"\nkill -9: {KILLS} kills survived ({interrupted} mid-association; state left: {dict(stages)}); "
              f"{len(all_files)} instances "
              f"({len(acked)} acknowledged during the killed runs, the rest after), {n_series} series, {n_results} series versions scored, "
              f"{len(sr_uids)} distinct SRs delivered ({resent} re-sent after a kill between send and commit, "
              f"same SOP Instance UID)")
    finally:
        if proc is not None:
            stop_process(proc)
        dest.stop()
        if engine is not None:
            engine.dispose()
