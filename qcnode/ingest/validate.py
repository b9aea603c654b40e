"""The checks a received C-STORE passes before it is spooled, and the failure status of each.

A check that fails raises :class:`Refused` with the DIMSE status and a reason (logged, and written
next to the quarantine copy). Pixel data is not decoded here (the worker does that); headers are.

Failure statuses: 0xA700 out of resources (free disk below the watermark, the spool's file system
full or over quota while writing, or shutting down), 0xA900 dataset does not match the SOP class
(or the request's UIDs; an Enhanced CT image without its per-frame functional groups), 0xC210 cannot
understand (undecodable dataset), 0xC001 invalid UIDs (in the dataset or in the C-STORE request; also a
component with a leading zero), 0xC002 no pixel data, 0xC003 inconsistent pixel data (a native PixelData
length other than Rows x Columns x BitsAllocated x SamplesPerPixel x frames, a PhotometricInterpretation
that contradicts SamplesPerPixel, a RescaleSlope/Intercept that is not finite, is 0 or gives absurd HU),
0xC004 cannot store/record, 0x0122 SOP class not supported (non-CT storage objects and SRs
that are not dose reports; other storage classes are accepted at negotiation only so that they
can be refused with a clear status and a quarantine copy; also a C-STORE whose SOP Class UID is not
the abstract syntax of the presentation context it came on, e.g. a CT slice on the Verification
context or an unknown SOP class on a CT context, which pynetdicom alone would abort or accept).
"""
from __future__ import annotations

from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pynetdicom.sop_class import (Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage,
                                  XRayRadiationDoseSRStorage)

from qcnode.dicom.dose import is_dose_sr, parse_dose_sr
from qcnode.dicom.pixels import (CT_IMAGE_CLASSES, decode_public_elements, functional_groups_error,
                                 pixel_metadata_error, skip_reason)
from qcnode.ingest.spool import InvalidUID, Spool, check_uid
from qcnode.log import redact_quoted

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
INVALID_UID = 0xC001
NO_PIXEL_DATA = 0xC002
INCONSISTENT = 0xC003
CANNOT_STORE = 0xC004
SOP_CLASS_NOT_SUPPORTED = 0x0122
PIXEL_DATA_TAG = 0x7FE00010

DOSE_SR_CLASSES = {str(XRayRadiationDoseSRStorage), str(EnhancedSRStorage), str(ComprehensiveSRStorage),
                   str(Comprehensive3DSRStorage)}
ACCEPTED_CLASSES = CT_IMAGE_CLASSES | DOSE_SR_CLASSES


class Refused(Exception):
    """A C-STORE that is answered with a failure status (and quarantined)."""

    def __init__(self, status: int, reason: str, keep_copy: bool = True):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.keep_copy = keep_copy


def check_request(request: Any, context_class: str, info: dict[str, Any]) -> None:
    """The C-STORE request's own UIDs (``info``'s, None where invalid) are valid, and its SOP class is
    the presentation context's (pynetdicom dispatches on the request's own UID)."""
    for what, key, value in (("SOP Class UID", "sop_class_uid", request.AffectedSOPClassUID),
                             ("SOP Instance UID", "sop_instance_uid", request.AffectedSOPInstanceUID)):
        if info[key] is None:  # (the dataset's own UID is compared with it later)
            raise Refused(INVALID_UID, f"invalid {what} in the C-STORE request: {uid_text(value)!r}")
    if info["sop_class_uid"] != context_class:
        raise Refused(SOP_CLASS_NOT_SUPPORTED,
                      f"C-STORE of SOP Class {info['sop_class_uid']} on a presentation context "
                      f"negotiated for {context_class}")


def decode_dataset(event: Any) -> Dataset:
    """The received dataset with its transfer syntax and public elements decoded (a bad VR or
    length is 0xC210 here, not 0xC004 later)."""
    try:
        ds = event.dataset
        if getattr(ds, "file_meta", None) is None:
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = event.context.transfer_syntax
        ds.SOPClassUID  # noqa: B018 - force parsing of the key elements
        decode_public_elements(ds)
    except Exception as exc:  # noqa: BLE001
        raise Refused(CANNOT_UNDERSTAND, f"cannot decode dataset: {error_reason(exc)}") from exc
    return ds


def identifiers(ds: Dataset, info: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """(SOP class, SOP instance, study, series UID, spool path) of a dataset whose SOP UIDs are the
    request's (``info``) and whose study and series UIDs are valid."""
    try:
        sop_class = str(ds.get("SOPClassUID", ""))
        sop_uid = str(ds.get("SOPInstanceUID", ""))
        study_uid = str(ds.get("StudyInstanceUID", ""))
        series_uid = str(ds.get("SeriesInstanceUID", ""))
    except Exception as exc:  # noqa: BLE001
        raise Refused(CANNOT_UNDERSTAND, f"cannot decode identifiers: {error_reason(exc)}") from exc
    if sop_class != info["sop_class_uid"]:
        raise Refused(DATASET_MISMATCH, "SOP Class UID of the dataset differs from the one announced (C-STORE request, File Meta)")
    if sop_uid != info["sop_instance_uid"]:
        raise Refused(DATASET_MISMATCH, "SOP Instance UID of the dataset differs from the one announced (C-STORE request, File Meta)")
    try:
        for what, uid in (("Study Instance UID", study_uid), ("Series Instance UID", series_uid)):
            check_uid(uid, what, strict=True)
        rel = Spool.instance_relpath(study_uid, series_uid, sop_uid)
    except InvalidUID as exc:
        raise Refused(INVALID_UID, str(exc)) from exc
    return sop_class, sop_uid, study_uid, series_uid, rel


def check_content(ds: Dataset, sop_class: str) -> tuple[bool, str | None, dict[str, Any] | None]:
    """(scorable, skip reason, parsed dose report) of a CT image or CT dose SR; anything else is refused."""
    if sop_class in CT_IMAGE_CLASSES:
        modality = str(ds.get("Modality", "CT") or "CT").upper()
        if modality != "CT":
            raise Refused(DATASET_MISMATCH, f"CT image storage with Modality {modality[:16]}")
        reason = skip_reason(ds)
        if reason == "no pixel data":
            raise Refused(NO_PIXEL_DATA, "CT image without pixel data")
        error = functional_groups_error(ds)
        if error:
            raise Refused(DATASET_MISMATCH, error)
        error = pixel_metadata_error(ds)
        if error:
            raise Refused(INCONSISTENT, error)
        check_native_pixel_length(ds)
        return reason is None, reason, None
    if sop_class in DOSE_SR_CLASSES:
        if not is_dose_sr(ds):
            raise Refused(SOP_CLASS_NOT_SUPPORTED, "structured report is not a CT radiation dose report")
        try:
            dose_report = parse_dose_sr(ds)
        except Exception as exc:  # noqa: BLE001
            raise Refused(CANNOT_UNDERSTAND, f"cannot parse dose report: {error_reason(exc)}") from exc
        return False, "radiation dose SR (stored for the audit)", dose_report
    raise Refused(SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} is not CT or a CT dose report")


def check_native_pixel_length(ds: Dataset) -> None:
    """For uncompressed syntaxes: the PixelData element must declare and hold exactly Rows x Columns x
    frames x samples x bits (plus the one pad byte that makes an odd length even)."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None or ts.is_compressed or "PixelData" not in ds:
        return
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise Refused(INCONSISTENT, f"image pixel module incomplete: {error_reason(exc)}") from exc
    expected = (rows * cols * spp * frames * bits + 7) // 8
    element = ds.get_item(PIXEL_DATA_TAG)  # still raw (not decoded at receipt): its declared length as sent
    value = element.value or b""
    if not value:  # present but empty
        raise Refused(NO_PIXEL_DATA, "CT image with empty pixel data")
    actual = len(value)
    declared = element.length if isinstance(element, RawDataElement) else actual
    if declared != actual:
        raise Refused(INCONSISTENT, f"pixel data element declares {declared} bytes, {actual} follow")
    if actual != expected and not (expected % 2 and actual == expected + 1):
        raise Refused(INCONSISTENT, f"pixel data has {actual} bytes, Rows x Columns x frames x samples x "
                                    f"bits needs {expected}")


def uid_or_none(value: Any) -> str | None:
    """``value`` if it is a valid DICOM UID (no component with a leading zero), else None."""
    try:
        return check_uid(value, strict=True)
    except InvalidUID:
        return None


def error_reason(exc: BaseException) -> str:
    """An exception for a refusal reason or log line, quoted values redacted (pydicom's messages
    may quote a header value, which may be a patient's name or ID)."""
    return redact_quoted(f"{type(exc).__name__}: {exc}")


def uid_text(value: Any) -> str:
    """An (invalid) UID for a refusal reason: at most 80 characters."""
    return ("" if value is None else str(value))[:80]
