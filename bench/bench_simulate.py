"""Benchmark: the torch projector/FBP against scikit-image, the fan-beam projector/FBP, one source
through the simulator in both geometries, and the per-slice physics (patient outline, Dw, global
noise level) on 512x512 real slices. Prints numbers only.

    .venv/bin/python bench/bench_simulate.py [--size 256] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_CT = ROOT.parent / "shared" / "data" / "ct"


def _time(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import numpy as np
    import torch
    from skimage.transform import iradon, radon

    from qcnode.dicom import physics
    from qcnode.simulation import ct_projector, fan_beam, simulate, sources
    from qcnode.simulation.phantoms import make_phantom

    torch.set_num_threads(args.threads)
    n = args.size
    img = make_phantom("body", 1, n).hu.astype(np.float64) / 1000.0 + 1.0
    for views in (720, 180):
        theta = ct_projector.default_angles(views)
        t_sk_fp = _time(lambda: radon(img, theta, circle=False), 1)
        sino = radon(img, theta, circle=False)
        t_sk_bp = _time(lambda: iradon(sino, theta, output_size=n, filter_name="shepp-logan", circle=False), 1)
        t_fp = _time(lambda: ct_projector.forward_project(img, theta))
        t_bp = _time(lambda: ct_projector.fbp(sino.T, theta, n, "shepp-logan"))
        ours = ct_projector.fbp(sino.T, theta, n, "shepp-logan").numpy()
        ref = iradon(sino, theta, output_size=n, filter_name="shepp-logan", circle=False)
        print(f"{n}x{n}, {views} views: skimage radon {t_sk_fp:.2f} s, iradon {t_sk_bp:.2f} s | torch forward "
              f"{t_fp:.2f} s, FBP {t_bp:.2f} s | max |FBP diff| / max = {np.abs(ours - ref).max() / np.abs(ref).max():.2e}")
    geo = fan_beam.geometry(n, 1.4)
    for views in (720, 64):
        betas = fan_beam.view_angles(views)
        t_fp = _time(lambda: fan_beam.forward_project(img[None], geo, betas))
        sino = fan_beam.forward_project(img[None], geo, betas)
        t_bp = _time(lambda: fan_beam.fbp(sino, geo, betas, "shepp-logan"))
        print(f"{n}x{n}, {views} fan-beam views over 360 degrees ({geo.channels} channels): forward {t_fp:.2f} s, "
              f"FBP {t_bp:.2f} s")
    spec = sources.SourceSpec("phantom:body:1", "phantom", "body", "phantom_body", "train", seed=1,
                               variants=[(d, v) for v in (720, 360, 180) for d in (1.0, 0.5, 0.25, 0.1)])
    for geometry in ("fan", "parallel"):
        t_src = _time(lambda: simulate.simulate_sources([spec], n, geometry), 1)
        print(f"one phantom, 12 dose/view variants at {n}x{n}, {geometry}-beam: {t_src:.2f} s "
              f"({t_src / 12 * 1000:.0f} ms/image)")
    if SHARED_CT.is_dir():
        from qcnode.dicom.pixels import load_slices
        slices = [load_slices(p)[0] for p in sorted((SHARED_CT / "ge_head").glob("*.dcm"))[:10]]
        for name, fn in (("patient_mask", lambda s: physics.patient_mask(s.hu)),
                         ("water_equivalent_diameter_cm", lambda s: physics.water_equivalent_diameter_cm(
                             s.hu, s.pixel_spacing_mm)),
                         ("global_noise_level", lambda s: physics.global_noise_level(s.hu, s.pixel_spacing_mm))):
            per = _time(lambda: [fn(s) for s in slices]) / len(slices)
            print(f"{name}: {per * 1000:.1f} ms per 512x512 slice")


if __name__ == "__main__":
    main()
