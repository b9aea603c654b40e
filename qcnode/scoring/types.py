"""What scoring hands to the later stages: per-slice results, the series summary, the model's
identity, and the request from which a publisher builds the SR/KOS and queues their delivery.

Scoring owns these types so that the stages after it (report, delivery, and the service that
wires them) depend on scoring and never the other way round. ``ResultPublisher`` is the one thing
the worker needs from them, injected by ``qcnode.service``.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from qcnode.db.states import StrEnum

if TYPE_CHECKING:
    from pydicom.dataset import Dataset
    from sqlalchemy.orm import Session

    from qcnode.db.models import SeriesResult


class Verdict(StrEnum):
    """The series verdict PACS routing rules act on (stored as these strings)."""
    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class SliceResult:
    """One scored slice: which image (and frame), its score with the 5-95 % interval of the
    model's predicted score distribution, and the slice's physics (None where undefined)."""
    sop_instance_uid: str
    score: float
    score_low: float   # 5th percentile
    score_high: float  # 95th percentile
    frame: int | None = None  # 1-based frame number in a multi-frame object; None for a single-frame one
    noise_hu: float | None = None   # global noise level
    dw_cm: float | None = None      # water-equivalent diameter
    ssde_mgy: float | None = None   # size-specific dose estimate


@dataclass(frozen=True)
class SeriesPhysics:
    """Series physics: noise (median over slices), Dw, SSDE and CTDIvol (means); None: unknown."""
    noise_hu: float | None = None
    dw_cm: float | None = None
    ssde_mgy: float | None = None
    ctdivol_mgy: float | None = None


@dataclass(frozen=True)
class SeriesSummary:
    """The series result of one scoring round: score statistics, the verdict, counts, physics."""
    mean_score: float
    min_score: float
    p10_score: float
    fraction_below: float  # of the slices scored below ``verdict.slice_threshold``
    verdict: Verdict | str
    n_slices: int
    n_skipped: int = 0     # instances that could not be scored
    physics: SeriesPhysics = field(default_factory=SeriesPhysics)

    def flat(self) -> dict[str, Any]:
        """The fields with the physics inlined, named as the ``series_results`` columns."""
        out = {k: getattr(self, k) for k in ("mean_score", "min_score", "p10_score", "fraction_below", "verdict",
                                             "n_slices", "n_skipped")}
        out.update(vars(self.physics))
        return out


@dataclass(frozen=True)
class ModelIdentity:
    """Which model scored: its name, its version (name and checkpoint hash: stored with every result
    and part of the SR's UIDs and Device UID) and the checkpoint's full sha256 where known."""
    name: str
    version: str
    sha256: str | None = None

    @classmethod
    def of(cls, scorer: Any) -> "ModelIdentity":
        """The identity of a loaded scorer (``version`` and ``info`` as ``qcnode.model.scorer`` sets them)."""
        info = getattr(scorer, "info", None) or {}
        return cls(name=str(info.get("name") or "MD-IQA"), version=str(scorer.version)[:64],
                   sha256=info.get("sha256"))


@dataclass(frozen=True)
class SRRequest:
    """Everything needed to report one scoring round of a series: build its SR (and the Quality
    Issue KOS where a destination wants one) and route them by the verdict."""
    series_id: int
    study_uid: str
    series_uid: str
    result_version: int               # the series version scored: InstanceNumber, part of the UIDs
    headers: Sequence["Dataset"]      # pixel-free headers of the scored instances
    slices: Sequence[SliceResult]
    summary: SeriesSummary
    model: ModelIdentity
    slice_threshold: float            # slices below it are the KOS's failing slices
    content_datetime: dt.datetime     # fixed per round (the job's creation): a retry writes the same bytes


@dataclass(frozen=True)
class PreparedReport:
    """A round's report, built but not yet written: the SR's identity and every file to write."""
    sr_sop_instance_uid: str
    sr_path: str                          # relative to the spool
    files: tuple[tuple[str, bytes], ...]  # (spool-relative path, bytes): the SR, then the KOS if any


class ResultPublisher(Protocol):
    """Reports a scored round. The worker calls ``prepare`` before its result transaction, writes
    the files durably inside it once the round is known to be current, and calls ``enqueue`` in the
    same transaction, so results, files and deliveries appear together or not at all."""

    def warm_up(self) -> None:
        """Load what the first report would otherwise wait for (called once the model is loaded)."""

    def prepare(self, request: SRRequest) -> PreparedReport:
        """Build the round's SR (and KOS): deterministic, nothing written."""

    def enqueue(self, session: "Session", result: "SeriesResult") -> None:
        """Add the deliveries of ``result`` in the caller's transaction."""
