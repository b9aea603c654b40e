"""Decode CT pixel data to Hounsfield units and decide whether a slice can be scored.

Used by ``qcnode score``, the SCP (classification at receipt), the worker and the
simulator. Any transfer syntax pydicom decodes with the pylibjpeg plugins works
(JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE, deflate, big endian).
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
CT_IMAGE_CLASSES = {CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE}
# Retired JPEG processes that no decoder here handles.
UNSUPPORTED_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.53": "retired JPEG Extended (Process 3 & 5)",
    "1.2.840.10008.1.2.4.55": "retired JPEG Full Progression (Process 10 & 12)",
}
# A slice is axial when its normal is within about 37 degrees of the patient z axis: tilted-gantry
# head scans (commonly up to 30 degrees) count as axial; coronal/sagittal (90 degrees) do not.
AXIAL_MIN_COS = 0.8
# No CT value lies beyond this after rescale (air is -1000 HU, dense metal a few 10 000 HU on an
# extended scale): a RescaleSlope/Intercept that maps the stored pixel range further is nonsense.
HU_LIMIT = 1e6
# SamplesPerPixel each PhotometricInterpretation requires (PS3.3 C.7.6.3.1.2)
PHOTOMETRIC_SAMPLES = {"MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "HSV": 3, "YBR_FULL": 3,
                       "YBR_FULL_422": 3, "YBR_PARTIAL_422": 3, "YBR_PARTIAL_420": 3, "YBR_ICT": 3, "YBR_RCT": 3,
                       "ARGB": 4, "CMYK": 4}
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


class SkipSlice(Exception):
    """The object is readable but is not a scorable axial CT slice; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UnreadableFile(Exception):
    """The file is not DICOM, is truncated, or its pixel data cannot be decoded."""


@dataclass
class CTSlice:
    """One axial CT slice in HU with the identifiers a report needs."""
    hu: np.ndarray  # float32 (rows, cols), Hounsfield units
    sop_instance_uid: str
    series_instance_uid: str
    instance_number: int | None
    pixel_spacing_mm: tuple[float, float] | None
    path: str | None = None
    frame: int | None = None  # frame index for multi-frame (Enhanced CT) objects
    meta: dict[str, Any] = field(default_factory=dict)


# VRs whose value conversion cannot fail unless pydicom's reading validation is RAISE (text is
# decoded with replacement, UIDs/dates stay strings, byte VRs stay bytes): skipped by the eager decode
# ("OB or OW": implicit VR pixel data, left raw so that its declared length can still be checked)
_LENIENT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "LO", "SH", "LT", "ST", "UC", "UT", "UR",
                          "PN", "OB", "OD", "OF", "OL", "OV", "OW", "OB or OW"})


# (tag, VR, byte order, implicit VR, raw value) of small elements that converted without error: the
# same bytes convert the same way again, so the next slice of a series skips them (bounded size)
_CONVERTED_OK: dict[tuple[Any, ...], None] = {}
_CONVERTED_OK_MAX = 8192
_CACHEABLE_BYTES = 256


def decode_public_elements(ds: Dataset) -> None:
    """Convert every public top-level element whose conversion can fail (numbers, sequences,
    unknown/UN VRs); raises what pydicom raises. Private elements are kept as sent.

    A small raw value already converted without error in this process (most header values repeat
    from slice to slice of a series) is not converted again here; it converts on first use."""
    strict = pydicom_config.settings.reading_validation_mode == pydicom_config.RAISE
    for tag in list(ds.keys()):
        if tag.is_private:
            continue
        elem = ds.get_item(tag)
        vr = getattr(elem, "VR", None)
        if vr is None:  # implicit VR: the dictionary's
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = None
        if not strict and vr in _LENIENT_VRS:
            continue
        key = None
        if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes) \
                and len(elem.value) <= _CACHEABLE_BYTES:
            key = (tag, vr, elem.is_little_endian, elem.is_implicit_VR, strict, elem.value)
            if key in _CONVERTED_OK:
                continue
        ds[tag]
        if key is not None:
            if len(_CONVERTED_OK) >= _CONVERTED_OK_MAX:
                _CONVERTED_OK.clear()
            _CONVERTED_OK[key] = None


def read_dataset(path: str | Path, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM file; raises UnreadableFile with a clear reason on any failure."""
    ds = _read(path, stop_before_pixels)
    try:  # pydicom decodes lazily: a bad VR or length is "unreadable" here, not an odd exception later
        decode_public_elements(ds)
    except Exception as exc:  # noqa: BLE001
        raise UnreadableFile(f"cannot parse DICOM: {type(exc).__name__}: {exc}") from exc
    return ds


def _read(path: str | Path, stop_before_pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels, force=False)
    except pydicom.errors.InvalidDicomError:
        try:  # files without the 128-byte preamble/"DICM" but with a valid dataset
            ds = pydicom.dcmread(str(path), stop_before_pixels=stop_before_pixels, force=True)
        except Exception as exc:  # noqa: BLE001 - any parse failure is "unreadable"
            raise UnreadableFile(f"not a DICOM file: {exc}") from exc
        if "SOPClassUID" not in ds:
            raise UnreadableFile("not a DICOM file (no DICM marker and no SOP Class UID)")
        return ds
    except Exception as exc:  # noqa: BLE001
        raise UnreadableFile(f"cannot parse DICOM: {type(exc).__name__}: {exc}") from exc


def skip_reason(ds: Dataset) -> str | None:
    """Why this dataset cannot be scored (None if it is a scorable axial CT image).

    Looks at headers only (no pixel decoding), so the SCP can call it at receipt. Contradictory
    pixel metadata (:func:`functional_groups_error`, :func:`pixel_metadata_error`, which the SCP
    refuses at receipt) and an unusable PixelSpacing are skip reasons too.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in CT_IMAGE_CLASSES:
        return f"not a CT image (SOP Class {sop_class or 'missing'})"
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return "no pixel data"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return "localizer (ImageType LOCALIZER)"
    ts = _transfer_syntax(ds)
    if ts in UNSUPPORTED_TRANSFER_SYNTAXES:
        return f"unsupported transfer syntax {ts} ({UNSUPPORTED_TRANSFER_SYNTAXES[ts]})"
    error = functional_groups_error(ds) or pixel_metadata_error(ds)
    if error:
        return f"inconsistent pixel metadata: {error}"
    if sop_class == CT_IMAGE_STORAGE:
        orientation = ds.get("ImageOrientationPatient")
        if orientation is not None and not is_axial(orientation):
            return "not an axial image (ImageOrientationPatient)"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return "not a grayscale image (SamplesPerPixel != 1)"
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric and photometric not in GRAYSCALE:  # missing: read as grayscale, as before
        shown = photometric if photometric in PHOTOMETRIC_SAMPLES else "unknown"
        return f"not a grayscale image (PhotometricInterpretation {shown})"
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 32 or cols < 32:
        return f"image too small ({rows}x{cols})"
    for spacing in _pixel_values(ds, "PixelMeasuresSequence", "PixelSpacing"):
        error = _spacing_error(spacing)
        if error:
            return error
    return None


def functional_groups_error(ds: Dataset) -> str | None:
    """Why an Enhanced CT image lacks the functional groups its IOD requires (None if it has them, or
    is no Enhanced CT image): a Per-frame Functional Groups Sequence with one item per frame."""
    if str(ds.get("SOPClassUID", "")) != ENHANCED_CT_IMAGE_STORAGE:
        return None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return "Enhanced CT image without PerFrameFunctionalGroupsSequence"
    frames = int_or_none(ds.get("NumberOfFrames"))
    if frames != len(per_frame):
        return f"Enhanced CT image with {len(per_frame)} PerFrameFunctionalGroupsSequence items for " \
               f"NumberOfFrames {frames}"
    return None


def pixel_metadata_error(ds: Dataset) -> str | None:
    """How the pixel description of a CT image contradicts itself (None if it does not): a
    PhotometricInterpretation that needs another SamplesPerPixel, or a RescaleSlope/RescaleIntercept
    that is not a finite number, is 0, or maps the stored pixel range beyond ``HU_LIMIT``."""
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    value = ds.get("SamplesPerPixel")
    samples = 1 if value in (None, "") else int_or_none(value)
    needed = PHOTOMETRIC_SAMPLES.get(photometric)
    if needed is not None and samples != needed:
        return f"PhotometricInterpretation {photometric} with SamplesPerPixel {samples} (needs {needed})"
    slopes = list(_pixel_values(ds, "PixelValueTransformationSequence", "RescaleSlope")) or [None]
    intercepts = list(_pixel_values(ds, "PixelValueTransformationSequence", "RescaleIntercept")) or [None]
    low, high = _stored_range(ds)
    for slope_value in slopes:
        for intercept_value in intercepts:
            try:
                slope = float(slope_value if slope_value not in (None, "") else 1)
                intercept = float(intercept_value if intercept_value not in (None, "") else 0)
            except (TypeError, ValueError):
                return "RescaleSlope or RescaleIntercept is not a number"
            if not (math.isfinite(slope) and math.isfinite(intercept)):
                return f"RescaleSlope {slope} and RescaleIntercept {intercept} must be finite numbers"
            if slope == 0:
                return "RescaleSlope 0 maps every pixel to one value"
            extreme = max(abs(slope * low + intercept), abs(slope * high + intercept))
            if not extreme <= HU_LIMIT:
                return f"RescaleSlope {slope:g} and RescaleIntercept {intercept:g} map the stored pixel range " \
                       f"to {extreme:.3g} HU (more than {HU_LIMIT:g})"
    return None


def _stored_range(ds: Dataset) -> tuple[int, int]:
    """The smallest and largest stored pixel value BitsStored and PixelRepresentation allow."""
    allocated = int_or_none(ds.get("BitsAllocated")) or 16
    stored = int_or_none(ds.get("BitsStored"))
    bits = min(max(stored if stored and 0 < stored <= allocated else allocated, 1), 64)
    if int_or_none(ds.get("PixelRepresentation")) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _pixel_values(ds: Dataset, sequence: str, keyword: str) -> Iterator[Any]:
    """Every value of ``keyword`` that applies to the image: the data set's own (CT Image), or those in
    ``sequence`` of the shared and of each per-frame functional group (Enhanced CT)."""
    if str(ds.get("SOPClassUID", "")) != ENHANCED_CT_IMAGE_STORAGE:
        if keyword in ds:
            yield ds.get(keyword)
        return
    for groups in (ds.get("SharedFunctionalGroupsSequence") or [], ds.get("PerFrameFunctionalGroupsSequence") or []):
        for group in groups:
            for item in group.get(sequence) or []:
                if keyword in item:
                    yield item.get(keyword)


def _spacing_error(value: Any) -> str | None:
    """Why a PixelSpacing value is unusable: zero, negative or not finite (None otherwise; an empty or
    malformed value is a spacing left unknown, as it always was, not a reason to skip the slice)."""
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(row) and math.isfinite(col) and row > 0 and col > 0):
        return f"unusable PixelSpacing {row:g}\\{col:g} (must be positive)"
    return None


def is_axial(orientation: Any) -> bool:
    """True when the slice normal of ImageOrientationPatient is within AXIAL_MIN_COS of z."""
    try:
        v = [float(x) for x in orientation]
    except (TypeError, ValueError):
        return False
    if len(v) != 6 or not all(math.isfinite(x) for x in v):
        return False
    (ax, ay, az), (bx, by, bz) = v[:3], v[3:]  # plain floats: called per received instance
    nx, ny, nz = ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx
    n = math.sqrt(nx * nx + ny * ny + nz * nz)
    return bool(n > 0 and abs(nz) / n >= AXIAL_MIN_COS)


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def to_hu(ds: Dataset) -> np.ndarray:
    """Pixel data of a single-frame CT image in HU (float32), using the rescale tags."""
    arr = _pixel_array(ds)
    if arr.ndim != 2:
        raise SkipSlice(f"unexpected pixel array shape {arr.shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return _finite(arr.astype(np.float32) * np.float32(slope) + np.float32(intercept))


def _finite(hu: np.ndarray) -> np.ndarray:
    """``hu`` if every value is finite; else SkipSlice (a score of NaN or infinite HU means nothing)."""
    if not np.isfinite(hu).all():
        raise SkipSlice("non-finite HU after rescale")
    return hu


def _pixel_array(ds: Dataset) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoder errors vary by plugin
        raise UnreadableFile(f"cannot decode pixel data ({_transfer_syntax(ds) or 'unknown syntax'}): "
                             f"{type(exc).__name__}: {exc}") from exc


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    ps = ds.get("PixelSpacing")
    try:
        return (float(ps[0]), float(ps[1])) if ps is not None and len(ps) == 2 else None
    except (TypeError, ValueError):
        return None


def int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def iter_slices(ds: Dataset, path: str | None = None) -> Iterator[CTSlice]:
    """Yield the scorable slices of a dataset (one, or one per frame of Enhanced CT).

    Raises SkipSlice if the object is not scorable, UnreadableFile if pixels fail to decode.
    """
    reason = skip_reason(ds)
    if reason:
        raise SkipSlice(reason)
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    series_uid = str(ds.get("SeriesInstanceUID", ""))
    if not sop_uid or not series_uid:
        raise SkipSlice("missing SOP Instance UID or Series Instance UID")
    number = int_or_none(ds.get("InstanceNumber"))
    if str(ds.SOPClassUID) == CT_IMAGE_STORAGE:
        yield CTSlice(to_hu(ds), sop_uid, series_uid, number, _spacing(ds), path)
        return
    yield from _enhanced_frames(ds, sop_uid, series_uid, number, path)


def _enhanced_frames(ds: Dataset, sop_uid: str, series_uid: str, number: int | None,
                     path: str | None) -> Iterator[CTSlice]:
    arr = _pixel_array(ds)
    if arr.ndim == 2:
        arr = arr[None]
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else Dataset()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    for i in range(arr.shape[0]):
        item = per_frame[i] if i < len(per_frame) else Dataset()
        orient = _functional(item, shared_item, "PlaneOrientationSequence", "ImageOrientationPatient")
        if orient is not None and not is_axial(orient):
            continue
        pix = _functional(item, shared_item, "PixelMeasuresSequence", "PixelSpacing")
        slope = _functional(item, shared_item, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(item, shared_item, "PixelValueTransformationSequence", "RescaleIntercept")
        hu = _finite(arr[i].astype(np.float32) * np.float32(float(slope if slope is not None else 1))
                     + np.float32(float(intercept if intercept is not None else 0)))
        spacing = (float(pix[0]), float(pix[1])) if pix is not None and len(pix) == 2 else None
        yield CTSlice(hu, sop_uid, series_uid, number, spacing, path, frame=i)


def _functional(item: Dataset, shared: Dataset, seq: str, keyword: str) -> Any:
    for group in (item, shared):
        s = group.get(seq)
        if s and keyword in s[0]:
            return s[0].get(keyword)
    return None


def load_slices(path: str | Path) -> list[CTSlice]:
    """Read a file and return its scorable slices (raises SkipSlice / UnreadableFile)."""
    ds = read_dataset(path)
    return list(iter_slices(ds, str(path)))


def uid_is_valid(value: str) -> bool:
    """True for a syntactically valid DICOM UID (digits and dots, <= 64 chars, no empty parts)."""
    return bool(value) and len(value) <= 64 and UID(value).is_valid
