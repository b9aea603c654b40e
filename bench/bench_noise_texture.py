"""Check: does the scorer treat added noise differently when it is reconstructed at 512 px and averaged
to 256 px (as on a real scanner's 512 image) rather than reconstructed at 256 px (as ``qcnode simulate``
does)? Prints, per validation slice and dose, both scores at equal added-noise SD. Prints numbers only.

    .venv/bin/python bench/bench_noise_texture.py [--model models/mdiqa-default.pt] [--slices 6]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLINICAL = ROOT.parent / "shared" / "data" / "clinical_ct"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "mdiqa-default.pt"))
    ap.add_argument("--slices", type=int, default=6)
    args = ap.parse_args()
    import numpy as np
    import torch

    from qcnode.dicom.physics import patient_mask
    from qcnode.model.scorer import Scorer
    from qcnode.simulation import degrade, sources
    from qcnode.training import realval

    torch.set_num_threads(2)
    held_out = realval.SplitFile.read(ROOT / "models" / "clinical_split.json").validation_patients
    real = [r for r in sources.find_real_slices([CLINICAL / "lidc_idri_0001", CLINICAL / "lung_pet_ct_dx"])
            if r.patient in held_out and realval.kernel_class(r.kernel) == "smooth"]
    chosen = sources.thin_series(real, max(1, args.slices // 2))[: args.slices]
    scorer = Scorer.load(args.model)
    gen = torch.Generator().manual_seed(0)
    diffs = []
    for r in chosen:
        spec = sources.SourceSpec(r.source_id, "real", r.anatomy, r.series, "val", path=r.path)
        im512 = sources.load_source(spec, 512)
        im256 = sources.load_source(spec, 256)
        p512 = degrade.line_integrals(im512.hu, im512.pixel_spacing_mm)
        p256 = degrade.line_integrals(im256.hu, im256.pixel_spacing_mm)
        tissue = degrade.soft_tissue_mask(im256.hu, patient_mask(im256.hu))
        clean512 = degrade.reconstruct_hu(p512, 720, 512, im512.pixel_spacing_mm)[0]
        clean256 = degrade.reconstruct_hu(p256, 720, 256, im256.pixel_spacing_mm)[0]
        row = []
        for dose in (0.5, 0.25):
            target = im256.own_noise_hu * math.sqrt(1 / dose - 1)  # the extra noise SD qcnode simulate adds
            i0 = degrade.I0_BY_ANATOMY[r.anatomy]
            n256 = (degrade.reconstruct_hu(degrade.noisy_line_integrals(p256, i0, dose, gen), 720, 256,
                                           im256.pixel_spacing_mm)[0] - clean256).numpy()
            n512 = (degrade.reconstruct_hu(degrade.noisy_line_integrals(p512, i0, dose, gen), 720, 512,
                                           im512.pixel_spacing_mm)[0] - clean512).numpy()
            n512 = n512.reshape(256, 2, 256, 2).mean(axis=(1, 3))
            a = im256.hu + n256 * (target / n256[tissue].std())
            b = im256.hu + n512 * (target / n512[tissue].std())
            sa, sb = (q.score for q in scorer.score_hu([a.astype(np.float32), b.astype(np.float32)]))
            row.append(f"dose {dose:.2f}: 256-recon {sa:.2f}, 512-recon averaged {sb:.2f}")
            diffs.append(sb - sa)
        base = scorer.score_hu([im256.hu.astype(np.float32)])[0].score
        print(f"{r.series} {Path(r.path).name}: as acquired {base:.2f} (own noise {im256.own_noise_hu:.1f} HU); "
              + "; ".join(row), flush=True)
    print(f"mean score difference (512-recon averaged minus 256-recon) {np.mean(diffs):+.3f}, "
          f"range {min(diffs):+.2f} .. {max(diffs):+.2f}, n = {len(diffs)}")


if __name__ == "__main__":
    main()
