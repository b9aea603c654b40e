"""The per-series DICOM SR (highdicom TID 1500): content, read-back, determinism, bad input."""
from __future__ import annotations

import datetime as dt
import copy
from dataclasses import replace
import shutil
import subprocess

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes

from qcnode.report import sr as sr_mod
from qcnode.report.read import read_series_sr
from qcnode.report.sr import SRBuildError, build_series_sr, sr_bytes
from qcnode.scoring.types import ModelIdentity, SliceResult
from sr_helpers import (MODEL, MODEL_INFO, PHYSICS, WHEN, pixelmed_sr_validator, read_headers, slice_scores,
                        summary_for, write_validated)


@pytest.fixture(scope="module")
def ge_headers(shared_ct):
    return read_headers(shared_ct / "ge_head")


def _build(headers, version=1, model=MODEL, verdict="WARN", when=WHEN):
    slices = slice_scores(headers)
    return build_series_sr(headers, slices, summary_for(slices, verdict), model, version,
                           content_datetime=when), slices


def test_sr_round_trip_with_highdicom(ge_headers, tmp_path):
    sr, slices = _build(ge_headers)
    path = write_validated(sr, tmp_path / "sr.dcm")

    # highdicom reads the file back as a Comprehensive 3D SR holding a TID 1500 report
    back = hd.sr.srread(path)
    assert isinstance(back, hd.sr.Comprehensive3DSR)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    report = hd.sr.MeasurementReport.from_sequence(back.content)
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(ge_headers) + 1  # one per slice + the series summary

    parsed = read_series_sr(pydicom.dcmread(path))
    got = {s["sop_instance_uid"]: s for s in parsed["slices"]}
    assert set(got) == {h.SOPInstanceUID for h in ge_headers}  # every slice referenced once
    assert len(parsed["slices"]) == len(ge_headers)
    for s in slices:
        g = got[s.sop_instance_uid]
        assert g["score"] == pytest.approx(s.score, abs=1e-6)
        assert g["score_low"] == pytest.approx(s.score_low, abs=1e-6)
        assert g["score_high"] == pytest.approx(s.score_high, abs=1e-6)
    summary = summary_for(slices).flat()
    for key in ("mean_score", "min_score", "p10_score", "fraction_below", *PHYSICS):
        assert parsed["summary"][key] == pytest.approx(summary[key], abs=1e-6)
    assert parsed["summary"]["verdict"] == "WARN"
    assert parsed["summary"]["verdict_text"] == "CT image quality verdict: Warning"
    assert parsed["summary"]["n_slices"] == len(ge_headers)
    assert parsed["summary"]["n_skipped"] == 1
    assert parsed["algorithm"] == MODEL_INFO

    # the SR joins the source study as a new series; patient module copied, evidence listed
    src = ge_headers[0]
    assert back.StudyInstanceUID == src.StudyInstanceUID
    assert back.PatientID == src.PatientID
    assert back.SeriesInstanceUID != src.SeriesInstanceUID
    assert back.Modality == "SR" and back.InstanceNumber == 1
    assert parsed["source_series_instance_uid"] == src.SeriesInstanceUID
    evidence = {str(sop_uid) for _study, _series, sop_uid, _cls in back.get_evidence()}
    assert evidence == {h.SOPInstanceUID for h in ge_headers}

    # the series summary comes first; each slice group references its source image by SOP class + instance
    assert groups[0].tracking_identifier == sr_mod.SERIES_SUMMARY_ID
    assert groups[1].source_images[0].referenced_sop_class_uid == src.SOPClassUID


def test_sr_is_valid_for_dcmtk(ge_headers, tmp_path):
    dsrdump = shutil.which("dsrdump", path="/usr/bin")
    if dsrdump is None:
        pytest.skip("DCMTK dsrdump not installed")
    sr, _ = _build(ge_headers[:3], verdict="FAIL")
    path = write_validated(sr, tmp_path / "sr.dcm")
    res = subprocess.run([dsrdump, "-Ec", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "Comprehensive 3D SR" in res.stdout
    assert '(QCFAIL,99QCNODE,"Fail")' in res.stdout
    assert "95th Percentile Value of population" in res.stdout
    assert "warning" not in res.stderr.lower() and "error" not in res.stderr.lower()


def test_sr_is_deterministic(ge_headers, tmp_path):
    a, _ = _build(ge_headers)
    b, _ = _build(list(ge_headers))
    assert sr_bytes(a) == sr_bytes(b)  # a retried write is byte-identical
    assert a.SOPInstanceUID == sr_mod.sr_sop_uid(ge_headers[0].SeriesInstanceUID, "0.1.0", 1)

    v2, _ = _build(ge_headers, version=2)  # the series was reopened and scored again
    assert v2.SeriesInstanceUID == a.SeriesInstanceUID
    assert v2.SOPInstanceUID != a.SOPInstanceUID
    assert v2.InstanceNumber == 2 and v2.SeriesNumber == a.SeriesNumber

    other_model, _ = _build(ge_headers, model=ModelIdentity("mdiqa-test", "0.2.0"))
    assert other_model.SeriesInstanceUID != a.SeriesInstanceUID

    # the content time is what the caller passes, not the wall clock
    assert str(a.ContentDate) == "20240501" and str(a.ContentTime).startswith("123015")
    assert a.InstanceCreationDate == a.ContentDate


def test_sr_of_another_series_gets_other_uids(shared_ct, ge_headers):
    philips = [h for h in read_headers(shared_ct / "philips_head_phantom", limit=4)
               if h.get("ImageType") and "LOCALIZER" not in list(h.ImageType)][:2]
    a, _ = _build(ge_headers[:2])
    b, _ = _build(philips)
    assert a.SeriesInstanceUID != b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID
    assert b.StudyInstanceUID == philips[0].StudyInstanceUID


def test_sr_frame_reference_for_multiframe(ge_headers, tmp_path):
    headers = [copy.deepcopy(ge_headers[0])]
    headers[0].SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # pretend Enhanced CT (multi-frame IOD)
    headers[0].NumberOfFrames = 2
    slices = [SliceResult(headers[0].SOPInstanceUID, score=2.5, score_low=2.0, score_high=3.0, frame=f)
              for f in (1, 2)]
    sr = build_series_sr(headers, slices, summary_for(slices, "PASS"), MODEL, 1, content_datetime=WHEN)
    parsed = read_series_sr(sr)
    assert [s["frame"] for s in parsed["slices"]] == [1, 2]
    single = build_series_sr(ge_headers[:1], slices[:1], summary_for(slices[:1], "PASS"), MODEL, 1,
                             content_datetime=WHEN)  # a single-frame object: no frame reference
    assert read_series_sr(single)["slices"][0]["frame"] is None
    assert parsed["summary"]["verdict"] == "PASS"
    for name, ds in (("multiframe.dcm", sr), ("single.dcm", single)):
        write_validated(ds, tmp_path / name)


@pytest.mark.parametrize("mutate, message", [  # (slices, summary, headers) -> (slices, summary)
    (lambda sl, su, hd_: (sl + [SliceResult("1.2.3.4", score=1, score_low=0, score_high=2)], su),
     "no source header"),
    (lambda sl, su, hd_: (sl, replace(su, verdict="MAYBE")), "verdict must be one of"),
    (lambda sl, su, hd_: ([replace(sl[0], score_low=sl[0].score + 1)] + sl[1:], su), "not inside its interval"),
    (lambda sl, su, hd_: (hd_[0].__delattr__("StudyInstanceUID") or sl, su), "lacks StudyInstanceUID"),
])
def test_sr_rejects_bad_input(ge_headers, mutate, message):
    headers = [copy.deepcopy(h) for h in ge_headers[:3]]
    slices = slice_scores(headers)
    summary = summary_for(slices)
    slices, summary = mutate(slices, summary, headers)
    with pytest.raises(SRBuildError, match=message):
        build_series_sr(headers, slices, summary, MODEL, 1, content_datetime=WHEN)


def test_sr_needs_slices_and_model(ge_headers):
    with pytest.raises(SRBuildError, match="no scored slices"):
        build_series_sr(ge_headers[:1], [], summary_for(slice_scores(ge_headers[:1])), MODEL, 1)
    slices = slice_scores(ge_headers[:1])
    with pytest.raises(SRBuildError, match="name and a version"):
        build_series_sr(ge_headers[:1], slices, summary_for(slices), ModelIdentity("x", ""), 1)


def test_sr_times_are_marked_utc(ge_headers, tmp_path):
    """DICOM reads dates and times without an offset as local time: the SR says they are UTC, and a
    content time given in another zone is converted."""
    cest = dt.timezone(dt.timedelta(hours=2))
    sr, _ = _build(ge_headers[:2], when=dt.datetime(2026, 6, 1, 1, 30, tzinfo=cest))
    back = pydicom.dcmread(write_validated(sr, tmp_path / "sr.dcm"))
    assert back.TimezoneOffsetFromUTC == "+0000"
    assert (back.ContentDate, back.ContentTime[:4]) == ("20260531", "2330")
    assert (back.InstanceCreationDate, back.InstanceCreationTime) == (back.ContentDate, back.ContentTime)


def _codes(items) -> set[tuple[str, str, str]]:
    return {(c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning) for c in items}


def test_sr_follows_ihe_ai_results(ge_headers, tmp_path):
    """IHE AIR: the algorithm in Contributing Equipment with a Device UID that is also the observer's,
    an Image Library, standard codes for the physics and percentiles, private schemes declared,
    the Patient module consistent (DeidentificationMethod with PatientIdentityRemoved YES)."""
    sr, slices = _build(ge_headers, verdict="FAIL")
    back = pydicom.dcmread(write_validated(sr, tmp_path / "sr.dcm"))

    device_uid = sr_mod.algorithm_device_uid(MODEL_INFO["name"], MODEL_INFO["version"])
    assert device_uid.startswith("2.25.") and len(device_uid) <= 64
    algo = [e for e in back.ContributingEquipmentSequence if e.get("DeviceUID")]
    assert len(algo) == 1
    assert _codes(algo[0].PurposeOfReferenceCodeSequence) == {("1630", "99IHE", "Processing Algorithm")}
    assert (algo[0].Manufacturer, algo[0].ManufacturerModelName, algo[0].SoftwareVersions, algo[0].DeviceUID) == (
        "qcnode", MODEL_INFO["name"], MODEL_INFO["version"], device_uid)
    retrained = sr_mod.algorithm_device_uid(MODEL_INFO["name"], "0.2.0")
    assert retrained != device_uid and sr_mod.algorithm_device_uid(MODEL_INFO["name"], "0.1.0") == device_uid

    hsr = hd.sr.Comprehensive3DSR.from_dataset(back)
    report = hd.sr.MeasurementReport.from_sequence(hsr.content)
    assert report.get_observer_contexts()[0].observer_identifying_attributes.uid == device_uid
    library = [i for i in back.ContentSequence
               if i.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImageLibrary.value]
    assert len(library) == 1
    entries = [e for g in library[0].ContentSequence for e in g.ContentSequence if e.ValueType == "IMAGE"]
    assert {e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in entries} == {
        h.SOPInstanceUID for h in ge_headers}

    summary = report.get_image_measurement_groups()[0]
    names = {(m.name.value, m.name.scheme_designator) for m in summary.get_measurements()}
    assert {("113980", "DCM"), ("113930", "DCM"), ("113830", "DCM"), ("QC006", "99QCNODE")} <= names
    derivations = {m.derivation.value for m in summary.get_measurements() if m.derivation}
    assert "371890005" in derivations  # SCT 10th percentile
    first_slice = report.get_image_measurement_groups()[1]
    assert {m.derivation.value for m in first_slice.get_measurements() if m.derivation} == {"371888009", "371889001"}
    assert [e.value.value for e in summary.get_qualitative_evaluations()] == ["QCFAIL"]

    declared = {i.CodingSchemeDesignator for i in back.CodingSchemeIdentificationSequence}
    assert {"99QCNODE", "99IHE"} <= declared
    assert back.PatientIdentityRemoved == "YES" and back.DeidentificationMethod


def test_sr_without_physics_leaves_it_out(ge_headers, tmp_path):
    slices = slice_scores(ge_headers[:2])
    summary = summary_for(slices, physics=False)
    sr = build_series_sr(ge_headers[:2], slices, summary, MODEL, 1, content_datetime=WHEN)
    parsed = read_series_sr(pydicom.dcmread(write_validated(sr, tmp_path / "sr.dcm")))
    assert not set(PHYSICS) & set(parsed["summary"])


def test_sr_passes_pixelmed_validator(ge_headers, tmp_path):
    sr, _ = _build(ge_headers[:3], verdict="FAIL")
    warnings = pixelmed_sr_validator(write_validated(sr, tmp_path / "sr.dcm"))
    # accepted (README, Interoperability): PixelMed's TID 1501 lacks qualitative evaluations and text
    assert all("Content Item not in template" in w for w in warnings), warnings


def test_quality_issue_kos_lists_failing_slices(ge_headers, tmp_path):
    from qcnode.report.kos import FlaggedSlice, build_quality_issue_kos, failing_slices, kos_sop_uid
    slices = slice_scores(ge_headers[:4])  # 1.0, 1.1, 1.2, 1.3
    assert [f.score for f in failing_slices(slices, 1.15)] == [1.0, 1.1]
    # a FAIL by the series mean alone still flags its worst slice
    assert failing_slices(slices, 0.5) == [FlaggedSlice(slices[0].sop_instance_uid, 1.0)]
    kos = build_quality_issue_kos(ge_headers, failing_slices(slices, 1.15), MODEL, 2, 1.15,
                                  content_datetime=WHEN)
    back = pydicom.dcmread(write_validated(kos, tmp_path / "kos.dcm"))
    assert back.SOPInstanceUID == kos_sop_uid(ge_headers[0].SeriesInstanceUID, MODEL_INFO["version"], 2)
    assert back.ConceptNameCodeSequence[0].CodeValue == "113010"
    assert back.StudyInstanceUID == ge_headers[0].StudyInstanceUID and back.InstanceNumber == 2
    device = [e for e in back.ContributingEquipmentSequence if e.get("DeviceUID")]
    assert device[0].DeviceUID == sr_mod.algorithm_device_uid(MODEL_INFO["name"], MODEL_INFO["version"])
    with pytest.raises(SRBuildError, match="at least one flagged slice"):
        build_quality_issue_kos(ge_headers, [], MODEL, 1, 1.15)


@pytest.mark.parametrize("sex", ["m", "X"])
def test_patient_sex_highdicom_refuses_is_left_empty(ge_headers, sex):
    from qcnode.report.kos import build_quality_issue_kos, failing_slices
    headers = [copy.deepcopy(h) for h in ge_headers[:3]]
    for h in headers:
        h.PatientSex = sex
    sr, slices = _build(headers)
    assert sr.PatientSex == ""
    kos = build_quality_issue_kos(headers, failing_slices(slices, 4.0), MODEL, 1, 4.0, content_datetime=WHEN)
    assert kos.PatientSex == ""


def test_multiframe_table_agrees_with_highdicoms_tables_of_the_standard():
    """qcnode/report/sr.py keeps its own table instead of importing highdicom's private helper
    (qcnode/net/ is the only fenced package); for the CT image IODs both must agree."""
    from highdicom._standard_utils import is_multiframe_image as highdicoms
    from pydicom.dataset import Dataset

    from qcnode.dicom.pixels import CT_IMAGE_CLASSES
    for uid in sorted(CT_IMAGE_CLASSES | {"1.2.840.10008.5.1.4.1.1.2.2"}):  # + Legacy Converted Enhanced CT
        ds = Dataset()
        ds.SOPClassUID = uid
        assert sr_mod.is_multiframe_image(ds) == highdicoms(ds), uid


def test_load_standard_tables_loads_highdicoms_tables():
    from highdicom import _standard_utils as standard
    tables = (standard.get_sop_class_iod_map, standard.get_iod_module_map, standard.get_module_attribute_map)
    for table in tables:
        table.cache_clear()
    sr_mod.load_standard_tables()
    assert [table.cache_info().currsize for table in tables] == [1, 1, 1]
