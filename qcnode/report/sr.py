"""The qcnode result of one series as a DICOM Structured Report (highdicom, TID 1500).

One Comprehensive 3D SR per scoring round of a series, in the same study as a new series.

Content tree (TID 1500 Measurement Report, title DCM 126000 "Imaging Measurement Report",
procedure reported LN 25045-6 "CT unspecified body region" (CID 100), observer = the algorithm
as a device whose UID changes with the model, see ``algorithm_device_uid``), following IHE AI
Results (AIR): the algorithm is also a Contributing Equipment item (purpose 99IHE 1630
"Processing Algorithm", Manufacturer qcnode, model name, software version = model version,
Device UID), and the report has an Image Library listing every source image.

* first, the series-level TID 1501 group (tracking identifier "series summary") with
  - the score with derivation SCT 373098007 "Mean", SCT 255605001 "Minimum" and SCT 371890005
    "10th Percentile Value of population",
  - QC003 "Fraction of slices below quality threshold" (UCUM ``1``),
  - QC004 "Number of scored slices" (``{slices}``), QC005 "Number of skipped images" (``{images}``),
  - where computed: QC006 "Global noise level" (HU, derivation SCT "Median" over slices),
    DCM 113980 "Water Equivalent Diameter" (cm), DCM 113930 "Size Specific Dose Estimate" (mGy)
    and DCM 113830 "Mean CTDIvol" (mGy), the first two with derivation SCT "Mean" over slices,
  - the verdict as a qualitative evaluation: QC002 "CT image quality verdict" =
    QCPASS "Pass" / QCWARN "Warning" / QCFAIL "Fail", all 99QCNODE, and the same verdict as a
    TEXT item DCM 121106 "Comment" for renderers that show text only,
  - the algorithm identification (TID 4019).
* then one TID 1501 group per scored slice, with
  - a tracking identifier ("slice <n>") whose UID is derived from the slice's SOP Instance UID
    (so the same slice keeps its tracking UID across SR versions),
  - the referenced source image (group ``source_images``, DCM "Source of Measurement";
    multi-frame objects reference their frame),
  - the algorithm name and version (TID 4019 Algorithm Identification),
  - the measurement 99QCNODE QC001 "CT image quality score", unit UCUM ``{score}`` (0-4 scale),
  - its 5-95 % interval as TID 311 Measurement Statistical Properties: SCT 371888009 "5th
    Percentile Value of population" = ``score_low`` and SCT 371889001 "95th Percentile Value of
    population" = ``score_high`` (the population is the model's predicted score distribution).

Every private code's scheme (99QCNODE, 99IHE) is declared in the Coding Scheme Identification
Sequence. A source header that says PatientIdentityRemoved YES without a de-identification
method gets a DeidentificationMethod text (Type 1C in the Patient module).

UIDs are derived (pydicom ``generate_uid(entropy_srcs=...)``) so that a retry builds the same
object: SeriesInstanceUID from (source series UID, model version); SOPInstanceUID from (source
series UID, model version, result version). InstanceNumber = result version; SeriesNumber =
9000 + the source SeriesNumber (9000 without one). Content, series and instance-creation dates
come from ``content_datetime`` so the same inputs give byte-identical files.
"""
from __future__ import annotations

import datetime as dt
import os
import uuid
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any, Sequence

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM

from qcnode import __version__ as QCNODE_VERSION

QC_SCHEME = "99QCNODE"
UID_NAMESPACE = "qcnode-sr"

SCORE = Code("QC001", QC_SCHEME, "CT image quality score")
VERDICT = Code("QC002", QC_SCHEME, "CT image quality verdict")
FRACTION_BELOW = Code("QC003", QC_SCHEME, "Fraction of slices below quality threshold")
N_SLICES = Code("QC004", QC_SCHEME, "Number of scored slices")
N_SKIPPED = Code("QC005", QC_SCHEME, "Number of skipped images")
NOISE = Code("QC006", QC_SCHEME, "Global noise level")
LEGACY_P10 = Code("QC010", QC_SCHEME, "10th percentile")  # read back from SRs before IHE AIR
P10 = Code("371890005", "SCT", "10th Percentile Value of population")
P5 = Code("371888009", "SCT", "5th Percentile Value of population")
P95 = Code("371889001", "SCT", "95th Percentile Value of population")
WATER_EQUIVALENT_DIAMETER = Code("113980", "DCM", "Water Equivalent Diameter")
SSDE = Code("113930", "DCM", "Size Specific Dose Estimate")
MEAN_CTDIVOL = Code("113830", "DCM", "Mean CTDIvol")
COMMENT = Code("121106", "DCM", "Comment")
CT_PROCEDURE = Code("25045-6", "LN", "CT unspecified body region")
IHE_SCHEME = "99IHE"
PROCESSING_ALGORITHM = Code("1630", IHE_SCHEME, "Processing Algorithm")  # IHE AIR's purpose of reference
HU_UNIT = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
CM_UNIT = Code("cm", "UCUM", "centimeter")
MGY_UNIT = Code("mGy", "UCUM", "milligray")
VERDICT_CODES = {
    "PASS": Code("QCPASS", QC_SCHEME, "Pass"),
    "WARN": Code("QCWARN", QC_SCHEME, "Warning"),
    "FAIL": Code("QCFAIL", QC_SCHEME, "Fail"),
}
SCORE_UNIT = Code("{score}", "UCUM", "score")
NO_UNIT = Code("1", "UCUM", "no units")
SLICES_UNIT = Code("{slices}", "UCUM", "slices")
IMAGES_UNIT = Code("{images}", "UCUM", "images")
UPPER_UNCERTAINTY = Code("371886008", "SCT", "+, range of upper measurement uncertainty")
LOWER_UNCERTAINTY = Code("371885007", "SCT", "-, range of lower measurement uncertainty")
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
SERIES_NUMBER_BASE = 9000
DEIDENTIFICATION_UNSTATED = "de-identified at the source; method not stated"
VERDICT_TEXT = {"PASS": "Pass", "WARN": "Warning", "FAIL": "Fail"}
# (summary key, concept, unit, derivation across slices) of the per-series physics
PHYSICS_MEASUREMENTS = (("noise_hu", NOISE, HU_UNIT, codes.SCT.Median),
                        ("dw_cm", WATER_EQUIVALENT_DIAMETER, CM_UNIT, codes.SCT.Mean),
                        ("ssde_mgy", SSDE, MGY_UNIT, codes.SCT.Mean),
                        ("ctdivol_mgy", MEAN_CTDIVOL, MGY_UNIT, None))
CODING_SCHEMES = (
    CodingSchemeIdentificationItem(designator=QC_SCHEME, name="qcnode image quality codes",
                                   responsible_organization="qcnode"),
    CodingSchemeIdentificationItem(designator=IHE_SCHEME, name="IHE temporary codes",
                                   responsible_organization="IHE"),
)
MANUFACTURER = "qcnode"
SERIES_SUMMARY_ID = "series summary"
SR_CHARACTER_SET = "ISO_IR 192"  # UTF-8: holds any text decoded from a source header

# Type 2 patient/study attributes highdicom copies from the first source header.
_REQUIRED_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                   "AccessionNumber", "StudyID", "StudyDate", "StudyTime")


class SRBuildError(ValueError):
    """The inputs cannot make a valid SR (missing headers, bad verdict, unknown slice)."""


def sr_series_uid(source_series_uid: str, model_version: str) -> str:
    """SeriesInstanceUID of the SR series for one source series and model version."""
    return generate_uid(entropy_srcs=[UID_NAMESPACE, "series", source_series_uid, str(model_version)])


def sr_sop_uid(source_series_uid: str, model_version: str, result_version: int) -> str:
    """SOPInstanceUID of the SR for one scoring round (result version) of a series."""
    return generate_uid(entropy_srcs=[UID_NAMESPACE, "sop", source_series_uid, str(model_version),
                                      str(int(result_version))])


def derived_uid(*parts: str) -> str:
    """A UID derived from ``parts`` (same parts, same UID: retries write the same objects)."""
    return generate_uid(entropy_srcs=[UID_NAMESPACE, *parts])


def algorithm_device_uid(name: str, version: str) -> str:
    """Device UID of a model (``2.25`` + a name-based UUID of name and version): the same model
    always has the same UID, a retrained or renamed model another (IHE AIR)."""
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, f"{UID_NAMESPACE}/device/{name}/{version}").int)


def algorithm_equipment(name: str, version: str, when: dt.datetime) -> hd.ContributingEquipment:
    """The Contributing Equipment item IHE AIR asks for: the algorithm, with its Device UID."""
    item = hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=name[:64], software_versions=version[:64],
        contribution_datetime=when.strftime("%Y%m%d%H%M%S"),
        contribution_description=f"image quality scoring by qcnode {QCNODE_VERSION}"[:1024])
    # highdicom accepts CID 7005 purposes only; AIR's code is not (yet) one of them
    item.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(PROCESSING_ALGORITHM)]
    item.DeviceUID = algorithm_device_uid(name, version)
    return item


def device_observer(name: str, version: str) -> hd.sr.ObserverContext:
    """The algorithm as the observing device (same UID as its Contributing Equipment item)."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm_device_uid(name, version), name=name, manufacturer_name=MANUFACTURER,
            model_name=name))


def utc_naive(when: dt.datetime | None) -> dt.datetime:
    """``when`` (default: now) as a naive UTC date-time; naive input is taken as UTC already."""
    when = when or dt.datetime.now(dt.timezone.utc)
    return when.astimezone(dt.timezone.utc).replace(tzinfo=None) if when.tzinfo else when


def pin_times(ds: Dataset, when: dt.datetime) -> None:
    """Set content, creation and contribution times to ``when`` (UTC) and say so: highdicom stamps
    its own with now(), and a retry must be byte-identical."""
    ds.ContentDate, ds.ContentTime = DA(when.date()), TM(when.time())
    ds.InstanceCreationDate = ds.ContentDate
    ds.InstanceCreationTime = ds.ContentTime
    ds.TimezoneOffsetFromUTC = "+0000"  # DICOM's default is local time
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = str(ds.ContentDate) + str(ds.ContentTime)


_DATE_TIME_TYPES = {"DA": DA, "DT": DT, "TM": TM}
_PATIENT_SEX_VALUES = {"M", "F", "O", ""}


def _value_usable(elem: DataElement) -> bool:
    """False for a value highdicom refuses when it copies the patient and study attributes into
    the SR (an unparseable date or time, a PatientSex outside M/F/O): such a value is left empty
    (Type 2) rather than costing the series its SR."""
    if elem.keyword == "PatientSex":
        return str(elem.value or "").strip() in _PATIENT_SEX_VALUES  # highdicom takes these exactly
    parse = _DATE_TIME_TYPES.get(elem.VR)
    if parse is None or elem.value in (None, ""):
        return True
    values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
    try:
        for v in values:
            if v not in (None, "") and parse(v) is None:
                return False
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def evidence_header(ds: Dataset) -> Dataset:
    """A pixel-free copy of a source header with the attributes highdicom needs present, its text
    decoded and marked UTF-8 (``SR_CHARACTER_SET``): highdicom copies the character set of the
    first header into the SR and refuses a misspelled or unknown one (``ISO IR 100``). Values it
    would refuse otherwise are emptied (``_value_usable``): one bad field never costs the SR.
    A header marked PatientIdentityRemoved YES without a method gets ``DEIDENTIFICATION_UNSTATED``
    (DeidentificationMethod is Type 1C in the Patient module, so the copy must not be empty)."""
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not ds.get(key):
            raise SRBuildError(f"source header lacks {key}")
    out = Dataset()
    with warnings.catch_warnings():  # pydicom warns about the bad character set it then works around
        warnings.simplefilter("ignore")
        for elem in ds:
            if elem.tag.group >= 0x7FE0 or elem.keyword in ("PixelData", "FloatPixelData",
                                                             "DoubleFloatPixelData"):
                continue
            if elem.VR == "SQ":  # decode nested text now, while the items know the source's character set
                for item in elem.value:
                    for _ in item.iterall():
                        pass
            out.add(elem if _value_usable(elem) else DataElement(elem.tag, elem.VR, ""))
    out.SpecificCharacterSet = SR_CHARACTER_SET
    for key in _REQUIRED_TYPE2:
        if key not in out:
            setattr(out, key, "")
    if (str(out.get("PatientIdentityRemoved", "")).upper() == "YES" and not out.get("DeidentificationMethod")
            and not out.get("DeidentificationMethodCodeSequence")):
        out.DeidentificationMethod = DEIDENTIFICATION_UNSTATED
    return out


def _slice_measurements(score: float, low: float, high: float) -> list[hd.sr.Measurement]:
    """The score and its 5-95 % interval as two more scores with derivation 5th / 95th percentile
    (siblings, not TID 310 properties: validators read those as misplaced INFERRED FROM items)."""
    if not (low <= score <= high):
        raise SRBuildError(f"score {score} is not inside its interval [{low}, {high}]")
    return [hd.sr.Measurement(name=SCORE, value=value, unit=SCORE_UNIT, derivation=derivation)
            for value, derivation in ((score, None), (low, P5), (high, P95))]


def _ds_value(x: float) -> float:
    """A float rounded so that it survives the DS (16 character) encoding unchanged."""
    return float(f"{float(x):.6g}")


def build_series_sr(source_headers: Sequence[Dataset], slices: Sequence[dict[str, Any]],
                    summary: dict[str, Any], model_info: dict[str, Any], result_version: int,
                    content_datetime: dt.datetime | None = None) -> Dataset:
    """Build the TID 1500 Comprehensive 3D SR for one scoring round of a series.

    ``source_headers``: headers of the scored instances (pixels not needed); ``slices``: dicts
    with sop_instance_uid, score, score_low, score_high (optional ``frame``: 1-based frame
    number, used for multi-frame objects only);
    ``summary``: mean_score, min_score, p10_score, fraction_below, verdict, n_slices, n_skipped,
    optionally the series physics noise_hu, dw_cm, ssde_mgy, ctdivol_mgy (None or absent: left out);
    ``model_info``: name, version. ``content_datetime`` fixes the content/creation date-time
    (pass the result's creation time so a retry is byte-identical; default: now, UTC).
    """
    if not source_headers:
        raise SRBuildError("no source headers: an SR needs at least one referenced image")
    if not slices:
        raise SRBuildError("no scored slices")
    verdict = str(summary.get("verdict", ""))
    if verdict not in VERDICT_CODES:
        raise SRBuildError(f"verdict must be one of {sorted(VERDICT_CODES)}, got {verdict!r}")
    name, version = str(model_info.get("name", "")), str(model_info.get("version", ""))
    if not name or not version:
        raise SRBuildError("model_info needs a name and a version")
    when = utc_naive(content_datetime)

    headers = {str(h.SOPInstanceUID): evidence_header(h) for h in source_headers}
    first = headers[str(source_headers[0].SOPInstanceUID)]
    source_series = str(first.SeriesInstanceUID)
    study_uid = str(first.StudyInstanceUID)
    for h in headers.values():
        if str(h.SeriesInstanceUID) != source_series or str(h.StudyInstanceUID) != study_uid:
            raise SRBuildError("source headers belong to more than one series")

    algorithm = hd.sr.AlgorithmIdentification(name=name, version=version)
    groups = [_summary_group(summary, algorithm, source_series)]  # IHE AIR: the summary first
    referenced: list[str] = []
    multiframe_by_class: dict[str, bool] = {}  # highdicom's IOD look-up takes ~10 ms: once per SOP class
    for i, s in enumerate(slices):
        uid = str(s["sop_instance_uid"])
        header = headers.get(uid)
        if header is None:
            raise SRBuildError(f"slice {uid} has no source header")
        frame = s.get("frame")  # 1-based; only meaningful for multi-frame objects
        sop_class = str(header.SOPClassUID)
        if sop_class not in multiframe_by_class:  # by IOD (e.g. Enhanced CT), as highdicom checks
            multiframe_by_class[sop_class] = is_multiframe_image(header)
        multiframe = multiframe_by_class[sop_class]
        frames = [int(frame)] if frame is not None and multiframe else None
        number = header.get("InstanceNumber")
        label = f"slice {number}" if number not in (None, "") else f"slice #{i + 1}"
        if frames:
            label += f" frame {frames[0]}"
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid("track", uid, str(frames[0] if frames else 0)), identifier=label),
            algorithm_id=algorithm,
            measurements=_slice_measurements(_ds_value(s["score"]), _ds_value(s["score_low"]),
                                             _ds_value(s["score_high"])),
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(
                header, referenced_frame_numbers=frames)],
        ))
        referenced.append(uid)

    # every source header is evidence, scored or not; referenced ones first, in slice order
    evidence = [headers[u] for u in dict.fromkeys(referenced)]
    evidence += [h for u, h in headers.items() if u not in set(referenced)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device_observer(name, version)),
        procedure_reported=CT_PROCEDURE,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
        referenced_images=evidence,  # the Image Library
    )
    source_number = first.get("SeriesNumber")
    try:
        series_number = SERIES_NUMBER_BASE + int(source_number)
    except (TypeError, ValueError):
        series_number = SERIES_NUMBER_BASE
    with warnings.catch_warnings():  # de-identified data often has single-component names
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=sr_series_uid(source_series, version),
            series_number=series_number,
            sop_instance_uid=sr_sop_uid(source_series, version, result_version),
            instance_number=int(result_version),
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            series_description=f"QC image quality ({name})"[:64],
            software_versions=f"{name} {version}"[:64],
            content_date=when.date(),
            content_time=when.time(),
            series_date=when.date(),
            series_time=when.time(),
            coding_schemes=list(CODING_SCHEMES),
            contributing_equipment=[algorithm_equipment(name, version, when)],
        )
    pin_times(sr, when)
    return sr


def _summary_group(summary: dict[str, Any], algorithm: hd.sr.AlgorithmIdentification,
                   source_series: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The series summary: score statistics, counts, physics and the verdict (coded and as text)."""
    measurements: list[hd.sr.Measurement] = []
    for key, derivation in (("mean_score", codes.SCT.Mean), ("min_score", codes.SCT.Minimum),
                            ("p10_score", P10)):
        if summary.get(key) is not None:
            measurements.append(hd.sr.Measurement(name=SCORE, value=_ds_value(summary[key]),
                                                  unit=SCORE_UNIT, derivation=derivation))
    if summary.get("fraction_below") is not None:
        measurements.append(hd.sr.Measurement(name=FRACTION_BELOW, value=_ds_value(summary["fraction_below"]),
                                              unit=NO_UNIT))
    measurements.append(hd.sr.Measurement(name=N_SLICES, value=int(summary.get("n_slices", 0)),
                                          unit=SLICES_UNIT))
    measurements.append(hd.sr.Measurement(name=N_SKIPPED, value=int(summary.get("n_skipped", 0) or 0),
                                          unit=IMAGES_UNIT))
    for key, concept, unit, derivation in PHYSICS_MEASUREMENTS:
        if summary.get(key) is not None:
            measurements.append(hd.sr.Measurement(name=concept, value=_ds_value(summary[key]), unit=unit,
                                                  derivation=derivation))
    verdict = str(summary["verdict"])
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid("track-series", source_series),
                                                     identifier=SERIES_SUMMARY_ID),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=VERDICT, value=VERDICT_CODES[verdict])],
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=COMMENT, value=f"CT image quality verdict: {VERDICT_TEXT[verdict]}", relationship_type="CONTAINS"))
    return group


def load_standard_tables() -> None:
    """Load highdicom's tables of the DICOM standard (IODs, modules, attributes) now.

    highdicom reads them lazily, once per process, which takes about a second on a small host:
    the worker calls this at start so that the first series' SR does not wait for it. (Any SOP
    instance highdicom makes looks its IOD up in them: a throw-away one loads them.)"""
    hd.SOPClass(study_instance_uid="2.25.1", series_instance_uid="2.25.2", series_number=1,
                sop_instance_uid="2.25.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
                instance_number=1, modality="SR")


# CT image IODs that allow several frames (highdicom references frame numbers only in those; the
# table is checked against highdicom's tables of the standard in tests/test_sr.py)
MULTIFRAME_CT_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2.1",   # Enhanced CT Image Storage
                                   "1.2.840.10008.5.1.4.1.1.2.2"})  # Legacy Converted Enhanced CT Image Storage


def is_multiframe_image(dataset: Dataset) -> bool:
    """Whether the IOD of ``dataset`` (a CT image) allows several frames, as highdicom decides it."""
    return str(dataset.SOPClassUID) in MULTIFRAME_CT_CLASSES


def sr_bytes(sr: Dataset) -> bytes:
    """The SR encoded as a DICOM Part 10 file (what ``write_sr`` stores)."""
    buf = BytesIO()
    dcmwrite(buf, sr, enforce_file_format=True)
    return buf.getvalue()


def write_sr(sr: Dataset, path: str | Path) -> Path:
    """Write the SR atomically (temp file, fsync, rename): a retry overwrites it identically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(sr_bytes(sr))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


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


def read_series_sr(ds: Dataset) -> dict[str, Any]:
    """Parse a qcnode SR (as built by ``build_series_sr``) back with highdicom.

    Returns {sop_instance_uid, series_instance_uid, source_series_instance_uid, instance_number,
    algorithm: {name, version}, slices: [{sop_instance_uid, score, score_low, score_high, frame}],
    summary: {mean_score, min_score, p10_score, fraction_below, n_slices, n_skipped, verdict,
    verdict_text, and noise_hu, dw_cm, ssde_mgy, ctdivol_mgy where present}}.
    SRs written before IHE AIR (interval as uncertainty ranges, QC010 percentile) read the same.
    """
    sr = hd.sr.Comprehensive3DSR.from_dataset(ds, copy=True)
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    slices: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    algorithm: dict[str, str | None] = {"name": None, "version": None}
    sources: set[str] = set()
    physics_keys = {_key(concept): key for key, concept, _unit, _derivation in PHYSICS_MEASUREMENTS}
    for group in report.get_image_measurement_groups():
        algorithm = {"name": _text_item(group[0], ALGORITHM_NAME) or algorithm["name"],
                     "version": _text_item(group[0], ALGORITHM_VERSION) or algorithm["version"]}
        if group.tracking_identifier == SERIES_SUMMARY_ID:
            for m in group.get_measurements():
                if _code_eq(m.name, SCORE):
                    key = {_key(codes.SCT.Mean): "mean_score", _key(codes.SCT.Minimum): "min_score",
                           _key(P10): "p10_score", _key(LEGACY_P10): "p10_score"}.get(
                        _key(m.derivation) if m.derivation else None)
                    if key:
                        summary[key] = float(m.value)
                elif _key(m.name) in physics_keys:
                    summary[physics_keys[_key(m.name)]] = float(m.value)
                elif _code_eq(m.name, FRACTION_BELOW):
                    summary["fraction_below"] = float(m.value)
                elif _code_eq(m.name, N_SLICES):
                    summary["n_slices"] = int(m.value)
                elif _code_eq(m.name, N_SKIPPED):
                    summary["n_skipped"] = int(m.value)
            for ev in group.get_qualitative_evaluations(name=VERDICT):
                summary["verdict"] = next((k for k, c in VERDICT_CODES.items() if _code_eq(ev.value, c)), None)
            summary["verdict_text"] = _text_item(group[0], COMMENT)
            continue
        by_derivation = {_key(m.derivation) if m.derivation else None: m for m in group.get_measurements(name=SCORE)}
        m = by_derivation.get(None)
        if m is not None:
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
            uid = str(ref.referenced_sop_instance_uid)
            frames = ref.referenced_frame_numbers
            slices.append({"sop_instance_uid": uid, "score": score, "score_low": _ds_value(low),
                           "score_high": _ds_value(high), "frame": frames[0] if frames else None})
            sources.add(uid)
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
