"""The scoring worker: claim a ``score_series`` job, score the series, store results, report.

Per job: load the scorable instances of the series from the spool in chunks, decode them to HU
(``qcnode.dicom.pixels.iter_slices``), score them with the MD-IQA model in batches, compute the
physics per slice (global noise level, water-equivalent diameter, SSDE), summarise the series
(``qcnode.scoring.summary``), and have the injected ``ResultPublisher`` build the SR (and KOS) from
an ``SRRequest`` (deterministic UIDs and content time, so a retry builds the same bytes). Then in
ONE transaction: lock the round (series ``stable`` -> ``scored``), write the files durably into
the spool, insert the slice scores and the series result, let the publisher add the outbox
deliveries, and mark the job done. A crash anywhere before that commit leaves the job leased; it
is retried after the lease (or at once after a restart on this host).

The worker knows nothing of SR or delivery: those stages come after scoring, and the service
wires them in (``qcnode.service.publish``).
"""
from __future__ import annotations

import datetime as dt
import traceback
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qcnode.config import Config
from qcnode.db.models import DoseReport, Instance, Job, Series, SeriesResult, SliceScore, Study
from qcnode.db.queue import (JOB_SCORE_SERIES, LeaseKeeper, LeaseLost, as_utc, backoff_seconds, claim_job,
                             complete_job, fail_job, make_owner, release_dead_local_leases)
from qcnode.db.states import SeriesState, superseded
from qcnode.dicom.pixels import CTSlice, SkipSlice, UnreadableFile, iter_slices, read_dataset
from qcnode.ingest.activity import Pacer, open_activity
from qcnode.ingest.spool import Spool
from qcnode.log import get_logger
from qcnode.scoring.summary import finite_mean, finite_median, summarise
from qcnode.scoring.types import (ModelIdentity, PreparedReport, ResultPublisher, SeriesPhysics, SeriesSummary,
                                  SliceResult, SRRequest)

log = get_logger("qcnode.scoring.worker")

CHUNK_INSTANCES = 32  # instances decoded at a time (bounds memory for long series)
JOB_RETRY_INITIAL_SECONDS = 2.0  # a failed job is retried after 2 s, doubling per attempt ...
JOB_RETRY_MAX_SECONDS = 300.0    # ... at most 5 minutes
NOTE_SUPERSEDED = "superseded: the series received new instances"
NOTE_STORED_BY_OTHER = "result already stored by another worker"


@dataclass
class _InstanceResult:
    """The scored slices (frames) of one instance."""
    instance_id: int
    sop_instance_uid: str
    ctdivol: float | None = None  # from the instance's header, as recorded
    slices: list[SliceResult] = field(default_factory=list)

    def slice_score(self, series_id: int, version: int, model_version: str) -> SliceScore:
        """The instance's ``slice_scores`` row: means over its frames (noise: median)."""
        sl = self.slices
        return SliceScore(instance_id=self.instance_id, series_id=series_id, series_version=version,
                          model_version=model_version, score=finite_mean(x.score for x in sl),
                          score_low=finite_mean(x.score_low for x in sl),
                          score_high=finite_mean(x.score_high for x in sl),
                          noise_hu=finite_median(x.noise_hu for x in sl), dw_cm=finite_mean(x.dw_cm for x in sl),
                          ssde_mgy=finite_mean(x.ssde_mgy for x in sl))


@dataclass(frozen=True)
class _Round:
    """One job's work, read before the slow part: a series at one version and its instances."""
    job_id: int
    series_id: int
    version: int
    study_uid: str
    series_uid: str
    protocol_name: str | None
    body_part: str | None
    created_at: dt.datetime  # the job's creation: the content time of its SR
    instances: Sequence[Any]  # rows (id, sop_instance_uid, spool_path, scorable, ctdivol_mgy)
    dlp_mgycm: float | None


@dataclass
class _Scored:
    """What scoring a round produced: instances with their slices, headers, newly skipped ones."""
    results: list[_InstanceResult] = field(default_factory=list)
    headers: list[Dataset] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)  # instance id -> reason
    phantom: str | None = None  # SSDE phantom, from the first readable instance


def _physics(hu: np.ndarray, spacing: tuple[float, float] | None, ctdivol: float | None,
             phantom: str) -> tuple[float | None, float | None, float | None]:
    """Noise level (HU), water-equivalent diameter (cm) and SSDE (mGy) of one slice; None where
    undefined (no soft tissue, no spacing, no CTDIvol). Physics is informative, never fatal."""
    from qcnode.dicom.physics import global_noise_level, ssde_mgy, water_equivalent_diameter_cm
    noise = dw = ssde = None
    try:
        noise = global_noise_level(hu, spacing)
        dw = water_equivalent_diameter_cm(hu, spacing) if spacing is not None else None
        if ctdivol is not None and dw is not None:
            ssde = float(ssde_mgy(ctdivol, dw, phantom))
    except (ValueError, ArithmeticError) as exc:
        log.warning("physics_failed", error=str(exc))
    return noise, dw, ssde


def series_physics(results: Sequence[_InstanceResult]) -> SeriesPhysics:
    """Series noise (median over slices), Dw, SSDE and CTDIvol (means): stored and put in the SR."""
    slices = [x for r in results for x in r.slices]
    return SeriesPhysics(noise_hu=finite_median(x.noise_hu for x in slices),
                         dw_cm=finite_mean(x.dw_cm for x in slices),
                         ssde_mgy=finite_mean(x.ssde_mgy for x in slices),
                         ctdivol_mgy=finite_mean(r.ctdivol for r in results))


def _dlp_for_series(session: Session, study_id: int, protocol: str | None) -> float | None:
    """DLP of the series from a dose SR of the same study (matching protocol, or a single event)."""
    report = session.scalars(select(DoseReport).where(DoseReport.study_id == study_id)
                             .order_by(DoseReport.received_at.desc())).first()
    if report is None:
        return None
    events = [e for e in (report.events or []) if isinstance(e, dict)]
    if protocol:
        matching = [e for e in events if str(e.get("protocol") or "").strip().lower() == protocol.strip().lower()]
        if len(matching) == 1:
            return matching[0].get("dlp_mgycm")
    if len(events) == 1:
        return events[0].get("dlp_mgycm")
    return None


class Worker:
    """Claims and runs scoring jobs; ``publisher`` reports each stored round (SR, KOS, deliveries).
    ``scorer`` may be injected (tests); else loaded from config."""

    def __init__(self, cfg: Config, session_factory: Callable[[], Session], spool: Spool,
                 publisher: ResultPublisher, owner: str | None = None, scorer: Any = None):
        self.cfg = cfg
        self.session_factory = session_factory
        self.spool = spool
        self.publisher = publisher
        self.owner = owner or make_owner("worker")
        self.scorer = scorer
        self.pacer = Pacer(open_activity(spool.root), cfg.worker.duty_while_receiving,
                           cfg.worker.receiving_window_seconds)

    def load_scorer(self) -> Any:
        """Load the checkpoint of ``model.checkpoint`` once (torch imported here, not at import), and
        warm the publisher up (what the first SR would otherwise wait for)."""
        if self.scorer is None:
            from qcnode.model.scorer import Scorer
            path = self.cfg.path(self.cfg.model.checkpoint)
            self.scorer = Scorer.load(str(path), self.cfg.model.device, self.cfg.model.threads)
            log.info("model_loaded", checkpoint=str(path), model_version=self.scorer.version)
            self.publisher.warm_up()
        return self.scorer

    # ---- loop ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Before the first job (``qcnode serve`` then calls ``run_once`` in a loop): release the
        leases of this host's dead workers and load the model."""
        with self.session_factory() as s:
            n = release_dead_local_leases(s, Job)
            s.commit()
        if n:
            log.info("released_dead_leases", jobs=n)
        self.load_scorer()

    def run_once(self) -> bool:
        """Claim and process one job; False when the queue had nothing due."""
        w = self.cfg.worker
        with self.session_factory() as s:
            job = claim_job(s, self.owner, w.lease_seconds, w.max_interruptions, kinds=(JOB_SCORE_SERIES,))
            s.commit()
            if job is None:
                return False
            job_id, attempts = job.id, job.attempts
        try:
            with LeaseKeeper(self.session_factory, Job, job_id, self.owner, w.lease_seconds) as lease:
                self.process(job_id, lease)
        except LeaseLost:  # another worker runs this job now: leave it alone
            log.warning("job_abandoned", job_id=job_id, attempt=attempts, reason="lease lost")
        except Exception as exc:  # noqa: BLE001 - recorded on the job; retried with back-off
            err = f"{type(exc).__name__}: {exc}"
            delay = backoff_seconds(attempts, JOB_RETRY_INITIAL_SECONDS, JOB_RETRY_MAX_SECONDS)
            with self.session_factory() as s:
                status = fail_job(s, job_id, err + "\n" + traceback.format_exc(limit=5), w.max_attempts,
                                  retry_delay_seconds=delay, owner=self.owner)
                s.commit()
            log.error("job_failed", job_id=job_id, attempt=attempts, status=status, error=err)
        return True

    # ---- one job -------------------------------------------------------------------------------
    def process(self, job_id: int, lease: LeaseKeeper | None = None) -> None:
        """Score the series of ``job_id`` and commit its results (idempotent). ``lease`` (kept by
        the caller) is checked between chunks and before the results are stored."""
        rnd = self._open_round(job_id)
        if rnd is None:
            return
        scorable = [r for r in rnd.instances if r.scorable]
        log.info("job_started", job_id=job_id, series_id=rnd.series_id, version=rnd.version,
                 instances=len(rnd.instances), scorable=len(scorable))
        if not scorable:
            self._finish_without_result(rnd, "no scorable instances")
            return
        scored = self._score(rnd, scorable, lease)
        if not scored.results:
            self._finish_without_result(rnd, "no slice could be scored", scored.skipped)
            return
        if lease is not None:
            lease.check()
        n_skipped = len(rnd.instances) - len(scorable) + len(scored.skipped)
        self._store(rnd, scored, n_skipped)

    def _open_round(self, job_id: int) -> _Round | None:
        """Read the job's series and instances; None (job completed) when its result is already
        stored or the round is superseded."""
        with self.session_factory() as s:
            job = s.get(Job, job_id)
            series = s.get(Series, job.series_id)
            version = job.series_version
            if s.scalar(select(SeriesResult.id).where(SeriesResult.series_id == series.id,
                                                      SeriesResult.version == version)) is not None:
                complete_job(s, job, note="result already stored")
                s.commit()
                return None
            if superseded(series.version, series.status, version):
                complete_job(s, job, note=NOTE_SUPERSEDED)
                s.commit()
                log.info("job_superseded", job_id=job_id, series_id=series.id, version=version)
                return None
            study = s.get(Study, series.study_id)
            rows = s.execute(select(Instance.id, Instance.sop_instance_uid, Instance.spool_path,
                                    Instance.scorable, Instance.ctdivol_mgy)
                             .where(Instance.series_id == series.id)
                             .order_by(Instance.instance_number, Instance.id)).all()
            rnd = _Round(job_id=job_id, series_id=series.id, version=version,
                         study_uid=study.study_instance_uid, series_uid=series.series_instance_uid,
                         protocol_name=series.protocol_name, body_part=series.body_part,
                         created_at=as_utc(job.created_at), instances=rows,
                         dlp_mgycm=_dlp_for_series(s, series.study_id, series.protocol_name))
            s.commit()
        return rnd

    def _score(self, rnd: _Round, scorable: Sequence[Any], lease: LeaseKeeper | None) -> _Scored:
        """Decode and score the scorable instances chunk by chunk; instances without a scored slice
        are left out of ``results``."""
        scorer = self.load_scorer()
        scored = _Scored()
        for start in range(0, len(scorable), CHUNK_INSTANCES):
            pending = self._read_chunk(rnd, scorable[start:start + CHUNK_INSTANCES], scored)
            if pending:
                self._score_slices(scorer, pending, scored.phantom or "body")
            if lease is not None:
                lease.check()
        scored.results = [r for r in scored.results if r.slices]
        return scored

    def _read_chunk(self, rnd: _Round, rows: Sequence[Any],
                    scored: _Scored) -> list[tuple[CTSlice, _InstanceResult]]:
        """Read and decode ``rows``; returns their slices to score. An instance that cannot be read
        is quarantined and recorded in ``scored.skipped``; the others' headers (pixels dropped)
        and results are added to ``scored``."""
        pending: list[tuple[CTSlice, _InstanceResult]] = []
        for row in rows:
            path = self.spool.abspath(row.spool_path)
            try:
                ds = read_dataset(path)
                slices = list(iter_slices(ds, str(path)))
                if not slices:
                    raise SkipSlice("no axial frames")
            except (SkipSlice, UnreadableFile) as exc:
                reason = getattr(exc, "reason", None) or str(exc)
                scored.skipped[row.id] = reason[:256]
                self.spool.quarantine_file(path, f"worker could not score: {reason}",
                                           {"sop_instance_uid": row.sop_instance_uid, "stage": "worker"})
                log.warning("slice_skipped", sop_instance_uid=row.sop_instance_uid, reason=reason)
                continue
            if scored.phantom is None:
                from qcnode.dicom.dose import ssde_phantom
                scored.phantom = ssde_phantom(rnd.protocol_name, rnd.body_part, ds)
            res = _InstanceResult(row.id, row.sop_instance_uid, ctdivol=row.ctdivol_mgy)
            pending += [(sl, res) for sl in slices]
            if "PixelData" in ds:
                del ds.PixelData
            scored.headers.append(ds)
            scored.results.append(res)
            self.pacer.pace()
        return pending

    def _score_slices(self, scorer: Any, pending: Sequence[tuple[CTSlice, _InstanceResult]], phantom: str) -> None:
        """Score the slices in batches and add each, with its physics, to its instance."""
        qualities = scorer.score_hu([sl.hu for sl, _ in pending], self.cfg.model.batch_size,
                                    between_batches=self.pacer.pace)
        for (sl, res), q in zip(pending, qualities):
            noise, dw, ssde = _physics(sl.hu, sl.pixel_spacing_mm, res.ctdivol, phantom)
            res.slices.append(SliceResult(
                sop_instance_uid=res.sop_instance_uid, score=float(q.score), score_low=float(q.score_low),
                score_high=float(q.score_high), frame=None if sl.frame is None else int(sl.frame) + 1,
                noise_hu=noise, dw_cm=dw, ssde_mgy=ssde))
            self.pacer.pace()

    # ---- results -------------------------------------------------------------------------------
    def _summary(self, results: Sequence[_InstanceResult], n_skipped: int) -> SeriesSummary:
        v = self.cfg.verdict
        summary = summarise([x.score for r in results for x in r.slices], v.slice_threshold, v)
        return replace(summary, n_skipped=n_skipped, physics=series_physics(results))

    def _store(self, rnd: _Round, scored: _Scored, n_skipped: int) -> None:
        """Summarise, have the publisher build the report, then store everything in one transaction."""
        model = ModelIdentity.of(self.scorer)
        summary = self._summary(scored.results, n_skipped)
        prepared = self.publisher.prepare(SRRequest(
            series_id=rnd.series_id, study_uid=rnd.study_uid, series_uid=rnd.series_uid,
            result_version=rnd.version, headers=scored.headers,
            slices=[x for r in scored.results for x in r.slices], summary=summary, model=model,
            slice_threshold=self.cfg.verdict.slice_threshold, content_datetime=rnd.created_at))
        if self._commit_result(rnd, scored, summary, model, prepared):
            log.info("series_scored", job_id=rnd.job_id, series_id=rnd.series_id, version=rnd.version,
                     verdict=summary.verdict, mean_score=round(summary.mean_score, 3),
                     n_slices=summary.n_slices, n_skipped=n_skipped,
                     sr_sop_instance_uid=prepared.sr_sop_instance_uid)

    def _commit_result(self, rnd: _Round, scored: _Scored, summary: SeriesSummary, model: ModelIdentity,
                       prepared: PreparedReport) -> bool:
        """The result transaction; False (job completed, nothing stored) when the round was
        superseded meanwhile or another worker stored it first."""
        with self.session_factory() as s:
            job = s.get(Job, rnd.job_id)
            # first (it locks the series row): an instance that arrived while this round was being
            # scored has reopened the series, and the next round, not this one, gets delivered
            if s.execute(update(Series).where(Series.id == rnd.series_id, Series.version == rnd.version,
                                              Series.status == SeriesState.STABLE)
                         .values(status=SeriesState.SCORED)).rowcount != 1:
                s.rollback()
                self._complete_overtaken(s, rnd)
                return False
            for relpath, data in prepared.files:  # only the round that is stored writes its files
                self.spool.write(relpath, data)
            try:
                result = SeriesResult(series_id=rnd.series_id, version=rnd.version, model_version=model.version,
                                      **summary.flat(), dlp_mgycm=rnd.dlp_mgycm,
                                      sr_sop_instance_uid=prepared.sr_sop_instance_uid, sr_path=prepared.sr_path)
                s.add(result)
                s.flush()
                s.add_all(r.slice_score(rnd.series_id, rnd.version, model.version) for r in scored.results)
                self._mark_skipped(s, scored.skipped)
                self.publisher.enqueue(s, result)
                complete_job(s, job)
                s.commit()
            except IntegrityError:  # another worker stored this round first (our lease had expired)
                s.rollback()
                complete_job(s, s.get(Job, rnd.job_id), note=NOTE_STORED_BY_OTHER)
                s.commit()
                return False
        return True

    @staticmethod
    def _complete_overtaken(s: Session, rnd: _Round) -> None:
        """Complete the job of a round that lost its series lock: stored by another worker, or superseded."""
        stored = s.scalar(select(SeriesResult.id).where(SeriesResult.series_id == rnd.series_id,
                                                        SeriesResult.version == rnd.version))
        complete_job(s, s.get(Job, rnd.job_id), note=NOTE_STORED_BY_OTHER if stored else NOTE_SUPERSEDED)
        s.commit()
        if stored is None:
            log.info("job_superseded", job_id=rnd.job_id, series_id=rnd.series_id, version=rnd.version,
                     stage="after scoring")

    @staticmethod
    def _mark_skipped(s: Session, skipped: dict[int, str]) -> None:
        for instance_id, reason in skipped.items():
            s.execute(update(Instance).where(Instance.id == instance_id).values(scorable=False,
                                                                                   skip_reason=reason))

    def _finish_without_result(self, rnd: _Round, note: str, skipped: dict[int, str] | None = None) -> None:
        with self.session_factory() as s:
            self._mark_skipped(s, skipped or {})
            complete_job(s, s.get(Job, rnd.job_id), note=note)
            s.execute(update(Series).where(Series.id == rnd.series_id, Series.version == rnd.version,
                                           Series.status == SeriesState.STABLE).values(status=SeriesState.SKIPPED))
            s.commit()
        log.info("series_not_scored", job_id=rnd.job_id, series_id=rnd.series_id, version=rnd.version,
                 reason=note)
