"""Read a qcnode SR back (highdicom): for tests, tools and checks against a PACS's copy.

The result is a plain dict (JSON-ready), not the builder's types: it also reads SRs written
before IHE AIR (interval as TID 310 uncertainty ranges, the QC010 percentile).
"""
from __future__ import annotations

from typing import Any

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from qcnode.report.codes import (ALGORITHM_NAME, ALGORITHM_VERSION, COMMENT, FRACTION_BELOW, LEGACY_P10,
                                 LOWER_UNCERTAINTY, N_SKIPPED, N_SLICES, P5, P10, P95, PHYSICS_MEASUREMENTS, SCORE,
                                 SERIES_SUMMARY_ID, UPPER_UNCERTAINTY, VERDICT, VERDICT_CODES)
from qcnode.report.sr import ds_value


def _code_eq(a: CodedConcept | Code | None, b: Code) -> bool:
    return a is not None and a.value == b.value and a.scheme_designator == b.scheme_designator


def _nested_numbers(item: Dataset) -> dict[tuple[str, str], float]:
    """{(code value, scheme): value} of the NUM items anywhere below ``item``."""
    out: dict[tuple[str, str], float] = {}
    for child in item.get("ContentSequence", []):
        if child.ValueType == "NUM" and child.get("MeasuredValueSequence"):
            name = child.ConceptNameCodeSequence[0]
            out[(name.CodeValue, name.CodingSchemeDesignator)] = float(child.MeasuredValueSequence[0].NumericValue)
        out.update(_nested_numbers(child))
    return out


def _key(code: Code | CodedConcept) -> tuple[str, str]:
    return code.value, code.scheme_designator


def _text_item(group_item: Dataset, code: Code) -> str | None:
    for item in group_item.get("ContentSequence", []):
        name = item.ConceptNameCodeSequence[0]
        if name.CodeValue == code.value and name.CodingSchemeDesignator == code.scheme_designator:
            return str(item.TextValue)
    return None


_STATISTICS = {_key(codes.SCT.Mean): "mean_score", _key(codes.SCT.Minimum): "min_score",
               _key(P10): "p10_score", _key(LEGACY_P10): "p10_score"}
_PHYSICS = {_key(concept): key for key, concept, _unit, _derivation in PHYSICS_MEASUREMENTS}


def _read_summary(group: Any) -> dict[str, Any]:
    """The series summary group: statistics, counts, physics and the verdict (coded and as text)."""
    summary: dict[str, Any] = {}
    for m in group.get_measurements():
        if _code_eq(m.name, SCORE):
            key = _STATISTICS.get(_key(m.derivation) if m.derivation else None)
            if key:
                summary[key] = float(m.value)
        elif _key(m.name) in _PHYSICS:
            summary[_PHYSICS[_key(m.name)]] = float(m.value)
        elif _code_eq(m.name, FRACTION_BELOW):
            summary["fraction_below"] = float(m.value)
        elif _code_eq(m.name, N_SLICES):
            summary["n_slices"] = int(m.value)
        elif _code_eq(m.name, N_SKIPPED):
            summary["n_skipped"] = int(m.value)
    for ev in group.get_qualitative_evaluations(name=VERDICT):
        summary["verdict"] = next((k for k, c in VERDICT_CODES.items() if _code_eq(ev.value, c)), None)
    summary["verdict_text"] = _text_item(group[0], COMMENT)
    return summary


def _read_slice(group: Any) -> dict[str, Any] | None:
    """One slice group: the score, its interval and the referenced image (None: no score in it)."""
    by_derivation = {_key(m.derivation) if m.derivation else None: m for m in group.get_measurements(name=SCORE)}
    m = by_derivation.get(None)
    if m is None:
        return None
    score = float(m.value)
    # before IHE AIR the interval was TID 310 uncertainty ranges below the score
    numbers = _nested_numbers(m[0])
    low = float(by_derivation[_key(P5)].value) if _key(P5) in by_derivation else \
        score - numbers.get(_key(LOWER_UNCERTAINTY), 0.0)
    high = float(by_derivation[_key(P95)].value) if _key(P95) in by_derivation else \
        score + numbers.get(_key(UPPER_UNCERTAINTY), 0.0)
    images = m.referenced_images or group.source_images
    if not images:
        raise ValueError(f"measurement group {group.tracking_identifier!r} references no image")
    ref = images[0]
    frames = ref.referenced_frame_numbers
    return {"sop_instance_uid": str(ref.referenced_sop_instance_uid), "score": score, "score_low": ds_value(low),
            "score_high": ds_value(high), "frame": frames[0] if frames else None}


def read_series_sr(ds: Dataset) -> dict[str, Any]:
    """Parse a qcnode SR (as built by ``qcnode.report.sr.build_series_sr``) back with highdicom.

    Returns {sop_instance_uid, series_instance_uid, study_instance_uid, source_series_instance_uid,
    instance_number, algorithm: {name, version}, slices: [{sop_instance_uid, score, score_low,
    score_high, frame}], summary: {mean_score, min_score, p10_score, fraction_below, n_slices,
    n_skipped, verdict, verdict_text, and noise_hu, dw_cm, ssde_mgy, ctdivol_mgy where present}}.
    """
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=True)
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    slices: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    algorithm: dict[str, str | None] = {"name": None, "version": None}
    for group in report.get_image_measurement_groups():
        algorithm = {"name": _text_item(group[0], ALGORITHM_NAME) or algorithm["name"],
                     "version": _text_item(group[0], ALGORITHM_VERSION) or algorithm["version"]}
        if group.tracking_identifier == SERIES_SUMMARY_ID:
            summary = _read_summary(group)
        else:
            item = _read_slice(group)
            if item is not None:
                slices.append(item)
    source_series = sr.get_evidence_series()
    return {
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "study_instance_uid": str(ds.StudyInstanceUID),
        "source_series_instance_uid": str(source_series[0][1]) if source_series else None,
        "instance_number": int(ds.InstanceNumber),
        "algorithm": algorithm,
        "slices": slices,
        "summary": summary,
    }
