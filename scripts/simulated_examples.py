"""Figure of simulated images next to the original slice, for the model card.

Usage: python scripts/simulated_examples.py SIMULATED_FOLDER OUT.png [--split val] [--series S ...]

Reads SIMULATED_FOLDER/<split>/meta.csv and the tifs ``qcnode simulate`` wrote; for each series (default:
the first three real series of the split) takes its middle source slice and shows it as acquired, at 25 %
dose, at 256 views, at 50 % dose and 128 views, and at 64 views, in the soft-tissue window (W350/L40),
with the synthetic label and the noise measure of each.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tifffile  # noqa: E402

COLUMNS = (("as acquired", 1.0, 720), ("25 % dose", 0.25, 720), ("256 views", 1.0, 256),
           ("50 % dose, 128 views", 0.5, 128), ("64 views", 1.0, 64))
WINDOW = (40 - 175, 40 + 175)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--split", default="val")
    ap.add_argument("--series", nargs="*", default=None)
    args = ap.parse_args()
    with open(args.folder / args.split / "meta.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["source_kind"] == "real"]
    series = args.series or list(dict.fromkeys(r["series"] for r in rows))[:3]
    fig, axes = plt.subplots(len(series), len(COLUMNS), figsize=(2.1 * len(COLUMNS), 2.25 * len(series)),
                             squeeze=False)
    for i, name in enumerate(series):
        sources = list(dict.fromkeys(r["source_id"] for r in rows if r["series"] == name))
        if not sources:
            raise SystemExit(f"no real series {name!r} in {args.split}")
        source = sources[len(sources) // 2]
        variants = {(float(r["dose_fraction"]), int(r["views"])): r for r in rows if r["source_id"] == source}
        for j, (title, dose, views) in enumerate(COLUMNS):
            ax = axes[i][j]
            ax.axis("off")
            row = variants.get((dose, views))
            if row is None:
                continue
            img = tifffile.imread(args.folder / args.split / "image" / row["file"])
            ax.imshow(np.clip(img, *WINDOW), cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1])
            ax.set_title(f"{title}\nlabel {float(row['label']):.1f}, noise {float(row['noise_hu']):.0f} HU",
                         fontsize=6)
            if j == 0:
                ax.text(-0.05, 0.5, name, transform=ax.transAxes, rotation=90, va="center", ha="right", fontsize=6)
    fig.suptitle(f"qcnode simulate on {args.split} patients (W350/L40); left: the original slice; labels synthetic",
                 fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
