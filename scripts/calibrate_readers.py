"""Fit the synthetic readers' tolerances to the LDCTIQAC2023 scale (run once; result goes into READERS).

Usage: python scripts/calibrate_readers.py SIMULATED_FOLDER

Uses the physical measures in SIMULATED_FOLDER/train/meta.csv (as ``qcnode simulate`` writes them)
of the real body slices reconstructed with a smooth or standard kernel (own noise <= 12 HU at
256 px): the kind of image the challenge was made from. It fits one scale factor each for the
noise tolerance, noise step, streak tolerance and streak step of the readers (their spread
around each other is kept) so that, over the challenge's recipe,

* the expected labels' 5/10/25/50/75/90/95th percentiles match the challenge's training labels
  (0.4 / 0.6 / 1.2 / 2.0 / 3.0 / 3.6 / 3.8, ``shared/LDCTIQAC.md``), and
* the routine slices as acquired (dose 1, full views) average at least 3.6 ("good" to "excellent"),
* and, since percentiles alone cannot tell noise from streaks, noise alone (no streaks) follows
  NOISE_ANCHORS: 16 HU at 256 px (a smooth-kernel abdomen at a quarter of routine dose) is 2.8,
  25 HU (a sharp kernel read in the soft-tissue window) is 2.0 ("fair").

Prints the fitted READERS and the resulting percentiles.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import optimize

from qcnode.simulation.degrade import FULL_VIEWS
from qcnode.simulation.readers import READERS, ROUTINE_OWN_NOISE_CAP_HU, Reader, expected_reader_mean

TARGET_PERCENTILES = (5, 10, 25, 50, 75, 90, 95)
TARGET_LABELS = np.array([0.4, 0.6, 1.2, 2.0, 3.0, 3.6, 3.8])
ROUTINE_MIN_MEAN = 3.6
SMOOTH_MAX_OWN_NOISE_HU = ROUTINE_OWN_NOISE_CAP_HU  # routine slices noisier than this are read as at it
NOISE_ANCHORS = ((16.0, 2.8), (25.0, 2.0))  # (noise HU at 256 px, expected label), no streaks


def scaled_readers(factors: np.ndarray) -> tuple[Reader, ...]:
    tn, gn, ts, gs = np.exp(factors)
    return tuple(replace(r, noise_tolerance_hu=r.noise_tolerance_hu * tn, noise_step=1 + (r.noise_step - 1) * gn,
                         streak_tolerance_hu=r.streak_tolerance_hu * ts, streak_step=1 + (r.streak_step - 1) * gs)
                 for r in READERS)


def main(folder: str) -> None:
    with open(Path(folder) / "train" / "meta.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["source_kind"] == "real" and r["anatomy"] == "body"
                and 0 < float(r["own_noise_hu"]) <= SMOOTH_MAX_OWN_NOISE_HU]
    noise = np.array([float(r["noise_hu"]) for r in rows])
    streak = np.array([float(r["streak_index"]) for r in rows])
    routine = np.array([float(r["dose_fraction"]) == 1.0 and int(r["views"]) == FULL_VIEWS for r in rows])
    print(f"{len(rows)} images of {len({r['source_id'] for r in rows})} smooth-kernel body slices")

    def expected(readers) -> np.ndarray:
        return np.array([expected_reader_mean(n, s, "body", readers) for n, s in zip(noise, streak)])

    def loss(f: np.ndarray) -> float:
        readers = scaled_readers(f)
        e = expected(readers)
        q = np.percentile(e, TARGET_PERCENTILES)
        anchors = sum((expected_reader_mean(n, 0.0, "body", readers) - want) ** 2
                      for n, want in NOISE_ANCHORS)
        return float(np.sum((q - TARGET_LABELS) ** 2) + 2 * anchors
                     + 10 * max(0.0, ROUTINE_MIN_MEAN - e[routine].mean()) ** 2)

    starts = [np.array(x) for x in ((0, 0, 0, 0), (0, 0, 1, -1), (0, 0, 2, -1), (0.5, 0.5, 1.5, 0), (0, 0, 1, 1))]
    best = min((optimize.minimize(loss, x0, method="Nelder-Mead",
                                  options={"xatol": 1e-3, "fatol": 1e-5, "maxiter": 400}) for x0 in starts),
               key=lambda r: r.fun)
    readers = scaled_readers(best.x)
    e = expected(readers)
    print("factors", np.round(np.exp(best.x), 4), "loss", round(best.fun, 5))
    print("percentiles", np.round(np.percentile(e, TARGET_PERCENTILES), 2), "target", TARGET_LABELS)
    print("noise anchors", [(n, round(expected_reader_mean(n, 0.0, "body", readers), 2))
                             for n, _ in NOISE_ANCHORS])
    print("routine mean", round(float(e[routine].mean()), 3), "all mean", round(float(e.mean()), 3),
          "sd", round(float(e.std()), 3))
    for r in readers:
        print(f"    Reader({r.noise_tolerance_hu:.2f}, {r.noise_step:.3f}, {r.streak_tolerance_hu:.2f}, "
              f"{r.streak_step:.3f}, {r.bias}, {r.jitter}),")


if __name__ == "__main__":
    main(sys.argv[1])
