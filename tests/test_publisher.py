"""The worker's hand-off to the stages after it: a typed ``SRRequest`` to an injected
``ResultPublisher``; the files it prepares are written only for a round that is stored, before
the result transaction commits, and the deliveries are added inside that transaction."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from qcnode.config import Config
from qcnode.db.engine import make_engine, session_factory, upgrade
from qcnode.db.models import Instance, Job, Series, SeriesResult, SliceScore, Study
from qcnode.db.queue import as_utc
from qcnode.db.states import JobState, SeriesState
from qcnode.ingest.spool import Spool
from qcnode.scoring.types import ModelIdentity, PreparedReport, SliceResult, SRRequest
from qcnode.scoring.worker import Worker

N = 3


class FakeScorer:
    """Scores slice i of a call 1.0 + i/2 (interval +-0.25); no model needed."""
    version = "fake-0123abcd"
    info = {"name": "fake", "sha256": "0123abcd" * 8}

    def score_hu(self, slices, batch_size=16, between_batches=None):
        return [SimpleNamespace(score=1.0 + i / 2, score_low=0.75 + i / 2, score_high=1.25 + i / 2)
                for i in range(len(slices))]


class RecordingPublisher:
    """Records the calls; ``on_prepare`` runs inside ``prepare`` (e.g. to supersede the round)."""

    def __init__(self, spool: Spool, on_prepare=None):
        self.spool, self.on_prepare, self.calls, self.request = spool, on_prepare, [], None
        self.files = (("sr/a/b/report.dcm", b"the SR"), ("sr/a/b/kos.dcm", b"the KOS"))
        self.on_disk_at_enqueue: list[bool] = []

    def warm_up(self) -> None:
        self.calls.append("warm_up")

    def prepare(self, request: SRRequest) -> PreparedReport:
        self.calls.append("prepare")
        self.request = request
        assert not any(self.spool.abspath(p).exists() for p, _ in self.files)  # nothing written yet
        if self.on_prepare is not None:
            self.on_prepare()
        return PreparedReport(sr_sop_instance_uid="1.2.3.4", sr_path=self.files[0][0], files=self.files)

    def enqueue(self, session, result) -> None:
        self.calls.append("enqueue")
        assert result.id is not None and result.sr_path == self.files[0][0]
        self.on_disk_at_enqueue = [self.spool.abspath(p).read_bytes() == data for p, data in self.files]


@pytest.fixture
def node(tmp_path, shared_ct):
    """A database holding one stable series of N GE slices in the spool, with its scoring job."""
    url = f"sqlite:///{tmp_path / 'qcnode.db'}"
    upgrade(url)
    cfg = Config()
    cfg.base_dir = tmp_path
    cfg.storage.database_url = url
    engine = make_engine(url)
    sf = session_factory(engine)
    spool = Spool(tmp_path / "spool", tmp_path / "quarantine")
    files = sorted((shared_ct / "ge_head").glob("*.dcm"))[:N]
    with sf() as s:
        study = Study(study_instance_uid="1.2.826.0.1.3680043.8.498.1")
        series = Series(series_instance_uid="1.2.826.0.1.3680043.8.498.2", study=study,
                        status=SeriesState.STABLE, version=1)
        s.add_all([study, series])
        s.flush()
        for i, f in enumerate(files):
            (spool.root / "in").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, spool.root / "in" / f.name)
            s.add(Instance(sop_instance_uid=f"1.2.826.0.1.3680043.8.498.3.{i}", series_id=series.id,
                           sop_class_uid="1.2.840.10008.5.1.4.1.1.2", instance_number=i + 1,
                           spool_path=f"in/{f.name}", ctdivol_mgy=40.0))
        s.add(Job(kind="score_series", series_id=series.id, series_version=1))
        s.commit()
    yield cfg, sf, spool
    engine.dispose()


def test_worker_hands_a_typed_request_and_stores_what_was_prepared(node):
    cfg, sf, spool = node
    publisher = RecordingPublisher(spool)
    worker = Worker(cfg, sf, spool, publisher, scorer=FakeScorer())
    assert worker.run_once()
    assert publisher.calls == ["prepare", "enqueue"]  # an injected scorer: no warm-up needed
    assert publisher.on_disk_at_enqueue == [True, True]  # written before the transaction commits

    req = publisher.request
    assert isinstance(req, SRRequest) and all(isinstance(x, SliceResult) for x in req.slices)
    assert [x.score for x in req.slices] == [1.0, 1.5, 2.0] and [x.frame for x in req.slices] == [None] * N
    assert req.model == ModelIdentity("fake", "fake-0123abcd", "0123abcd" * 8)
    assert (req.result_version, req.slice_threshold, len(req.headers)) == (1, cfg.verdict.slice_threshold, N)
    assert req.summary.n_slices == N and req.summary.mean_score == pytest.approx(1.5)
    assert req.summary.physics.ctdivol_mgy == pytest.approx(40.0)
    assert all("PixelData" not in h for h in req.headers)
    with sf() as s:
        job = s.scalars(select(Job)).one()
        assert job.status == JobState.DONE and req.content_datetime == as_utc(job.created_at)
        result = s.scalars(select(SeriesResult)).one()
        assert (result.sr_sop_instance_uid, result.sr_path) == ("1.2.3.4", publisher.files[0][0])
        assert result.verdict == req.summary.verdict and result.model_version == "fake-0123abcd"
        assert len(s.scalars(select(SliceScore)).all()) == N
        assert s.scalars(select(Series)).one().status == SeriesState.SCORED


def test_a_round_superseded_while_preparing_writes_and_queues_nothing(node):
    cfg, sf, spool = node

    def late_instance():  # as the SCP does when an instance arrives
        with sf() as s:
            s.get(Series, 1).status = SeriesState.RECEIVING
            s.commit()
    publisher = RecordingPublisher(spool, on_prepare=late_instance)
    assert Worker(cfg, sf, spool, publisher, scorer=FakeScorer()).run_once()
    assert publisher.calls == ["prepare"]
    assert not any(spool.abspath(p).exists() for p, _ in publisher.files)
    with sf() as s:
        job = s.scalars(select(Job)).one()
        assert job.status == JobState.DONE and "superseded" in job.last_error
        assert s.scalars(select(SeriesResult)).all() == []
