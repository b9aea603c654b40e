"""Scoring rounds overtaken by new instances, and leases kept or lost while work runs.

Real pieces throughout: the in-process SCP fed by DCMTK's storescu, SQLite with the migrations,
the real scorer (the shipped checkpoint), the outbox's C-STORE SCU and a pynetdicom destination.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time

import pytest
from sqlalchemy import select, update

from conftest import free_port
from daemon_helpers import Destination, checkpoint_for_tests, copy_series, storescu, write_config
from qcnode.config import load_config
from qcnode.db.engine import make_engine, session_factory, upgrade
from qcnode.db.models import Delivery, Job, Series, SeriesResult, utcnow
from qcnode.db.queue import (LeaseKeeper, LeaseLost, as_utc, claim_job, fail_job, make_owner,
                             release_dead_local_leases)
from qcnode.ingest.scp import StorageSCP
from qcnode.tracking.series import mark_stable_series
from qcnode.ingest.spool import Spool
from qcnode.report.read import read_series_sr
from qcnode.model.scorer import Scorer
from qcnode.delivery.outbox import OutboxSender
from qcnode.scoring.worker import Worker
from qcnode.service.publish import ReportPublisher


class _ScorerWithHook:
    """The real scorer; ``hook`` (once) runs just before the first batch is scored."""

    def __init__(self, scorer: Scorer):
        self.scorer, self.version, self.info, self.hook = scorer, scorer.version, scorer.info, None

    def score_hu(self, *args, **kwargs):
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return self.scorer.score_hu(*args, **kwargs)


@pytest.fixture
def node(tmp_path, shared_ct):
    """An SCP, its database and spool, a destination taking SRs and FAIL series, 4 GE slices."""
    port = free_port()
    dest = Destination(free_port()).start()
    ckpt = checkpoint_for_tests(tmp_path)
    cfg = load_config(write_config(tmp_path, port, checkpoint=ckpt,
                                   destinations=[dest.config(["sr", "series:FAIL"])]))
    upgrade(cfg.database_url)
    sf = session_factory(make_engine(cfg.database_url))
    spool = Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir))
    scp = StorageSCP(cfg, sf, spool)
    scp.start()
    files = copy_series(shared_ct / "ge_head", tmp_path / "in", n=4)
    scorer = _ScorerWithHook(Scorer.load(str(ckpt), "cpu", 2))
    yield {"cfg": cfg, "sf": sf, "spool": spool, "port": port, "dest": dest, "files": files, "scorer": scorer}
    scp.stop(2)
    dest.stop()


def _stable(sf):
    return mark_stable_series(sf, 0.0, now=utcnow() + dt.timedelta(seconds=5))


def _send_all(cfg, sf):
    sender = OutboxSender(cfg, sf, "outbox-test")
    while sender.run_once():
        pass


def test_instance_arriving_while_scoring_supersedes_that_round(node):
    cfg, sf, files, dest = node["cfg"], node["sf"], node["files"], node["dest"]
    assert storescu(node["port"], files[:3]).returncode == 0
    assert _stable(sf) == [(1, 1)]
    cfg.verdict.fail_mean_below = 4.1  # round 1 would FAIL (and forward the series to the hold node)
    node["scorer"].hook = lambda: storescu(node["port"], files[3:])  # the 4th slice arrives meanwhile
    worker = Worker(cfg, sf, node["spool"], ReportPublisher(cfg), scorer=node["scorer"])
    assert worker.run_once()
    with sf() as s:
        series = s.scalars(select(Series)).one()
        assert (series.status, series.version, series.instance_count) == ("receiving", 1, 4)
        assert s.scalars(select(SeriesResult)).all() == []  # the overtaken round stored nothing
        assert s.scalars(select(Delivery)).all() == []
        job = s.scalars(select(Job)).one()
        assert job.status == "done" and "superseded" in job.last_error
    cfg.verdict.fail_mean_below, cfg.verdict.fail_fraction_below = -1.0, 1.1  # round 2 never FAILs
    assert _stable(sf) == [(1, 2)]
    assert worker.run_once()
    _send_all(cfg, sf)
    with sf() as s:
        result = s.scalars(select(SeriesResult)).one()
        assert (result.version, result.n_slices) == (2, 4) and result.verdict != "FAIL"
        assert [(d.kind, d.status) for d in s.scalars(select(Delivery))] == [("sr", "delivered")]
    assert len(dest.received) == 1  # one SR, no forwarded series
    sr = read_series_sr(dest.srs()[0])
    assert len(sr["slices"]) == 4 and int(dest.srs()[0].InstanceNumber) == 2


def test_pending_delivery_of_a_reopened_series_is_not_sent(node):
    cfg, sf, files, dest = node["cfg"], node["sf"], node["files"], node["dest"]
    assert storescu(node["port"], files[:3]).returncode == 0
    _stable(sf)
    cfg.verdict.fail_mean_below = 4.1
    assert Worker(cfg, sf, node["spool"], ReportPublisher(cfg), scorer=node["scorer"]).run_once()
    with sf() as s:
        assert {d.kind for d in s.scalars(select(Delivery))} == {"sr", "series"}
    assert storescu(node["port"], files[3:]).returncode == 0  # reopens the series before the outbox ran
    _send_all(cfg, sf)
    with sf() as s:
        assert {d.status for d in s.scalars(select(Delivery))} == {"superseded"}
    assert dest.received == []


def test_slow_send_keeps_its_lease_and_is_sent_once(node):
    """A send that takes longer than outbox.lease_seconds is not claimed and sent again by another
    sender: the lease is renewed while it runs."""
    cfg, sf, files = node["cfg"], node["sf"], node["files"]
    slow = Destination(free_port(), ae_title="SLOW", delay_s=0.8).start()
    try:
        cfg.destinations = [dataclasses.replace(cfg.destinations[0], ae_title="SLOW", port=slow.port, send=["sr"])]
        cfg.outbox.lease_seconds = 0.3
        assert storescu(node["port"], files[:2]).returncode == 0
        _stable(sf)
        assert Worker(cfg, sf, node["spool"], ReportPublisher(cfg), scorer=node["scorer"]).run_once()
        a, b = OutboxSender(cfg, sf, "sender-a"), OutboxSender(cfg, sf, "sender-b")
        first = threading.Thread(target=a.run_once)
        first.start()
        time.sleep(0.5)  # past the first lease: without renewal sender b would claim and resend it
        assert b.run_once() == 0
        first.join()
        with sf() as s:
            d = s.scalars(select(Delivery)).one()
            assert (d.status, d.attempts) == ("delivered", 1)
        assert len(slow.srs()) == 1
    finally:
        slow.stop()


def _claimed_job(sf, owner, lease_seconds):
    with sf() as s:
        s.add(Job(kind="score_series", series_id=1, series_version=1))
        s.commit()
    with sf() as s:
        job_id = claim_job(s, owner, lease_seconds, 5).id
        s.commit()
        return job_id


def test_lease_keeper_renews_and_reports_a_takeover(node):
    sf = node["sf"]
    assert storescu(node["port"], node["files"][:1]).returncode == 0  # series 1, for the job
    job_id = _claimed_job(sf, "worker-a", 0.3)
    with LeaseKeeper(sf, Job, job_id, "worker-a", 0.3) as lease:
        time.sleep(0.7)
        with sf() as s:
            assert claim_job(s, "worker-b", 0.3, 5) is None  # still held: renewed
        with sf() as s:  # now another owner takes it over (as after a long database outage)
            s.execute(update(Job).where(Job.id == job_id).values(lease_owner="worker-b"))
            s.commit()
        time.sleep(0.4)
        assert lease.lost
        with pytest.raises(LeaseLost):
            lease.check()


def test_fail_job_by_a_worker_that_lost_the_lease_changes_nothing(node):
    sf = node["sf"]
    assert storescu(node["port"], node["files"][:1]).returncode == 0
    job_id = _claimed_job(sf, "worker-a", 0.01)
    time.sleep(0.05)
    with sf() as s:  # a's lease expired: b claims the job
        assert claim_job(s, "worker-b", 60, 5).id == job_id
        s.commit()
    with sf() as s:
        assert fail_job(s, job_id, "a's late error", 5, 1.0, owner="worker-a") == "lease_lost"
        s.commit()
    with sf() as s:
        job = s.get(Job, job_id)
        assert (job.status, job.lease_owner, job.attempts, job.interruptions) == ("running", "worker-b", 1, 1)


def test_dead_lease_of_an_earlier_process_with_the_same_pid_is_released(node):
    """In a restarted container the new worker often gets the dead one's pid: its lease is still
    recognised as dead (the owner id carries the process start time), a live one is kept."""
    sf = node["sf"]
    assert storescu(node["port"], node["files"][:1]).returncode == 0
    live = make_owner("worker")
    host, pid, role, rand, started = live.split(":")
    earlier = ":".join([host, pid, role, "0000aaaa", str(int(started) - 3600 * 100)])
    dead_job, live_job = _claimed_job(sf, earlier, 300), None
    with sf() as s:
        s.add(Job(kind="score_series", series_id=1, series_version=2))
        s.commit()
    with sf() as s:
        live_job = claim_job(s, live, 300, 5).id
        s.commit()
    with sf() as s:
        assert release_dead_local_leases(s, Job) == 1
        s.commit()
    with sf() as s:
        assert as_utc(s.get(Job, dead_job).lease_expires_at) < utcnow()
        assert as_utc(s.get(Job, live_job).lease_expires_at) > utcnow()


# ---- clock skew between a node and the shared database ---------------------------------------

@pytest.mark.postgres
def test_clock_skew_to_the_database_server_is_measured_and_refused_over_half_a_lease(pg_url, monkeypatch):
    """Leases are stamped with each node's clock: a node whose clock is far off the shared
    PostgreSQL server's would take live leases (or keep dead ones), so ``serve`` refuses to start."""
    from qcnode.db import clock
    engine = make_engine(pg_url)
    try:
        skew = clock.check_clock(engine, lease_seconds=60)
        assert skew is not None and abs(skew) < 0.5  # same host: the same clock
        real_utcnow = clock.utcnow
        monkeypatch.setattr(clock, "utcnow", lambda: real_utcnow() - dt.timedelta(seconds=45))
        assert 44 < clock.database_clock_skew(engine) < 46  # this host 45 s behind the server
        with pytest.raises(clock.ClockSkewError, match=r"45\.\d s behind the database server's; leases of 60 s"):
            clock.check_clock(engine, lease_seconds=60)
        assert clock.check_clock(engine, lease_seconds=120) == pytest.approx(45, abs=1)  # within half: a warning
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_serve_refuses_to_start_with_a_skewed_clock(pg_url, tmp_path, monkeypatch, capsys):
    from qcnode import cli
    from qcnode.db import clock
    real_utcnow = clock.utcnow
    monkeypatch.setattr(clock, "utcnow", lambda: real_utcnow() + dt.timedelta(seconds=40))
    cfg = write_config(tmp_path, free_port(), db_url=pg_url, extra={"worker": {"lease_seconds": 30.0}})
    assert cli.main(["serve", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qcnode serve: this host's clock is 40.")
    assert "ahead of the database server's; leases of 30 s" in err[0]


def test_sqlite_has_no_clock_skew(tmp_path):
    from qcnode.db import clock
    engine = make_engine(f"sqlite:///{tmp_path / 'q.db'}")
    assert clock.check_clock(engine, lease_seconds=0.001) is None
    engine.dispose()
