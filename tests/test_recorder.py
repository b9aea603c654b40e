"""Group commit of received instances (qcnode.ingest.recorder): batching, durability order, isolation
of a bad record, idempotent resends. Real SQLite database migrated with Alembic."""
from __future__ import annotations

import datetime as dt
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from qcnode.db.engine import make_engine, session_factory, upgrade
from qcnode.db.queue import as_utc
from qcnode.db.models import Instance, Series, Study, utcnow
from qcnode.ingest.recorder import InstanceRecorder, PendingInstance


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "q.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = make_engine(url)
    yield path, session_factory(engine)
    engine.dispose()


def _pending(study: str, series: str, sync_dir: Path | None = None, **instance) -> PendingInstance:
    sop = generate_uid()
    now = utcnow()
    values = {"sop_instance_uid": sop, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "spool_path": f"{sop}.dcm",
              "size_bytes": 10, "received_at": now, "scorable": True, **instance}
    return PendingInstance(study_uid=study, series_uid=series, sop_uid=sop, received_at=now, sync_dir=sync_dir,
                           study_values={"study_instance_uid": study},
                           series_values={"series_instance_uid": series, "status": "receiving", "version": 0,
                                          "instance_count": 0, "first_received_at": now, "last_received_at": now},
                           instance_values=values)


def _record_all(rec: InstanceRecorder, items: list[PendingInstance]) -> list[BaseException | None]:
    errors: list[BaseException | None] = [None] * len(items)

    def run(i: int) -> None:
        try:
            rec.record(items[i], timeout=60)
        except BaseException as exc:  # noqa: BLE001
            errors[i] = exc
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_records_queued_while_the_database_is_busy_share_one_transaction(db, tmp_path):
    path, sf = db
    rec = InstanceRecorder(sf)
    study, series = generate_uid(), generate_uid()
    first = _pending(study, series, sync_dir=tmp_path)
    blocker = sqlite3.connect(path, timeout=30)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    t = threading.Thread(target=rec.record, args=(first,))
    t.start()
    time.sleep(0.3)  # the writer is now waiting for the lock with the first record
    rest = [_pending(study, series, sync_dir=tmp_path) for _ in range(12)]
    waiter = threading.Thread(target=_record_all, args=(rec, rest))
    waiter.start()
    deadline = time.monotonic() + 30
    while rec._queue.qsize() < len(rest) and time.monotonic() < deadline:  # all queued behind the lock
        time.sleep(0.02)
    assert not first.future.done()  # nothing is acknowledged before its commit
    blocker.rollback()
    t.join(30)
    waiter.join(30)
    assert all(p.future.done() and p.future.exception() is None for p in [first, *rest])
    assert rec.batches == 2 and rec.records == 13  # the 12 queued meanwhile went in one transaction
    with sf() as s:
        assert s.scalar(select(func.count(Instance.id))) == 13
        assert s.scalar(select(Series.instance_count).where(Series.series_instance_uid == series)) == 13
        assert s.scalar(select(func.count(Study.id))) == 1
    rec.close()


def test_a_bad_record_fails_alone_and_a_missing_folder_fails_its_records(db, tmp_path):
    _, sf = db
    rec = InstanceRecorder(sf)
    study, series = generate_uid(), generate_uid()
    good = [_pending(study, series, sync_dir=tmp_path) for _ in range(5)]
    bad = _pending(study, series, sync_dir=tmp_path, spool_path=None)  # NOT NULL column
    gone = _pending(study, series, sync_dir=tmp_path / "missing")  # its folder cannot be fsynced
    errors = _record_all(rec, [*good, bad, gone])
    assert errors[:5] == [None] * 5
    assert errors[5] is not None and errors[6] is not None
    with sf() as s:
        stored = set(s.scalars(select(Instance.sop_instance_uid)))
    assert stored == {p.sop_uid for p in good}
    rec.close()


def test_identical_resend_changes_nothing_and_a_changed_one_updates_the_row(db, tmp_path):
    _, sf = db
    rec = InstanceRecorder(sf)
    study, series = generate_uid(), generate_uid()
    p = _pending(study, series, sync_dir=tmp_path)
    rec.record(p)
    with sf() as s:
        s.execute(Series.__table__.update().values(status="scored"))
        s.commit()
    again = _pending(study, series, sync_dir=tmp_path)
    again.sop_uid = p.sop_uid
    again.instance_values = {**p.instance_values, "size_bytes": 99}
    again.identical = True  # same bytes as the spooled file: the series is not reopened
    rec.record(again)
    with sf() as s:
        assert s.scalar(select(Series.status)) == "scored"
        assert s.scalar(select(Instance.size_bytes)) == 10
    again.identical = False
    again.future = type(again.future)()
    rec.record(again)
    with sf() as s:
        assert s.scalar(select(Series.status)) == "receiving"
        assert s.scalar(select(Instance.size_bytes)) == 99
        assert s.scalar(select(func.count(Instance.id))) == 1
    rec.close()


def test_writer_waits_briefly_for_the_c_stores_in_flight(db, tmp_path):
    """With two C-STOREs in flight, a record arriving 1 ms after the first joins its transaction;
    with nothing else in flight the first is committed at once."""
    _, sf = db
    in_flight = [2]
    rec = InstanceRecorder(sf, in_flight=lambda: in_flight[0], linger_s=0.5)
    study, series = generate_uid(), generate_uid()
    first, second = _pending(study, series, sync_dir=tmp_path), _pending(study, series, sync_dir=tmp_path)
    late = threading.Timer(0.05, lambda: rec.record(second, timeout=60))
    late.start()
    t0 = time.monotonic()
    rec.record(first, timeout=60)
    late.join()
    assert rec.batches == 1 and rec.records == 2
    assert time.monotonic() - t0 < 0.45  # released when the second arrived, not at the linger limit
    in_flight[0] = 1
    t0 = time.monotonic()
    rec.record(_pending(study, series, sync_dir=tmp_path), timeout=60)
    assert time.monotonic() - t0 < 0.45 and rec.batches == 2
    rec.close()


def test_sqlite_commits_are_power_loss_durable(db):
    """The embedded database fsyncs its WAL at each commit (synchronous=FULL): a recorded, acknowledged
    instance survives a power loss, not only a crash of the process."""
    from sqlalchemy import text
    _, sf = db
    with sf() as s:
        assert s.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_newest_arrival_never_moves_back(db, tmp_path):
    """Receiving processes commit in any order: a batch received earlier but committed later (e.g.
    after a lock wait) must not move the series' last arrival back, or the tracker would call the
    series quiet too early."""
    _, sf = db
    rec = InstanceRecorder(sf)
    study, series = generate_uid(), generate_uid()
    later = _pending(study, series, sync_dir=tmp_path)
    earlier = _pending(study, series, sync_dir=tmp_path)
    earlier.received_at = later.received_at - dt.timedelta(seconds=30)
    rec.record(later)
    rec.record(earlier)
    with sf() as s:
        assert as_utc(s.scalar(select(Series.last_received_at))) == later.received_at
        assert s.scalar(select(Series.instance_count)) == 2
    rec.close()
