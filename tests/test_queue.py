"""Durable queue and series tracker on SQLite and PostgreSQL: leases, retries, versions."""
from __future__ import annotations

import datetime as dt
import subprocess
import sys

from sqlalchemy import select, update

from qcnode.db.models import Job, Series, Study, utcnow
from qcnode.db.queue import (as_utc, claim_job, complete_job, enqueue_job, fail_job, make_owner,
                             release_dead_local_leases)
from qcnode.tracking.series import mark_stable_series, rescore_series, retry_delay, retry_failed_series


def _series(sf, uid="1.2.3.4", age_s=10.0) -> int:
    with sf() as s:
        study = Study(study_instance_uid="1.2.3")
        s.add(study)
        s.flush()
        ser = Series(series_instance_uid=uid, study_id=study.id, status="receiving",
                     last_received_at=utcnow() - dt.timedelta(seconds=age_s))
        s.add(ser)
        s.commit()
        return ser.id


def test_tracker_queues_one_job_per_version_and_reopens(sf):
    sid = _series(sf)
    assert mark_stable_series(sf, stable_seconds=5) == [(sid, 1)]
    assert mark_stable_series(sf, stable_seconds=5) == []  # no double queueing
    with sf() as s:
        assert s.get(Series, sid).status == "stable"
        assert [j.series_version for j in s.scalars(select(Job))] == [1]
        # a late instance reopens the series; it is not ready until quiet again
        s.execute(update(Series).where(Series.id == sid).values(status="receiving", last_received_at=utcnow()))
        s.commit()
    assert mark_stable_series(sf, stable_seconds=5) == []
    later = utcnow() + dt.timedelta(seconds=6)
    assert mark_stable_series(sf, stable_seconds=5, now=later) == [(sid, 2)]
    with sf() as s:
        assert sorted(j.series_version for j in s.scalars(select(Job))) == [1, 2]
        assert not enqueue_job(s, "score_series", sid, 2)  # unique (kind, series, version)
        s.commit()


def _expire_leases(sf) -> None:
    with sf() as s:
        s.execute(update(Job).values(lease_expires_at=utcnow() - dt.timedelta(seconds=1)))  # the worker died
        s.commit()


def test_lease_expiry_is_an_interruption_not_an_attempt(sf):
    sid = _series(sf)
    assert mark_stable_series(sf, stable_seconds=5) == [(sid, 1)]
    a, b = make_owner("a"), make_owner("b")
    with sf() as s:
        job = claim_job(s, a, lease_seconds=60, max_interruptions=2)
        s.commit()
        assert job is not None and job.status == "running" and job.attempts == 1 and job.lease_owner == a
    with sf() as s:
        assert claim_job(s, b, lease_seconds=60, max_interruptions=2) is None  # leased
    for n in (1, 2):
        _expire_leases(sf)
        with sf() as s:
            job = claim_job(s, b, lease_seconds=60, max_interruptions=2)
            s.commit()
            assert job.lease_owner == b and job.attempts == 1 and job.interruptions == n
    _expire_leases(sf)
    with sf() as s:  # third expiry > max_interruptions: gave up, the series is failed (an alert)
        assert claim_job(s, a, lease_seconds=60, max_interruptions=2) is None
        s.commit()
        job = s.scalars(select(Job)).one()
        assert job.status == "failed" and "lease expired" in job.last_error and job.attempts == 1
        series = s.get(Series, sid)
        assert series.status == "failed" and series.failures == 1


def test_failed_series_is_retried_with_back_off_and_rescored(sf):
    sid = _series(sf)
    mark_stable_series(sf, stable_seconds=5)
    owner = make_owner("w")
    for failures in (1, 2):
        with sf() as s:
            job_id = claim_job(s, owner, 60, 5).id
            s.commit()
        with sf() as s:
            assert fail_job(s, job_id, "boom", max_attempts=1, retry_delay_seconds=1) == "failed"
            s.commit()
        t0 = utcnow()
        assert retry_failed_series(sf, 100.0, now=t0) == []  # scheduled, not yet due
        with sf() as s:
            series = s.get(Series, sid)
            assert series.status == "failed" and series.failures == failures
            assert as_utc(series.retry_at) == t0 + dt.timedelta(seconds=retry_delay(failures, 100.0))
        assert retry_failed_series(sf, 100.0, now=as_utc(series.retry_at)) == [(sid, failures + 1)]
    assert retry_delay(2, 100.0) == 200.0 and retry_delay(40, 100.0) == 86400.0
    with sf() as s:
        assert s.get(Series, sid).status == "stable"
    assert retry_failed_series(sf, 0.0, now=utcnow() + dt.timedelta(days=9)) == []  # 0: rescore only
    assert rescore_series(sf, sid) == 4  # any series not receiving, e.g. after a model update
    with sf() as s:
        assert sorted(j.series_version for j in s.scalars(select(Job))) == [1, 2, 3, 4]


def test_fail_then_retry_then_complete(sf):
    sid = _series(sf)
    with sf() as s:
        enqueue_job(s, "score_series", sid, 1)
        s.commit()
    owner = make_owner("w")
    with sf() as s:
        job_id = claim_job(s, owner, 60, max_interruptions=3).id
        s.commit()
    with sf() as s:
        assert fail_job(s, job_id, "boom", max_attempts=3, retry_delay_seconds=3600) == "pending"
        s.commit()
    with sf() as s:
        assert claim_job(s, owner, 60, 3) is None  # not before the back-off
        s.execute(update(Job).values(not_before=utcnow()))
        s.commit()
    with sf() as s:
        job = claim_job(s, owner, 60, 3)
        s.commit()
        assert job.attempts == 2 and job.last_error == "boom"
        complete_job(s, job)
        s.commit()
    with sf() as s:
        assert s.scalars(select(Job)).one().status == "done"
        assert claim_job(s, owner, 60, 3) is None


def test_two_claimers_never_get_the_same_job(sf):
    sid = _series(sf)
    with sf() as s:
        for v in range(1, 5):
            enqueue_job(s, "score_series", sid, v)
        s.commit()
    got = []
    for i in range(5):
        with sf() as s:
            job = claim_job(s, make_owner(f"w{i}"), 60, 3)
            s.commit()
            got.append(job.id if job else None)
    assert sorted(x for x in got if x) == [1, 2, 3, 4] and got[-1] is None


def test_dead_local_lease_is_released(sf):
    sid = _series(sf)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    with sf() as s:
        enqueue_job(s, "score_series", sid, 1)
        s.commit()
    import socket
    with sf() as s:
        claim_job(s, f"{socket.gethostname()}:{dead}:worker:x", 3600, 3)
        s.commit()
    with sf() as s:
        assert claim_job(s, make_owner("w"), 60, 3) is None
        assert release_dead_local_leases(s, Job) == 1
        s.commit()
    with sf() as s:
        assert claim_job(s, make_owner("w"), 60, 3) is not None
