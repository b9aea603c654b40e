"""The worker's ``ResultPublisher``: report (SR, Quality Issue KOS) plus delivery (outbox rows).

Scoring must not depend on the stages after it, so the service composes them here and hands the
result to ``qcnode.scoring.worker.Worker``. ``prepare`` builds the files (nothing written: the
worker writes them durably inside its result transaction, once the round is known to be
current); ``enqueue`` adds the deliveries in that same transaction.
"""
from __future__ import annotations

from sqlalchemy.orm import Session

from qcnode.config import Config
from qcnode.db.models import SeriesResult
from qcnode.delivery import outbox
from qcnode.ingest.spool import Spool
from qcnode.log import get_logger
from qcnode.report.kos import build_quality_issue_kos, failing_slices
from qcnode.report.sr import build_series_sr, load_standard_tables, sr_bytes
from qcnode.scoring.types import PreparedReport, SRRequest

log = get_logger("qcnode.service.publish")


class ReportPublisher:
    """Builds a round's SR (and, when a destination wants one for its verdict, the KOS) and queues
    the deliveries the configured destinations get."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def warm_up(self) -> None:
        """Load highdicom's tables of the standard now, not while the first SR is built."""
        load_standard_tables()

    def prepare(self, request: SRRequest) -> PreparedReport:
        """The SR (a build error fails the job) and the optional KOS, as spool paths and bytes."""
        sr = build_series_sr(request.headers, request.slices, request.summary, request.model,
                             request.result_version, content_datetime=request.content_datetime)
        sr_uid = str(sr.SOPInstanceUID)
        sr_rel = Spool.sr_relpath(request.study_uid, request.series_uid, sr_uid)
        files = [(sr_rel, sr_bytes(sr))]
        kos = self._kos(request)
        if kos is not None:
            files.append(kos)
        return PreparedReport(sr_sop_instance_uid=sr_uid, sr_path=sr_rel, files=tuple(files))

    def enqueue(self, session: Session, result: SeriesResult) -> None:
        """The result's outbox rows, in the caller's transaction."""
        outbox.enqueue(session, result, self.cfg)

    def _kos(self, request: SRRequest) -> tuple[str, bytes] | None:
        """(spool path, bytes) of the Quality Issue KOS when a destination wants one; a KOS that
        cannot be built is logged and never costs the series its SR (its delivery fails visibly)."""
        if not outbox.wants_kind(self.cfg, str(request.summary.verdict), outbox.KIND_KOS):
            return None
        threshold = request.slice_threshold
        try:
            kos = build_quality_issue_kos(request.headers, failing_slices(request.slices, threshold), request.model,
                                          request.result_version, threshold, content_datetime=request.content_datetime)
        except Exception as exc:  # noqa: BLE001 - the KOS is optional
            log.error("kos_not_built", series_id=request.series_id, version=request.result_version,
                      error=f"{type(exc).__name__}: {exc}"[:300])
            return None
        return (outbox.kos_relpath(request.study_uid, request.series_uid, request.model.version,
                                   request.result_version), sr_bytes(kos))
