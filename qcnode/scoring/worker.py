"""The scoring worker: claim a ``score_series`` job, score the series, store results, queue the SR.

Per job: load the scorable instances of the series from the spool in chunks, decode them to HU
(``qcnode.dicom.pixels.iter_slices``), score them with the MD-IQA model in batches, compute the
physics per slice (global noise level, water-equivalent diameter, SSDE), summarise the series
(mean, min, 10th percentile, fraction below ``verdict.slice_threshold``, verdict), build the SR
(deterministic UIDs and content time, so a retry writes the same file), write it durably into
the spool, and then in ONE transaction insert the slice scores, the series result, the outbox
deliveries, mark the job done and the series scored. A crash anywhere before that commit leaves
the job leased; it is retried after the lease (or at once after a restart on this host).
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from qcnode.ingest.activity import Pacer, open_activity
from qcnode.config import Config, VerdictConfig
from qcnode.db.models import (DoseReport, Instance, Job, Series, SeriesResult, SliceScore, Study)
from qcnode.db.queue import (JOB_SCORE_SERIES, LeaseKeeper, LeaseLost, as_utc, claim_job, complete_job, fail_job,
                             make_owner, release_dead_local_leases)
from qcnode.dicom.pixels import SkipSlice, UnreadableFile, iter_slices, read_dataset
from qcnode.ingest.spool import Spool
from qcnode.log import get_logger

log = get_logger("qcnode.scoring.worker")

CHUNK_INSTANCES = 32  # instances decoded at a time (bounds memory for long series)


def verdict_for(mean_score: float, fraction_below: float, v: VerdictConfig) -> str:
    """PASS / WARN / FAIL from the series mean and the fraction of low-quality slices."""
    if mean_score < v.fail_mean_below or fraction_below > v.fail_fraction_below:
        return "FAIL"
    if mean_score < v.warn_mean_below or fraction_below > v.warn_fraction_below:
        return "WARN"
    return "PASS"


def summarise(scores: list[float], threshold: float, v: VerdictConfig) -> dict[str, Any]:
    """Series summary of per-slice scores: mean, min, p10, fraction below threshold, verdict."""
    arr = np.asarray(scores, dtype=float)
    mean, frac = float(arr.mean()), float((arr < threshold).mean())
    return {"mean_score": mean, "min_score": float(arr.min()), "p10_score": float(np.percentile(arr, 10)),
            "fraction_below": frac, "verdict": verdict_for(mean, frac, v), "n_slices": int(arr.size)}


@dataclass
class _InstanceResult:
    instance_id: int
    sop_instance_uid: str
    scores: list[tuple[float, float, float]] = field(default_factory=list)  # per frame
    noise: list[float] = field(default_factory=list)
    dw: list[float] = field(default_factory=list)
    ssde: list[float] = field(default_factory=list)
    frames: list[int | None] = field(default_factory=list)  # frame index per score (multi-frame objects)
    ctdivol: float | None = None  # from the instance's header, as recorded


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(vals)) if vals else None


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


def series_physics(results: list[_InstanceResult]) -> dict[str, float | None]:
    """Series noise (median over slices), Dw, SSDE and CTDIvol (means): stored and put in the SR."""
    return {"noise_hu": _median([x for r in results for x in r.noise]),
            "dw_cm": _mean([x for r in results for x in r.dw]),
            "ssde_mgy": _mean([x for r in results for x in r.ssde]),
            "ctdivol_mgy": _mean([r.ctdivol for r in results])}


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
    """Claims and runs scoring jobs. ``scorer`` may be injected (tests); else loaded from config."""

    def __init__(self, cfg: Config, session_factory: Callable[[], Session], spool: Spool,
                 owner: str | None = None, scorer: Any = None):
        self.cfg = cfg
        self.session_factory = session_factory
        self.spool = spool
        self.owner = owner or make_owner("worker")
        self.scorer = scorer
        self.pacer = Pacer(open_activity(spool.root), cfg.worker.duty_while_receiving,
                           cfg.worker.receiving_window_seconds)

    def load_scorer(self) -> Any:
        """Load the checkpoint of ``model.checkpoint`` once (torch imported here, not at import), and
        highdicom's tables of the standard for the SRs."""
        if self.scorer is None:
            from qcnode.report.sr import load_standard_tables
            from qcnode.model.scorer import Scorer
            path = self.cfg.path(self.cfg.model.checkpoint)
            self.scorer = Scorer.load(str(path), self.cfg.model.device, self.cfg.model.threads)
            log.info("model_loaded", checkpoint=str(path), model_version=self.scorer.version)
            load_standard_tables()  # what the first SR would otherwise wait for
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
            with self.session_factory() as s:
                status = fail_job(s, job_id, err + "\n" + traceback.format_exc(limit=5), w.max_attempts,
                                  retry_delay_seconds=min(2.0 ** min(attempts, 16), 300.0), owner=self.owner)
            log.error("job_failed", job_id=job_id, attempt=attempts, status=status, error=err)
        return True

    # ---- one job -------------------------------------------------------------------------------
    def process(self, job_id: int, lease: LeaseKeeper | None = None) -> None:
        """Score the series of ``job_id`` and commit its results (idempotent). ``lease`` (kept by
        the caller) is checked between chunks and before the results are stored."""
        with self.session_factory() as s:
            job = s.get(Job, job_id)
            series = s.get(Series, job.series_id)
            version = job.series_version
            if s.scalar(select(SeriesResult.id).where(SeriesResult.series_id == series.id,
                                                      SeriesResult.version == version)) is not None:
                complete_job(s, job, note="result already stored")
                s.commit()
                return
            if series.version != version or series.status == "receiving":
                complete_job(s, job, note="superseded: the series received new instances")
                s.commit()
                log.info("job_superseded", job_id=job_id, series_id=series.id, version=version)
                return
            study = s.get(Study, series.study_id)
            rows = s.execute(select(Instance.id, Instance.sop_instance_uid, Instance.spool_path,
                                    Instance.scorable, Instance.ctdivol_mgy)
                             .where(Instance.series_id == series.id)
                             .order_by(Instance.instance_number, Instance.id)).all()
            dlp = _dlp_for_series(s, series.study_id, series.protocol_name)
            ctx = {"series_id": series.id, "study_uid": study.study_instance_uid,
                   "series_uid": series.series_instance_uid, "protocol_name": series.protocol_name,
                   "body_part": series.body_part, "created_at": as_utc(job.created_at)}
            s.commit()
        scorable = [r for r in rows if r.scorable]
        n_skipped = len(rows) - len(scorable)
        log.info("job_started", job_id=job_id, series_id=ctx["series_id"], version=version,
                 instances=len(rows), scorable=len(scorable))
        if not scorable:
            self._finish_without_result(job_id, ctx["series_id"], version, "no scorable instances")
            return
        scorer = self.load_scorer()
        results: list[_InstanceResult] = []
        headers: list[Dataset] = []
        newly_skipped: dict[int, str] = {}
        phantom: str | None = None
        for start in range(0, len(scorable), CHUNK_INSTANCES):
            chunk = scorable[start:start + CHUNK_INSTANCES]
            hus, owners = [], []
            for row in chunk:
                path = self.spool.abspath(row.spool_path)
                try:
                    ds = read_dataset(path)
                    slices = list(iter_slices(ds, str(path)))
                    if not slices:
                        raise SkipSlice("no axial frames")
                except (SkipSlice, UnreadableFile) as exc:
                    reason = getattr(exc, "reason", None) or str(exc)
                    newly_skipped[row.id] = reason[:256]
                    self.spool.quarantine_file(path, f"worker could not score: {reason}",
                                               {"sop_instance_uid": row.sop_instance_uid, "stage": "worker"})
                    log.warning("slice_skipped", sop_instance_uid=row.sop_instance_uid, reason=reason)
                    continue
                if phantom is None:
                    from qcnode.dicom.dose import ssde_phantom
                    phantom = ssde_phantom(ctx["protocol_name"], ctx["body_part"], ds)
                res = _InstanceResult(row.id, row.sop_instance_uid, ctdivol=row.ctdivol_mgy)
                for sl in slices:
                    hus.append((sl, row.ctdivol_mgy))
                    owners.append((res, sl.frame))
                if "PixelData" in ds:
                    del ds.PixelData
                headers.append(ds)
                results.append(res)
                self.pacer.pace()
            if hus:
                qualities = scorer.score_hu([sl.hu for sl, _ in hus], self.cfg.model.batch_size,
                                            between_batches=self.pacer.pace)
                for (sl, ctdivol), (res, frame), q in zip(hus, owners, qualities):
                    res.scores.append((float(q.score), float(q.score_low), float(q.score_high)))
                    noise, dw, ssde = _physics(sl.hu, sl.pixel_spacing_mm, ctdivol, phantom or "body")
                    res.noise.append(noise)
                    res.dw.append(dw)
                    res.ssde.append(ssde)
                    res.frames.append(frame)
                    self.pacer.pace()
            if lease is not None:
                lease.check()
        n_skipped += len(newly_skipped)
        results = [r for r in results if r.scores]
        if not results:
            self._finish_without_result(job_id, ctx["series_id"], version, "no slice could be scored",
                                        newly_skipped)
            return
        if lease is not None:
            lease.check()
        self._store(job_id, version, ctx, scorer, results, headers, n_skipped, newly_skipped, dlp)

    def _slices_for_sr(self, results: list[_InstanceResult]) -> list[dict[str, Any]]:
        out = []
        for r in results:
            for (score, low, high), frame in zip(r.scores, r.frames):
                item = {"sop_instance_uid": r.sop_instance_uid, "score": score, "score_low": low,
                        "score_high": high}
                if frame is not None:
                    item["frame"] = int(frame) + 1
                out.append(item)
        return out

    def _store(self, job_id: int, version: int, ctx: dict[str, Any], scorer: Any,
               results: list[_InstanceResult], headers: list[Dataset], n_skipped: int,
               newly_skipped: dict[int, str], dlp: float | None) -> None:
        from qcnode.delivery import outbox
        from qcnode.report.sr import build_series_sr, sr_bytes

        v = self.cfg.verdict
        all_scores = [sc[0] for r in results for sc in r.scores]
        summary = summarise(all_scores, v.slice_threshold, v)
        summary["n_skipped"] = n_skipped
        physics = series_physics(results)
        summary.update(physics)
        model_version = str(scorer.version)[:64]
        model_info = {"name": str((getattr(scorer, "info", None) or {}).get("name") or "MD-IQA"),
                      "version": model_version}
        slices = self._slices_for_sr(results)
        sr = build_series_sr(headers, slices, summary, model_info, version, content_datetime=ctx["created_at"])
        sr_uid = str(sr.SOPInstanceUID)
        sr_rel = Spool.sr_relpath(ctx["study_uid"], ctx["series_uid"], sr_uid)
        kos = self._build_kos(ctx, headers, slices, model_info, version, summary["verdict"])
        with self.session_factory() as s:
            job = s.get(Job, job_id)
            # first (it locks the series row): an instance that arrived while this round was being
            # scored has reopened the series, and the next round, not this one, gets delivered
            if s.execute(update(Series).where(Series.id == ctx["series_id"], Series.version == version,
                                              Series.status == "stable").values(status="scored")).rowcount != 1:
                s.rollback()
                stored = s.scalar(select(SeriesResult.id).where(SeriesResult.series_id == ctx["series_id"],
                                                                SeriesResult.version == version))
                complete_job(s, s.get(Job, job_id), note="result already stored by another worker" if stored
                             else "superseded: the series received new instances")
                s.commit()
                if stored is None:
                    log.info("job_superseded", job_id=job_id, series_id=ctx["series_id"], version=version,
                             stage="after scoring")
                return
            self.spool.write(sr_rel, sr_bytes(sr))  # only the round that is stored writes its SR
            if kos is not None:
                self.spool.write(*kos)
            try:
                result = SeriesResult(
                    series_id=ctx["series_id"], version=version, model_version=model_version,
                    n_slices=summary["n_slices"], n_skipped=n_skipped, mean_score=summary["mean_score"],
                    min_score=summary["min_score"], p10_score=summary["p10_score"],
                    fraction_below=summary["fraction_below"], verdict=summary["verdict"],
                    **physics, dlp_mgycm=dlp, sr_sop_instance_uid=sr_uid, sr_path=sr_rel)
                s.add(result)
                s.flush()
                for r in results:
                    s.add(SliceScore(
                        instance_id=r.instance_id, series_id=ctx["series_id"], series_version=version,
                        model_version=model_version, score=_mean([x[0] for x in r.scores]),
                        score_low=_mean([x[1] for x in r.scores]), score_high=_mean([x[2] for x in r.scores]),
                        noise_hu=_median(r.noise), dw_cm=_mean(r.dw), ssde_mgy=_mean(r.ssde)))
                self._mark_skipped(s, newly_skipped)
                outbox.enqueue(s, result, self.cfg)
                complete_job(s, job)
                s.commit()
            except IntegrityError:  # another worker stored this round first (our lease had expired)
                s.rollback()
                job = s.get(Job, job_id)
                complete_job(s, job, note="result already stored by another worker")
                s.commit()
                return
        log.info("series_scored", job_id=job_id, series_id=ctx["series_id"], version=version,
                 verdict=summary["verdict"], mean_score=round(summary["mean_score"], 3),
                 n_slices=summary["n_slices"], n_skipped=n_skipped, sr_sop_instance_uid=sr_uid)

    def _build_kos(self, ctx: dict[str, Any], headers: list[Dataset], slices: list[dict[str, Any]],
                   model_info: dict[str, str], version: int, verdict: str) -> tuple[str, bytes] | None:
        """(spool path, bytes) of the Quality Issue KOS when a destination wants one, built before the
        result transaction; a KOS that cannot be built is logged and never costs the series its SR."""
        from qcnode.delivery import outbox
        from qcnode.report.kos import build_quality_issue_kos, failing_slices
        from qcnode.report.sr import sr_bytes
        if not outbox.wants_kind(self.cfg, verdict, outbox.KIND_KOS):
            return None
        threshold = self.cfg.verdict.slice_threshold
        try:
            kos = build_quality_issue_kos(headers, failing_slices(slices, threshold), model_info, version,
                                          threshold, content_datetime=ctx["created_at"])
        except Exception as exc:  # noqa: BLE001 - the KOS is optional; its delivery fails visibly instead
            log.error("kos_not_built", series_id=ctx["series_id"], version=version,
                      error=f"{type(exc).__name__}: {exc}"[:300])
            return None
        return (outbox.kos_relpath(ctx["study_uid"], ctx["series_uid"], model_info["version"], version),
                sr_bytes(kos))

    @staticmethod
    def _mark_skipped(s: Session, skipped: dict[int, str]) -> None:
        for instance_id, reason in skipped.items():
            s.execute(update(Instance).where(Instance.id == instance_id).values(scorable=False,
                                                                                   skip_reason=reason))

    def _finish_without_result(self, job_id: int, series_id: int, version: int, note: str,
                               skipped: dict[int, str] | None = None) -> None:
        with self.session_factory() as s:
            self._mark_skipped(s, skipped or {})
            complete_job(s, s.get(Job, job_id), note=note)
            s.execute(update(Series).where(Series.id == series_id, Series.version == version,
                                           Series.status == "stable").values(status="skipped"))
            s.commit()
        log.info("series_not_scored", job_id=job_id, series_id=series_id, version=version, reason=note)
