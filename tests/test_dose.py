"""Header dose fields (real Philips/GE series) and CT Radiation Dose SR parsing (SR built with highdicom)."""
from __future__ import annotations

import copy

import highdicom as hd
import pydicom
import pytest
from highdicom.sr.sop import _SR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.tag import Tag

from qcnode.dicom.dose import (XRAY_RADIATION_DOSE_SR, dose_fields, is_dose_sr, parse_dose_sr,
                               ssde_phantom)

PHILIPS_CTDIVOL = 18.36697247706422


def test_philips_phantom_series_yields_header_ctdivol(shared_ct):
    files = sorted((shared_ct / "philips_head_phantom").glob("I*.dcm"))
    assert len(files) == 28
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    fields = [dose_fields(ds) for ds in headers]
    # per-slice CTDIvol (tube-current modulation): each equals its header (0018,9345) ...
    assert [f["ctdivol_mgy"] for f in fields] == [pytest.approx(float(ds.CTDIvol)) for ds in headers]
    assert 5.0 < min(f["ctdivol_mgy"] for f in fields) < max(f["ctdivol_mgy"] for f in fields) < 20.0
    # ... and scales with the slice's mAs (CTDIvol / mAs is the scanner's constant at 120 kVp)
    ratios = [f["ctdivol_mgy"] / f["exposure_mas"] for f in fields]
    assert max(ratios) / min(ratios) < 1.02
    f = next(x for x, p in zip(fields, files) if p.name == "I10.dcm")
    assert f["ctdivol_mgy"] == pytest.approx(PHILIPS_CTDIVOL)
    assert (f["kvp"], f["tube_current_ma"], f["exposure_mas"]) == (120.0, 112.0, 143.0)
    assert f["pitch"] == pytest.approx(0.391)  # SpiralPitchFactor wins over feed / collimation
    assert (f["kernel"], f["slice_thickness_mm"]) == ("UB", 5.0)
    assert f["protocol_name"] == "1A TRAUMA/PLAIN HEAD DM /Head" and f["series_description"] == "STD BRAIN 5MM"
    assert (f["manufacturer"], f["model_name"], f["station_name"], f["device_serial"]) == (
        "Philips", "Ingenuity CT", "CT4", "336067")
    assert len({x["slice_location"] for x in fields}) == 28
    assert ssde_phantom(f["protocol_name"], f["body_part"]) == "head"


def test_ge_head_has_no_ctdivol_tag(shared_ct):
    f = dose_fields(pydicom.dcmread(shared_ct / "ge_head" / "01.dcm", stop_before_pixels=True))
    assert f["ctdivol_mgy"] is None and f["pitch"] is None and f["protocol_name"] is None
    assert (f["kvp"], f["kernel"], f["manufacturer"]) == (120.0, "STD+", "GE MEDICAL SYSTEMS")
    assert ssde_phantom(f["protocol_name"], f["body_part"]) == "head"  # BodyPartExamined HEAD


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_malformed_and_derived_values_never_raise():
    ds = Dataset()
    # raw (undecoded) elements as a file would carry them: bad DS / IS values
    ds[Tag(0x0018, 0x9345)] = RawDataElement(Tag(0x0018, 0x9345), "FD", 3, b"abc", 0, False, True)
    ds[Tag(0x0018, 0x0060)] = RawDataElement(Tag(0x0018, 0x0060), "DS", 4, b"abc ", 0, False, True)
    ds[Tag(0x0018, 0x1151)] = RawDataElement(Tag(0x0018, 0x1151), "IS", 2, b"x1", 0, False, True)
    ds.TableFeedPerRotation = 40.0
    ds.TotalCollimationWidth = 40.0
    ds.ExposureInuAs = 150000
    ds.ConvolutionKernel = ["FC13", "AIDR"]
    ds.ProtocolName = "  "
    f = dose_fields(ds)
    assert f["ctdivol_mgy"] is None and f["kvp"] is None and f["tube_current_ma"] is None
    assert f["pitch"] == pytest.approx(1.0) and f["exposure_mas"] == pytest.approx(150.0)
    assert f["kernel"] == "FC13\\AIDR" and f["protocol_name"] is None
    assert dose_fields(Dataset())["ctdivol_mgy"] is None


def test_enhanced_ct_functional_groups():
    exposure, xray, acq, pm = Dataset(), Dataset(), Dataset(), Dataset()
    exposure.CTDIvol = 12.5
    xray.KVP = 100
    acq.SpiralPitchFactor = 0.9
    pm.SliceThickness = 1.25
    shared = Dataset()
    shared.CTExposureSequence = [exposure]
    shared.CTXRayDetailsSequence = [xray]
    shared.CTAcquisitionDetailsSequence = [acq]
    shared.PixelMeasuresSequence = [pm]
    ds = Dataset()
    ds.SharedFunctionalGroupsSequence = [shared]
    f = dose_fields(ds)
    assert (f["ctdivol_mgy"], f["kvp"], f["pitch"], f["slice_thickness_mm"]) == (12.5, 100.0, 0.9, 1.25)


def test_ssde_phantom_rule():
    assert ssde_phantom("CHEST ROUTINE", "CHEST") == "body"
    assert ssde_phantom("CT SINUS", None) == "head"
    assert ssde_phantom(None, "HEADNECK") == "head"
    assert ssde_phantom("NECK", "NECK") == "body"
    assert ssde_phantom("Surface rendering", None) == "body"  # FACE only as a word start
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "113691", "DCM", "IEC Body Dosimetry Phantom"
    ds = Dataset()
    ds.CTDIPhantomTypeCodeSequence = [code]
    assert ssde_phantom("HEAD ROUTINE", "HEAD", ds) == "body"  # the header's phantom wins


# ---------------------------------------------------------------- CT Radiation Dose SR (TID 10011)

def _dcm(value: str, meaning: str) -> Code:
    return Code(value, "DCM", meaning)


MGY = Code("mGy", "UCUM", "mGy")
MGYCM = Code("mGy.cm", "UCUM", "mGy.cm")


def _acquisition(protocol: str, region: Code, ctdivol: float, dlp: float, head: bool) -> hd.sr.ContainerContentItem:
    acq = hd.sr.ContainerContentItem(_dcm("113819", "CT Acquisition"), relationship_type="CONTAINS")
    dose = hd.sr.ContainerContentItem(_dcm("113829", "CT Dose"), relationship_type="CONTAINS")
    phantom = (_dcm("113690", "IEC Head Dosimetry Phantom") if head else _dcm("113691", "IEC Body Dosimetry Phantom"))
    dose.ContentSequence = hd.sr.ContentSequence([
        hd.sr.NumContentItem(_dcm("113830", "Mean CTDIvol"), ctdivol, MGY, relationship_type="CONTAINS"),
        hd.sr.CodeContentItem(_dcm("113835", "CTDIw Phantom Type"), phantom, relationship_type="CONTAINS"),
        hd.sr.NumContentItem(_dcm("113838", "DLP"), dlp, MGYCM, relationship_type="CONTAINS"),
    ])
    acq.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(Code("125203", "DCM", "Acquisition Protocol"), protocol, relationship_type="CONTAINS"),
        hd.sr.CodeContentItem(_dcm("123014", "Target Region"), region, relationship_type="CONTAINS"),
        hd.sr.CodeContentItem(_dcm("113820", "CT Acquisition Type"), Code("116152004", "SCT", "Spiral Acquisition"),
                              relationship_type="CONTAINS"),
        dose,
    ])
    return acq


def _dose_tree(with_total: bool = True) -> hd.sr.ContainerContentItem:
    root = hd.sr.ContainerContentItem(_dcm("113701", "X-Ray Radiation Dose Report"), template_id="10011")
    accumulated = hd.sr.ContainerContentItem(_dcm("113811", "CT Accumulated Dose Data"), relationship_type="CONTAINS")
    items = [hd.sr.NumContentItem(_dcm("113812", "Total Number of Irradiation Events"), 2,
                                  Code("{events}", "UCUM", "events"), relationship_type="CONTAINS")]
    if with_total:
        items.append(hd.sr.NumContentItem(_dcm("113813", "CT Dose Length Product Total"), 1034.5, MGYCM,
                                          relationship_type="CONTAINS"))
    accumulated.ContentSequence = hd.sr.ContentSequence(items)
    root.ContentSequence = hd.sr.ContentSequence([
        hd.sr.CodeContentItem(Code("121058", "DCM", "Procedure reported"), Code("77477000", "SCT", "CT"),
                              relationship_type="HAS CONCEPT MOD"),
        accumulated,
        _acquisition("HEAD ROUTINE", Code("69536005", "SCT", "Head"), 45.2, 800.0, head=True),
        _acquisition("NECK", Code("45048000", "SCT", "Neck"), 12.0, 234.5, head=False),
    ])
    return root


class XRayRadiationDoseSR(_SR):
    """The X-Ray Radiation Dose SR IOD via highdicom's SR base class (no public builder exists)."""

    def __init__(self, evidence, content, **kwargs):  # noqa: ANN001
        super().__init__(evidence=evidence, content=content, sop_class_uid=XRAY_RADIATION_DOSE_SR,
                         series_number=900, instance_number=1, manufacturer="Philips", is_complete=True,
                         **kwargs)


def _write_and_read(sr, tmp_path) -> Dataset:  # noqa: ANN001
    path = tmp_path / "dose_sr.dcm"
    sr.save_as(path)
    return pydicom.dcmread(path)


@pytest.fixture
def ct_evidence() -> Dataset:
    from pydicom import examples
    return copy.deepcopy(examples.ct)


def test_parse_xray_radiation_dose_sr(ct_evidence, tmp_path):
    sr = XRayRadiationDoseSR([ct_evidence], _dose_tree(), series_instance_uid=hd.UID(),
                             sop_instance_uid=hd.UID())
    ds = _write_and_read(sr, tmp_path)
    assert ds.SOPClassUID == XRAY_RADIATION_DOSE_SR and is_dose_sr(ds)
    parsed = parse_dose_sr(ds)
    assert parsed["total_dlp_mgycm"] == pytest.approx(1034.5)
    assert parsed["events"] == [
        {"protocol": "HEAD ROUTINE", "ctdivol_mgy": pytest.approx(45.2), "dlp_mgycm": pytest.approx(800.0),
         "phantom": "head", "target_region": "Head"},
        {"protocol": "NECK", "ctdivol_mgy": pytest.approx(12.0), "dlp_mgycm": pytest.approx(234.5),
         "phantom": "body", "target_region": "Neck"},
    ]


def test_enhanced_sr_with_tid_10011_and_missing_total(ct_evidence, tmp_path):
    sr = hd.sr.EnhancedSR([ct_evidence], _dose_tree(with_total=False), series_instance_uid=hd.UID(),
                          series_number=901, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="x")
    ds = _write_and_read(sr, tmp_path)
    assert is_dose_sr(ds)
    parsed = parse_dose_sr(ds)
    assert parsed["total_dlp_mgycm"] == pytest.approx(800.0 + 234.5)  # sum of events when no total
    assert [e["protocol"] for e in parsed["events"]] == ["HEAD ROUTINE", "NECK"]


def test_other_objects_are_not_dose_srs(ct_evidence, tmp_path, shared_ct):
    assert not is_dose_sr(pydicom.dcmread(shared_ct / "philips_head_phantom" / "I10.dcm", stop_before_pixels=True))
    root = hd.sr.ContainerContentItem(Code("126000", "DCM", "Imaging Measurement Report"), template_id="1500")
    root.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(Code("121071", "DCM", "Finding"), "none", relationship_type="CONTAINS")])
    sr = hd.sr.EnhancedSR([ct_evidence], root, series_instance_uid=hd.UID(), series_number=902,
                          sop_instance_uid=hd.UID(), instance_number=1, manufacturer="x")
    ds = _write_and_read(sr, tmp_path)
    assert not is_dose_sr(ds)
    assert parse_dose_sr(ds) == {"total_dlp_mgycm": None, "events": []}
    assert parse_dose_sr(Dataset()) == {"total_dlp_mgycm": None, "events": []}
