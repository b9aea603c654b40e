"""The coded concepts and units of qcnode's SR, shared by the builder (``sr``) and the reader (``read``).

Private codes use the scheme 99QCNODE (declared in every SR's Coding Scheme Identification
Sequence); IHE AI Results' purpose of reference uses 99IHE. ``LEGACY_P10`` and the two
uncertainty ranges are only read: SRs written before IHE AIR used them.
"""
from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

QC_SCHEME = "99QCNODE"
IHE_SCHEME = "99IHE"

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
PROCESSING_ALGORITHM = Code("1630", IHE_SCHEME, "Processing Algorithm")  # IHE AIR's purpose of reference
UPPER_UNCERTAINTY = Code("371886008", "SCT", "+, range of upper measurement uncertainty")
LOWER_UNCERTAINTY = Code("371885007", "SCT", "-, range of lower measurement uncertainty")
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")

HU_UNIT = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
CM_UNIT = Code("cm", "UCUM", "centimeter")
MGY_UNIT = Code("mGy", "UCUM", "milligray")
SCORE_UNIT = Code("{score}", "UCUM", "score")
NO_UNIT = Code("1", "UCUM", "no units")
SLICES_UNIT = Code("{slices}", "UCUM", "slices")
IMAGES_UNIT = Code("{images}", "UCUM", "images")

VERDICT_CODES = {
    "PASS": Code("QCPASS", QC_SCHEME, "Pass"),
    "WARN": Code("QCWARN", QC_SCHEME, "Warning"),
    "FAIL": Code("QCFAIL", QC_SCHEME, "Fail"),
}
VERDICT_TEXT = {"PASS": "Pass", "WARN": "Warning", "FAIL": "Fail"}
# (SeriesPhysics field, concept, unit, derivation across slices) of the per-series physics
PHYSICS_MEASUREMENTS = (("noise_hu", NOISE, HU_UNIT, codes.SCT.Median),
                        ("dw_cm", WATER_EQUIVALENT_DIAMETER, CM_UNIT, codes.SCT.Mean),
                        ("ssde_mgy", SSDE, MGY_UNIT, codes.SCT.Mean),
                        ("ctdivol_mgy", MEAN_CTDIVOL, MGY_UNIT, None))
# (SeriesSummary field, derivation) of the series' score statistics
SCORE_STATISTICS = (("mean_score", codes.SCT.Mean), ("min_score", codes.SCT.Minimum), ("p10_score", P10))
SERIES_SUMMARY_ID = "series summary"  # tracking identifier of the series-level group
