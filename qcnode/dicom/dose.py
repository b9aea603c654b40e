"""Dose and acquisition fields from CT image headers, and CT Radiation Dose SR (TID 10011) parsing.

``dose_fields`` never raises: a missing or malformed value becomes ``None`` (Enhanced CT: looked up
in the functional groups too). ``ssde_phantom`` picks the SSDE phantom, first match wins: the
header's CTDI phantom code (DCM 113690 head / 113691 body); a protocol or body-part word starting
with HEAD, BRAIN, SKULL, CRANI, CEREB, SINUS, ORBIT, FACIAL, FACE, PETROUS, or IAC (NECK alone is
body: vendors differ); otherwise body.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable

from pydicom.dataset import Dataset

XRAY_RADIATION_DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
GENERIC_SR_CLASSES = {ENHANCED_SR, COMPREHENSIVE_SR, COMPREHENSIVE_3D_SR}

# DCM codes of TID 10011 (CT Radiation Dose) and its sub-templates
CODE_XRAY_DOSE_REPORT = "113701"      # root: X-Ray Radiation Dose Report
CODE_CT_ACCUMULATED = "113811"        # CT Accumulated Dose Data
CODE_DLP_TOTAL = "113813"             # CT Dose Length Product Total
CODE_CT_ACQUISITION = "113819"        # CT Acquisition (one irradiation event)
CODE_ACQ_PROTOCOL = "125203"          # Acquisition Protocol (TEXT)
CODE_TARGET_REGION = "123014"         # Target Region (CODE)
CODE_MEAN_CTDIVOL = "113830"          # Mean CTDIvol
CODE_DLP = "113838"                   # DLP
CODE_PHANTOM_TYPE = "113835"          # CTDIw Phantom Type
CODE_HEAD_PHANTOM = "113690"          # IEC Head Dosimetry Phantom
CODE_BODY_PHANTOM = "113691"          # IEC Body Dosimetry Phantom
TID_CT_RADIATION_DOSE = "10011"

HEAD_PREFIXES = ("HEAD", "BRAIN", "SKULL", "CRANI", "CEREB", "SINUS", "ORBIT", "FACIAL", "FACE", "PETROUS")
HEAD_WORDS = {"IAC"}

_FG_SEQUENCES = ("CTExposureSequence", "CTXRayDetailsSequence", "CTAcquisitionDetailsSequence",
                 "CTAcquisitionTypeSequence", "CTReconstructionSequence", "PixelMeasuresSequence",
                 "CTPositionSequence", "CTTableDynamicsSequence", "CTGeometrySequence")


def _lookup(ds: Dataset, keyword: str, frame: int | None = None) -> Any:
    """Value of ``keyword`` at top level, else in the (per-frame, then shared) functional groups."""
    try:
        if keyword in ds:
            return ds[keyword].value
    except Exception:  # noqa: BLE001 - a malformed element reads as absent
        return None
    groups: list[Dataset] = []
    for seq_kw, index in (("PerFrameFunctionalGroupsSequence", frame or 0),
                          ("SharedFunctionalGroupsSequence", 0)):
        try:
            seq = ds.get(seq_kw)
            if seq is not None and len(seq) > index:
                groups.append(seq[index])
        except Exception:  # noqa: BLE001
            continue
    for group in groups:
        for fg in _FG_SEQUENCES:
            try:
                inner = group.get(fg)
                if inner and keyword in inner[0]:
                    return inner[0][keyword].value
            except Exception:  # noqa: BLE001
                continue
    return None


def _float(value: Any) -> float | None:
    """A finite float from a DS/IS/FD value (first of a multi-value), else None."""
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = next(iter(value), None)
            if value is None:
                return None
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("ascii", "replace")
        if isinstance(value, str):
            value = value.strip()
            if not value:
                return None
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return out if math.isfinite(out) else None


def _text(value: Any, max_len: int = 128) -> str | None:
    """A stripped string (multi-values joined with '\\'), None when empty."""
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = "\\".join(str(v).strip() for v in value if str(v).strip())
        elif isinstance(value, (bytes, bytearray)):
            value = value.decode("latin-1")
        text = str(value).strip().replace("\x00", "")
    except Exception:  # noqa: BLE001
        return None
    return text[:max_len] or None


def _pitch(ds: Dataset, frame: int | None) -> float | None:
    pitch = _float(_lookup(ds, "SpiralPitchFactor", frame))
    if pitch is not None and pitch > 0:
        return pitch
    feed = _float(_lookup(ds, "TableFeedPerRotation", frame))
    coll = _float(_lookup(ds, "TotalCollimationWidth", frame))
    if feed is not None and coll and coll > 0 and feed >= 0:
        return feed / coll
    return None


def dose_fields(ds: Dataset, frame: int | None = None) -> dict[str, Any]:
    """Dose/acquisition header fields of one CT instance; None where absent or malformed.

    Keys: ctdivol_mgy, kvp, tube_current_ma, exposure_mas, pitch, kernel,
    slice_thickness_mm, slice_location (per instance) and protocol_name,
    series_description, body_part, manufacturer, model_name, station_name,
    device_serial (per series). Never raises.
    """
    def num(keyword: str) -> float | None:
        try:
            return _float(_lookup(ds, keyword, frame))
        except Exception:  # noqa: BLE001
            return None

    def txt(keyword: str, max_len: int = 128) -> str | None:
        try:
            return _text(_lookup(ds, keyword, frame), max_len)
        except Exception:  # noqa: BLE001
            return None

    exposure = num("Exposure")  # mAs (IS)
    if exposure is None:
        uas = num("ExposureInuAs")
        exposure = uas / 1000.0 if uas is not None else None
    current = num("XRayTubeCurrent")
    if current is None:
        ua = num("XRayTubeCurrentInuA")
        current = ua / 1000.0 if ua is not None else None
    try:
        pitch = _pitch(ds, frame)
    except Exception:  # noqa: BLE001
        pitch = None
    return {
        "ctdivol_mgy": num("CTDIvol"),
        "kvp": num("KVP"),
        "tube_current_ma": current,
        "exposure_mas": exposure,
        "pitch": pitch,
        "kernel": txt("ConvolutionKernel", 64),
        "slice_thickness_mm": num("SliceThickness"),
        "slice_location": num("SliceLocation"),
        "protocol_name": txt("ProtocolName"),
        "series_description": txt("SeriesDescription"),
        "body_part": txt("BodyPartExamined", 64),
        "manufacturer": txt("Manufacturer"),
        "model_name": txt("ManufacturerModelName"),
        "station_name": txt("StationName"),
        "device_serial": txt("DeviceSerialNumber"),
    }


def _phantom_from_code(item: Any) -> str | None:
    """'head' / 'body' from a coded phantom type item (code value or meaning), else None."""
    try:
        value = str(item.get("CodeValue", "") or "").strip()
        meaning = str(item.get("CodeMeaning", "") or "").upper()
    except Exception:  # noqa: BLE001
        return None
    if value == CODE_HEAD_PHANTOM or "HEAD" in meaning:
        return "head"
    if value == CODE_BODY_PHANTOM or "BODY" in meaning:
        return "body"
    return None


def has_head_keyword(text: str | None) -> bool:
    """Whether a header text names the head (a word starting with HEAD_PREFIXES, or one of HEAD_WORDS)."""
    if not text:
        return False
    for word in re.split(r"[^A-Z0-9]+", str(text).upper()):
        if word in HEAD_WORDS or any(word.startswith(p) for p in HEAD_PREFIXES):
            return True
    return False


def ssde_phantom(protocol_name: str | None, body_part: str | None, ds: Dataset | None = None) -> str:
    """Which CTDI phantom the SSDE conversion uses: "head" (16 cm) or "body" (32 cm).

    The header's CTDIPhantomTypeCodeSequence wins; else head keywords in the protocol
    name or body part (see the module docstring); else "body".
    """
    if ds is not None:
        try:
            seq = _lookup(ds, "CTDIPhantomTypeCodeSequence")
            if seq:
                found = _phantom_from_code(seq[0])
                if found:
                    return found
        except Exception:  # noqa: BLE001
            pass
    if has_head_keyword(protocol_name) or has_head_keyword(body_part):
        return "head"
    return "body"


def _concept_code(item: Dataset) -> str | None:
    try:
        seq = item.get("ConceptNameCodeSequence")
        return str(seq[0].CodeValue).strip() if seq else None
    except Exception:  # noqa: BLE001
        return None


def _has_tid_10011(ds: Dataset) -> bool:
    try:
        for t in ds.get("ContentTemplateSequence") or []:
            if str(t.get("TemplateIdentifier", "")).strip() == TID_CT_RADIATION_DOSE:
                return True
    except Exception:  # noqa: BLE001
        pass
    return False


def _has_ct_acquisition(ds: Dataset) -> bool:
    try:
        return any(_concept_code(i) in (CODE_CT_ACQUISITION, CODE_CT_ACCUMULATED)
                   for i in ds.get("ContentSequence") or [])
    except Exception:  # noqa: BLE001
        return False


def is_dose_sr(ds: Dataset) -> bool:
    """True for an X-Ray Radiation Dose SR, or a generic (Enhanced/Comprehensive) SR whose
    root is the CT Radiation Dose template (TID 10011 / root concept 113701 with CT content)."""
    try:
        sop_class = str(ds.get("SOPClassUID", "")).strip()
    except Exception:  # noqa: BLE001
        return False
    if sop_class == XRAY_RADIATION_DOSE_SR:
        return True
    if sop_class not in GENERIC_SR_CLASSES:
        return False
    if _has_tid_10011(ds):
        return True
    return _concept_code(ds) == CODE_XRAY_DOSE_REPORT and _has_ct_acquisition(ds)


def _num_value(item: Dataset) -> float | None:
    """Numeric value of a NUM content item, converted to mGy / mGy.cm when the unit says Gy."""
    try:
        mv = item.MeasuredValueSequence[0]
        value = _float(mv.NumericValue)
        unit = str(mv.MeasurementUnitsCodeSequence[0].CodeValue) if "MeasurementUnitsCodeSequence" in mv else ""
    except Exception:  # noqa: BLE001
        return None
    if value is None:
        return None
    if unit in ("Gy", "Gy.cm"):
        value *= 1000.0
    elif unit == "Gy.m":  # rare: Gy.m -> mGy.cm
        value *= 1e5
    return value


def _iter_items(item: Dataset) -> Iterable[Dataset]:
    try:
        yield from item.get("ContentSequence") or []
    except Exception:  # noqa: BLE001
        return


def _walk(item: Dataset, depth: int = 0) -> Iterable[Dataset]:
    """All content items below ``item`` (depth-first, bounded depth)."""
    if depth > 16:
        return
    for child in _iter_items(item):
        yield child
        yield from _walk(child, depth + 1)


def _parse_event(container: Dataset) -> dict[str, Any]:
    event: dict[str, Any] = {"protocol": None, "ctdivol_mgy": None, "dlp_mgycm": None,
                             "phantom": None, "target_region": None}
    for item in _walk(container):
        code = _concept_code(item)
        try:
            if code == CODE_ACQ_PROTOCOL and event["protocol"] is None:
                event["protocol"] = _text(item.get("TextValue"))
            elif code == CODE_TARGET_REGION and event["target_region"] is None:
                seq = item.get("ConceptCodeSequence")
                event["target_region"] = _text(seq[0].CodeMeaning) if seq else None
            elif code == CODE_MEAN_CTDIVOL and event["ctdivol_mgy"] is None:
                event["ctdivol_mgy"] = _num_value(item)
            elif code == CODE_DLP and event["dlp_mgycm"] is None:
                event["dlp_mgycm"] = _num_value(item)
            elif code == CODE_PHANTOM_TYPE and event["phantom"] is None:
                seq = item.get("ConceptCodeSequence")
                event["phantom"] = _phantom_from_code(seq[0]) if seq else None
        except Exception:  # noqa: BLE001 - one bad item does not lose the event
            continue
    return event


def parse_dose_sr(ds: Dataset) -> dict[str, Any]:
    """Accumulated DLP and per-acquisition dose of a CT Radiation Dose SR (TID 10011).

    Returns ``{"total_dlp_mgycm": float|None, "events": [{"protocol", "ctdivol_mgy",
    "dlp_mgycm", "phantom", "target_region"}, ...]}``. Doses are in mGy and mGy.cm.
    When the accumulated total is missing, it is the sum of the event DLPs (if any).
    Never raises on malformed content: what cannot be read is None.
    """
    total: float | None = None
    events: list[dict[str, Any]] = []
    for item in _iter_items(ds):
        code = _concept_code(item)
        if code == CODE_CT_ACQUISITION:
            events.append(_parse_event(item))
        elif code == CODE_CT_ACCUMULATED:
            for sub in _walk(item):
                if _concept_code(sub) == CODE_DLP_TOTAL:
                    total = _num_value(sub)
                    break
    if total is None:
        dlps = [e["dlp_mgycm"] for e in events if e["dlp_mgycm"] is not None]
        total = float(sum(dlps)) if dlps else None
    return {"total_dlp_mgycm": total, "events": events}
