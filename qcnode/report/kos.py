"""A Key Object Selection document (KOS) that flags the failing slices of a series (highdicom).

Sent to destinations whose ``send`` holds ``"kos:FAIL"`` (or ``"kos:WARN"``) so a viewer can show
the slices that made the verdict: document title DCM 113010 "Quality Issue" (CID 7010), the
algorithm as observer device (same Device UID as in the SR), a text description, and one image
reference per failing instance. Never a rejection note (DCM 113001 "Rejected for Quality
Reasons" and friends): under IHE IOCM an archive would hide the images.

Like the SR, every UID and time is derived from the inputs, so a retry writes the same file:
SeriesInstanceUID from (source series UID, model version), SOPInstanceUID from (source series
UID, model version, result version), SeriesNumber = 9500 + the source SeriesNumber.
"""
from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass
from typing import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from qcnode.report.sr import (MANUFACTURER, SRBuildError, algorithm_equipment, derived_uid, device_observer,
                             evidence_header, pin_times, utc_naive)
from qcnode.scoring.types import ModelIdentity, SliceResult

KOS_SERIES_NUMBER_BASE = 9500


@dataclass(frozen=True)
class FlaggedSlice:
    """One slice the KOS lists: its instance and score (below ``threshold``)."""
    sop_instance_uid: str
    score: float


def failing_slices(slices: Sequence[SliceResult], threshold: float) -> list[FlaggedSlice]:
    """Instances with a slice scored below ``threshold`` (lowest score per instance), in slice
    order; when none is below (a FAIL by the series mean), the single worst instance."""
    worst: dict[str, float] = {}
    for s in slices:
        uid, score = str(s.sop_instance_uid), float(s.score)
        worst[uid] = min(score, worst.get(uid, score))
    below = [FlaggedSlice(u, sc) for u, sc in worst.items() if sc < threshold]
    if below or not worst:
        return below
    uid = min(worst, key=worst.__getitem__)
    return [FlaggedSlice(uid, worst[uid])]


def kos_series_uid(source_series_uid: str, model_version: str) -> str:
    """SeriesInstanceUID of the KOS series for one source series and model version."""
    return derived_uid("kos-series", source_series_uid, str(model_version))


def kos_sop_uid(source_series_uid: str, model_version: str, result_version: int) -> str:
    """SOPInstanceUID of the KOS of one scoring round (result version) of a series."""
    return derived_uid("kos-sop", source_series_uid, str(model_version), str(int(result_version)))


def build_quality_issue_kos(source_headers: Sequence[Dataset], flagged: Sequence[FlaggedSlice],
                            model: ModelIdentity, result_version: int, threshold: float,
                            content_datetime: dt.datetime | None = None) -> Dataset:
    """The "Quality Issue" KOS of one scoring round: references the ``flagged`` instances."""
    if not flagged:
        raise SRBuildError("a Quality Issue KOS needs at least one flagged slice")
    name, version = model.name, model.version
    if not name or not version:
        raise SRBuildError("the model needs a name and a version")
    when = utc_naive(content_datetime)
    by_uid = {str(h.SOPInstanceUID): h for h in source_headers}
    missing = [f.sop_instance_uid for f in flagged if f.sop_instance_uid not in by_uid]
    if missing:
        raise SRBuildError(f"flagged slice {missing[0]} has no source header")
    referenced = [evidence_header(by_uid[f.sop_instance_uid]) for f in flagged]
    source_series = str(referenced[0].SeriesInstanceUID)
    try:
        series_number = KOS_SERIES_NUMBER_BASE + int(referenced[0].get("SeriesNumber"))
    except (TypeError, ValueError):
        series_number = KOS_SERIES_NUMBER_BASE
    description = (f"{len(flagged)} image(s) scored below the quality threshold {threshold:g} "
                   f"by {name} {version}")
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.QualityIssue, referenced_objects=referenced,
        observer_device_context=device_observer(name, version), description=description[:1024])
    with warnings.catch_warnings():  # de-identified data often has single-component names
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=referenced, content=content,
            series_instance_uid=kos_series_uid(source_series, version), series_number=series_number,
            sop_instance_uid=kos_sop_uid(source_series, version, result_version),
            instance_number=int(result_version), manufacturer=MANUFACTURER,
            contributing_equipment=[algorithm_equipment(name, version, when)],
            series_description=f"QC quality issue ({name})"[:64])
    kos.SeriesDate, kos.SeriesTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    pin_times(kos, when)
    return kos
