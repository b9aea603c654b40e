"""Worker with the real scorer: results + SR + deliveries in one transaction, idempotent retry,
a slice that fails to decode is skipped with its reason and quarantined."""
from __future__ import annotations

import datetime as dt

import pydicom
import pytest
from sqlalchemy import func, select, update

from daemon_helpers import copy_series, write_config
from qcnode.ingest.activity import ACTIVITY_FILE, ReceiveActivity
from qcnode.config import load_config
from qcnode.db.engine import make_engine, session_factory, upgrade
from qcnode.db.models import Delivery, Instance, Job, Series, SeriesResult, SliceScore, utcnow
from qcnode.ingest.scp import StorageSCP
from qcnode.tracking.series import mark_stable_series
from qcnode.ingest.spool import Spool
from qcnode.report.read import read_series_sr
from qcnode.delivery.outbox import kos_relpath
from sr_helpers import dciodvfy
from qcnode.scoring.summary import summarise
from qcnode.scoring.worker import Worker
from qcnode.service.publish import ReportPublisher
from daemon_helpers import checkpoint_for_tests, storescu


def test_summary_and_verdicts():
    cfg = load_config()
    v = cfg.verdict
    assert summarise([3.0, 3.2, 3.5], v.slice_threshold, v).verdict == "PASS"
    assert summarise([3.0, 1.0, 3.5, 3.0], v.slice_threshold, v).verdict == "WARN"  # 25% low
    s = summarise([1.0, 1.2, 1.4], v.slice_threshold, v)
    assert s.verdict == "FAIL" and s.fraction_below == 1.0 and s.min_score == 1.0


@pytest.mark.timeout(300)
def test_worker_scores_series_once(tmp_path, port, shared_ct):
    import torch
    torch.set_num_threads(1)
    cfg = load_config(write_config(tmp_path, port, checkpoint=checkpoint_for_tests(tmp_path),
                                   destinations=[{"name": "pacs", "ae_title": "PACS", "port": 1, "send": ["sr"]},
                                                 {"name": "viewer", "ae_title": "VIEWER", "port": 1,
                                                  "send": ["kos:WARN", "kos:FAIL"]}]))
    upgrade(cfg.database_url)
    engine = make_engine(cfg.database_url)
    sf = session_factory(engine)
    spool = Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir))
    scp = StorageSCP(cfg, sf, spool)
    scp.start()
    try:
        files = copy_series(shared_ct / "ge_head", tmp_path / "in", n=4)
        assert storescu(port, files).returncode == 0
    finally:
        scp.stop(2)
    with sf() as s:  # damage one spooled slice after receipt: the worker must skip it
        bad = s.scalars(select(Instance).order_by(Instance.id)).first()
        path = spool.abspath(bad.spool_path)
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 2])
    assert mark_stable_series(sf, 1.5, now=utcnow() + dt.timedelta(seconds=5))
    worker = Worker(cfg, sf, spool, ReportPublisher(cfg))
    assert worker.run_once()
    assert not worker.run_once()
    with sf() as s:
        result = s.scalars(select(SeriesResult)).one()
        assert result.n_slices == 3 and result.n_skipped == 1 and result.verdict in {"PASS", "WARN", "FAIL"}
        assert s.scalar(select(func.count(SliceScore.id))) == 3
        assert s.get(Instance, bad.id).scorable is False and s.get(Instance, bad.id).skip_reason
        assert s.scalars(select(Series)).one().status == "scored"
        assert s.scalars(select(Job)).one().status == "done"
        flagged = result.verdict != "PASS"  # the viewer gets a Quality Issue KOS for WARN and FAIL
        assert s.scalar(select(func.count(Delivery.id))) == 1 + flagged
        series = s.scalars(select(Series)).one()
        kos_path = spool.abspath(kos_relpath(series.study.study_instance_uid, series.series_instance_uid,
                                             result.model_version, result.version))
        assert kos_path.exists() == flagged
        if flagged:
            dciodvfy(kos_path)
        dciodvfy(spool.abspath(result.sr_path))  # the SR with real physics values
        sr = pydicom.dcmread(spool.abspath(result.sr_path))
        parsed = read_series_sr(sr)
        assert len(parsed["slices"]) == 3 and parsed["summary"]["verdict"] == result.verdict
        sr_bytes = spool.abspath(result.sr_path).read_bytes()
        # a retried job (e.g. the lease expired after the commit) changes nothing
        s.execute(update(Job).values(status="pending", not_before=utcnow() - dt.timedelta(seconds=1)))
        s.commit()
    assert spool.quarantine_count() == 1
    assert worker.run_once()
    with sf() as s:
        assert s.scalar(select(func.count(SeriesResult.id))) == 1
        assert s.scalar(select(func.count(SliceScore.id))) == 3
        assert s.scalars(select(Job)).one().status == "done"
    # rebuilding the SR for the same round is byte-identical (deterministic UIDs and time)
    with sf() as s:
        s.execute(update(Job).values(status="pending"))
        s.execute(Delivery.__table__.delete())
        s.execute(SliceScore.__table__.delete())
        s.execute(SeriesResult.__table__.delete())
        s.execute(update(Series).values(status="stable"))
        s.commit()
    # ... also when it ran while the node was receiving: then it holds back (sleeps between slices)
    ReceiveActivity(spool.root / ACTIVITY_FILE).mark()
    worker.pacer.slept_s = 0.0
    assert worker.run_once()
    assert worker.pacer.slept_s > 0
    with sf() as s:
        assert spool.abspath(s.scalars(select(SeriesResult)).one().sr_path).read_bytes() == sr_bytes
    engine.dispose()


def test_worker_start_loads_highdicoms_tables(tmp_path, port):
    """The worker reads highdicom's tables of the standard (about a second) when it loads its model,
    so that the first series' SR does not wait for them."""
    from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
    cfg = load_config(write_config(tmp_path, port, checkpoint=checkpoint_for_tests(tmp_path)))
    tables = (get_sop_class_iod_map, get_iod_module_map, get_module_attribute_map)
    for table in tables:
        table.cache_clear()
    upgrade(cfg.database_url)
    worker = Worker(cfg, session_factory(make_engine(cfg.database_url)),
                    Spool(cfg.path(cfg.storage.spool_dir), cfg.path(cfg.storage.quarantine_dir)),
                    ReportPublisher(cfg))
    worker.load_scorer()
    assert [t.cache_info().currsize for t in tables] == [1, 1, 1]
