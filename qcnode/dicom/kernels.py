"""Reconstruction kernels by how they are read: smooth/standard (soft tissue) or sharp (lung, bone)."""
from __future__ import annotations

import re

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
