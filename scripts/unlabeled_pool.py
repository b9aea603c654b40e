"""Link the training patients' real slices into one folder: the unlabeled pool of ``qcnode train --unlabeled``.

Usage: python scripts/unlabeled_pool.py OUT [CLINICAL_FOLDER] [SPLIT_FILE]

Every slice of ``../shared/data/clinical_ct`` whose PatientID is not among the validation patients of
``models/clinical_split.json`` gets a symbolic link in OUT (named after its path), so the teachers'
pseudo-labels never see a validation patient.
"""
from __future__ import annotations

import sys
from pathlib import Path

from qcnode.training import realval
from qcnode.simulation import sources

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out = Path(sys.argv[1])
    clinical = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT.parent / "shared" / "data" / "clinical_ct"
    split = Path(sys.argv[3]) if len(sys.argv) > 3 else ROOT / "models" / "clinical_split.json"
    held_out = realval.SplitFile.read(split).validation_patients
    out.mkdir(parents=True, exist_ok=True)
    linked = 0
    for r in sources.find_real_slices([clinical]):
        if r.patient in held_out:
            continue
        link = out / "_".join(Path(r.path).resolve().relative_to(clinical.resolve()).parts)
        if not link.is_symlink():
            link.symlink_to(Path(r.path).resolve())
        linked += 1
    print(f"{linked} training-patient slices linked in {out}")


if __name__ == "__main__":
    main()
