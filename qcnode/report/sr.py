"""The qcnode result of one series as a DICOM Structured Report (highdicom, TID 1500).

One Comprehensive 3D SR per scoring round of a series, in the same study as a new series. (A little over 400 lines:
the content tree below is kept next to the code that builds it.)

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

The inputs are scoring's types (``qcnode.scoring.types``). The codes live in ``codes``, the
reading back in ``read``; the KOS (``kos``) reuses the UID, device and header helpers here.
"""
from __future__ import annotations

import datetime as dt
import os
import uuid
import warnings
from io import BytesIO
from pathlib import Path
from typing import Sequence

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM

from qcnode import __version__ as QCNODE_VERSION
from qcnode.report.codes import (COMMENT, CT_PROCEDURE, FRACTION_BELOW, IHE_SCHEME, IMAGES_UNIT, N_SKIPPED,
                                 N_SLICES, NO_UNIT, P5, P95, PHYSICS_MEASUREMENTS, PROCESSING_ALGORITHM, QC_SCHEME,
                                 SCORE, SCORE_STATISTICS, SCORE_UNIT, SERIES_SUMMARY_ID, SLICES_UNIT, VERDICT,
                                 VERDICT_CODES, VERDICT_TEXT)
from qcnode.scoring.types import ModelIdentity, SeriesSummary, SliceResult

UID_NAMESPACE = "qcnode-sr"
SERIES_NUMBER_BASE = 9000
DEIDENTIFICATION_UNSTATED = "de-identified at the source; method not stated"
CODING_SCHEMES = (
    CodingSchemeIdentificationItem(designator=QC_SCHEME, name="qcnode image quality codes",
                                   responsible_organization="qcnode"),
    CodingSchemeIdentificationItem(designator=IHE_SCHEME, name="IHE temporary codes",
                                   responsible_organization="IHE"),
)
MANUFACTURER = "qcnode"
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


def ds_value(x: float) -> float:
    """A float rounded so that it survives the DS (16 character) encoding unchanged."""
    return float(f"{float(x):.6g}")


def build_series_sr(source_headers: Sequence[Dataset], slices: Sequence[SliceResult], summary: SeriesSummary,
                    model: ModelIdentity, result_version: int,
                    content_datetime: dt.datetime | None = None) -> Dataset:
    """Build the TID 1500 Comprehensive 3D SR for one scoring round of a series.

    ``source_headers``: headers of the scored instances (pixels not needed); ``slices``: the scored
    slices (``frame`` is used for multi-frame objects only); ``summary``: the series summary (its
    physics left out where None); ``model``: name and version. ``content_datetime`` fixes the
    content/creation date-time (pass the result's creation time so a retry is byte-identical;
    default: now, UTC). Raises SRBuildError when the inputs cannot make a valid SR.
    """
    _check_inputs(source_headers, slices, summary, model)
    when = utc_naive(content_datetime)
    headers, first = _evidence_headers(source_headers)
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version)
    groups = [_summary_group(summary, algorithm, str(first.SeriesInstanceUID))]  # IHE AIR: the summary first
    groups += _slice_groups(slices, headers, algorithm)
    evidence = _image_library(headers, slices)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=device_observer(model.name, model.version)),
        procedure_reported=CT_PROCEDURE,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
        referenced_images=evidence,  # the Image Library
    )
    sr = _document(report, evidence, first, model, result_version, when)
    pin_times(sr, when)
    return sr


def _check_inputs(source_headers: Sequence[Dataset], slices: Sequence[SliceResult], summary: SeriesSummary,
                  model: ModelIdentity) -> None:
    if not source_headers:
        raise SRBuildError("no source headers: an SR needs at least one referenced image")
    if not slices:
        raise SRBuildError("no scored slices")
    if str(summary.verdict) not in VERDICT_CODES:
        raise SRBuildError(f"verdict must be one of {sorted(VERDICT_CODES)}, got {str(summary.verdict)!r}")
    if not model.name or not model.version:
        raise SRBuildError("the model needs a name and a version")


def _evidence_headers(source_headers: Sequence[Dataset]) -> tuple[dict[str, Dataset], Dataset]:
    """{SOP Instance UID: evidence header} of the sources (all of one series) and the first one."""
    headers = {str(h.SOPInstanceUID): evidence_header(h) for h in source_headers}
    first = headers[str(source_headers[0].SOPInstanceUID)]
    for h in headers.values():
        if str(h.SeriesInstanceUID) != str(first.SeriesInstanceUID) or \
                str(h.StudyInstanceUID) != str(first.StudyInstanceUID):
            raise SRBuildError("source headers belong to more than one series")
    return headers, first


def _slice_groups(slices: Sequence[SliceResult], headers: dict[str, Dataset],
                  algorithm: hd.sr.AlgorithmIdentification) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One TID 1501 group per scored slice: tracking identifier, score and interval, source image."""
    groups = []
    for i, s in enumerate(slices):
        uid = str(s.sop_instance_uid)
        header = headers.get(uid)
        if header is None:
            raise SRBuildError(f"slice {uid} has no source header")
        # a frame is referenced only in an IOD that allows several (e.g. Enhanced CT), as highdicom checks
        frames = [int(s.frame)] if s.frame is not None and is_multiframe_image(header) else None
        number = header.get("InstanceNumber")
        label = f"slice {number}" if number not in (None, "") else f"slice #{i + 1}"
        if frames:
            label += f" frame {frames[0]}"
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid("track", uid, str(frames[0] if frames else 0)), identifier=label),
            algorithm_id=algorithm,
            measurements=_slice_measurements(ds_value(s.score), ds_value(s.score_low), ds_value(s.score_high)),
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(
                header, referenced_frame_numbers=frames)],
        ))
    return groups


def _image_library(headers: dict[str, Dataset], slices: Sequence[SliceResult]) -> list[Dataset]:
    """Every source header is evidence, scored or not: the scored ones first, in slice order."""
    referenced = dict.fromkeys(str(s.sop_instance_uid) for s in slices)
    return [headers[u] for u in referenced] + [h for u, h in headers.items() if u not in referenced]


def _document(report: hd.sr.MeasurementReport, evidence: list[Dataset], first: Dataset, model: ModelIdentity,
              result_version: int, when: dt.datetime) -> hd.sr.Comprehensive3DSR:
    """The SR document around ``report``: a new series in the source study, derived UIDs."""
    source_series = str(first.SeriesInstanceUID)
    try:
        series_number = SERIES_NUMBER_BASE + int(first.get("SeriesNumber"))
    except (TypeError, ValueError):
        series_number = SERIES_NUMBER_BASE
    name, version = model.name, model.version
    with warnings.catch_warnings():  # de-identified data often has single-component names
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        return hd.sr.Comprehensive3DSR(
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


def _summary_group(summary: SeriesSummary, algorithm: hd.sr.AlgorithmIdentification,
                   source_series: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The series summary: score statistics, counts, physics and the verdict (coded and as text)."""
    measurements: list[hd.sr.Measurement] = []
    for key, derivation in SCORE_STATISTICS:
        if getattr(summary, key) is not None:
            measurements.append(hd.sr.Measurement(name=SCORE, value=ds_value(getattr(summary, key)),
                                                  unit=SCORE_UNIT, derivation=derivation))
    if summary.fraction_below is not None:
        measurements.append(hd.sr.Measurement(name=FRACTION_BELOW, value=ds_value(summary.fraction_below),
                                              unit=NO_UNIT))
    measurements.append(hd.sr.Measurement(name=N_SLICES, value=int(summary.n_slices or 0), unit=SLICES_UNIT))
    measurements.append(hd.sr.Measurement(name=N_SKIPPED, value=int(summary.n_skipped or 0), unit=IMAGES_UNIT))
    for key, concept, unit, derivation in PHYSICS_MEASUREMENTS:
        value = getattr(summary.physics, key)
        if value is not None:
            measurements.append(hd.sr.Measurement(name=concept, value=ds_value(value), unit=unit,
                                                  derivation=derivation))
    verdict = str(summary.verdict)
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
