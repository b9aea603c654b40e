"""What kind of acquisition a CT slice is, from its header: how its kernel is read (smooth/standard
for soft tissue, sharp for lung or bone), whether it is a routine diagnostic scan, head or body."""
from __future__ import annotations

import re
from pathlib import PurePath

from qcnode.dicom.dose import has_head_keyword

# By vendor naming: Siemens B/Br/I/D/Q<number> (sharp from 45, as D45f), Canon FC<number> (sharp
# from 30), GE names, Philips letters. Anything else is "unknown".
SMOOTH_NAMES = {"STANDARD", "SOFT", "B", "A", "C", "UB"}
SHARP_NAMES = {"LUNG", "BONE", "BONEPLUS", "EDGE", "DETAIL", "L", "D", "E", "YA", "YB", "YC"}
NUMBERED_KERNELS = ((re.compile(r"(?:^|[ .])(?:B|BR|I|D|Q)(\d{2})[A-Z]?$"), 45), (re.compile(r"^FC(\d{2})$"), 30))


def kernel_class(kernel: str) -> str:
    """"smooth" (standard/soft-tissue kernels), "sharp" (lung/bone/edge) or "unknown"."""
    name = " ".join(str(kernel).upper().split())
    if name in SMOOTH_NAMES:
        return "smooth"
    if name in SHARP_NAMES:
        return "sharp"
    for pattern, sharp_from in NUMBERED_KERNELS:
        m = pattern.search(name)
        if m:
            return "sharp" if int(m.group(1)) >= sharp_from else "smooth"
    return "unknown"


# Header words of CT that is not a routine diagnostic scan, however it is reconstructed. Exam-level
# (any of series, protocol and study description): the CT of a PET/CT, CT-guided biopsies and image
# guidance. Series-level (the series description only, since a diagnostic run of a protocol may name
# its test bolus): bolus-tracking and test-bolus monitors, localisation scans and pre-scans.
EXAM_NOT_DIAGNOSTIC = re.compile(r"PET(?=CT|[^A-Z]|$)|CTAC|BIOPS|GUIDAN|FLUORO|(?<![A-Z])(?:BX|FNA)(?![A-Z])")
SERIES_NOT_DIAGNOSTIC = re.compile(r"SMART ?PREP|BOLUS|MONITOR|LOCALI[SZ](?!ED)|PRE ?SCAN")
DESCRIPTION_TAGS = ("SeriesDescription", "ProtocolName", "StudyDescription")


def not_diagnostic_reason(ds) -> str:
    """The header words that make a slice other than a routine diagnostic scan ("" when none)."""
    exam = " | ".join(str(ds.get(tag, "") or "") for tag in DESCRIPTION_TAGS).upper()
    series = str(ds.get("SeriesDescription", "") or "").upper()
    found = {m.group(0) for m in EXAM_NOT_DIAGNOSTIC.finditer(exam)}
    found |= {m.group(0) for m in SERIES_NOT_DIAGNOSTIC.finditer(series)}
    return ", ".join(sorted(found))


RANGE_WORDS = re.compile(r"(?<![A-Z])(?:TO|WB|WHOLE ?BODY|THIGH|PELVIS|BODY)(?![A-Z])")  # "PELVIS TO HEAD"
HEAD_FOLDER = re.compile(r"(?:^|[_\-. ])head(?:$|[_\-. ])", re.IGNORECASE)


def anatomy(ds, path: str = "") -> str:
    """"head" or "body": BodyPartExamined when the header has it; else protocol and series description
    naming the head and no scan range ("Skull to thigh" is a body scan); else a folder named head."""
    part = str(ds.get("BodyPartExamined", "") or "").upper()
    if part:
        return "head" if has_head_keyword(part) else "body"
    text = " ".join(str(ds.get(k, "") or "") for k in ("ProtocolName", "SeriesDescription")).upper().replace("_", " ")
    if RANGE_WORDS.search(text):
        return "body"
    if has_head_keyword(text) or any(HEAD_FOLDER.search(folder) for folder in PurePath(path).parent.parts):
        return "head"
    return "body"
