"""Helpers for the IQA tests: a tiny LDCTIQAC2023-layout data set with a known noise -> score law."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

TINY_CONFIG = {  # a very small network so tests stay fast on 2 cores
    "vit_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
    "convnext_kwargs": {"dims": (16, 24, 32, 48), "depths": (1, 1, 1, 1)},
    "input_size": 64, "fuse_dim": 32, "align_dim": 8,
}


def noisy_phantom(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """A soft-tissue disk (40 HU) in air with white noise of ``sigma`` HU (float32 HU)."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    img = np.where(r < size * 0.42, 40.0, -1000.0)
    img = img + rng.normal(0.0, sigma, img.shape)
    return img.astype(np.float32)


def label_for_sigma(sigma: float) -> float:
    """The tiny data set's ground truth: 4 at 5 HU noise, one point less per 15 HU, rounded to 0.2."""
    return float(np.clip(np.round((4.0 - (sigma - 5.0) / 15.0) * 5) / 5, 0.0, 4.0))


def make_tiny_dataset(root: Path, n_sources: int = 6, size: int = 64, seed: int = 0,
                      doses: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1), split: str = "train",
                      labeled: bool = True) -> Path:
    """Write ROOT/image/*.tif + ROOT/<split>.json + ROOT/meta.csv (noise ~ 1/sqrt(dose))."""
    import tifffile

    rng = np.random.default_rng(seed)
    (root / "image").mkdir(parents=True, exist_ok=True)
    labels, rows = {}, []
    for s in range(n_sources):
        base = rng.uniform(5.0, 10.0)
        for d in doses:
            sigma = base / np.sqrt(d)
            name = f"{len(rows):04d}.tif"
            tifffile.imwrite(root / "image" / name, noisy_phantom(sigma, size, rng))
            lab = label_for_sigma(sigma)
            labels[name] = lab
            rows.append({"file": name, "split": split, "source_id": f"{split}-{s}", "dose_fraction": d,
                         "views": 720, "noise_hu": round(sigma, 3), "label": lab})
    if labeled:
        (root / f"{split}.json").write_text(json.dumps(labels))
    with (root / "meta.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root
