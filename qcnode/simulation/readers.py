"""The synthetic reader model: five simulated radiologists label each simulated image.

Labels are synthetic; this is their whole definition. Two physical measures per image, in HU
(``qcnode.simulation.degrade``): ``noise_hu`` (noise over soft tissue) and ``streak_index``
(view-aliasing residual). Each reader has a noise tolerance ``t_n`` and step ``g_n`` (the noise
ratio that costs one score step: perception of noise is roughly logarithmic), a streak tolerance
``t_s`` and step ``g_s``, a bias and a per-image jitter (``READERS``, fitted by
scripts/calibrate_readers.py). Head images are judged on ``noise_hu x 1.6`` (grey/white contrast
is a few HU). Excess ``e = ln(max(measure, t) / t) / ln(g)`` for noise and streaks; reader score =
clip(round(4 + bias - sqrt(e_n^2 + e_s^2) + jitter), 0, 4). Label = mean over the readers, rounded
to 0.2 (LDCTIQAC2023 style); it falls (never rises) as dose or views fall.

A routine diagnostic acquisition with a smooth or standard kernel is read as routine (3-4 on the
challenge's scale, whatever its slice thickness or patient size): its own noise counts at most
``ROUTINE_OWN_NOISE_CAP_HU`` (the noisiest routine slices the readers were calibrated on), and the
noise a simulation adds to it counts in full (``seen_noise_hu``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

HEAD_NOISE_WEIGHT = 1.6
ROUTINE_OWN_NOISE_CAP_HU = 12.0  # = scripts/calibrate_readers.py SMOOTH_MAX_OWN_NOISE_HU
READER_COLUMNS = [f"reader_{i}" for i in range(1, 6)]


@dataclass(frozen=True)
class Reader:
    """One simulated radiologist (see the module docstring)."""
    noise_tolerance_hu: float  # noise below this is not seen
    noise_step: float  # noise ratio that costs one score step (Weber-like)
    streak_tolerance_hu: float
    streak_step: float
    bias: float  # leniency, score steps
    jitter: float  # per-image inconsistency, sd in score steps


READERS: tuple[Reader, ...] = (  # fitted to the LDCTIQAC2023 scale by scripts/calibrate_readers.py
    Reader(7.39, 1.867, 7.73, 2.991, 0.0, 0.35),
    Reader(6.46, 1.781, 6.18, 2.826, -0.2, 0.30),
    Reader(8.76, 1.955, 9.66, 3.324, 0.2, 0.40),
    Reader(6.92, 2.041, 6.95, 2.991, 0.1, 0.30),
    Reader(7.85, 1.694, 8.50, 2.660, -0.1, 0.45),
)


def seen_noise_hu(noise_hu: float, anatomy: str, routine_own_noise_hu: float | None = None) -> float:
    """The noise the readers weigh: x1.6 for heads; ``routine_own_noise_hu`` (the own noise of a routine
    smooth-kernel acquisition, None otherwise) counts at most ROUTINE_OWN_NOISE_CAP_HU, added noise in full."""
    weight = HEAD_NOISE_WEIGHT if anatomy == "head" else 1.0
    seen = noise_hu * weight
    if routine_own_noise_hu is None or routine_own_noise_hu * weight <= ROUTINE_OWN_NOISE_CAP_HU:
        return seen
    added_sq = max(0.0, seen ** 2 - (routine_own_noise_hu * weight) ** 2)
    return math.sqrt(ROUTINE_OWN_NOISE_CAP_HU ** 2 + added_sq)


def routine_own_noise(row: dict[str, Any]) -> float | None:
    """A meta.csv row's own noise when it is a routine smooth-kernel slice (``routine_smooth`` 1), else None."""
    if str(row.get("routine_smooth", "")).strip() not in ("1", "True", "true"):
        return None
    try:
        return float(row["own_noise_hu"])
    except (KeyError, TypeError, ValueError):
        return None


def _reader_judgement(r: Reader, seen_noise: float, streak_index: float) -> float:
    """A reader's score before the per-image jitter and the rounding (see the module docstring)."""
    en = math.log(max(seen_noise, r.noise_tolerance_hu) / r.noise_tolerance_hu) / math.log(r.noise_step)
    es = math.log(max(streak_index, r.streak_tolerance_hu) / r.streak_tolerance_hu) / math.log(r.streak_step)
    return 4.0 + r.bias - math.hypot(en, es)


def reader_scores(noise_hu: float, streak_index: float, anatomy: str, rng: np.random.Generator,
                  readers: Sequence[Reader] = READERS, routine_own_noise_hu: float | None = None) -> list[int]:
    """Integer 0-4 scores of the simulated readers for one image (see the module docstring)."""
    seen = seen_noise_hu(noise_hu, anatomy, routine_own_noise_hu)
    scores = []
    for r in readers:
        q = _reader_judgement(r, seen, streak_index) + r.jitter * float(rng.standard_normal())
        scores.append(int(min(4, max(0, round(q)))))
    return scores


def expected_reader_mean(noise_hu: float, streak_index: float, anatomy: str,
                         readers: Sequence[Reader] = READERS, routine_own_noise_hu: float | None = None) -> float:
    """The expected mean reader score of an image (exact over the readers' jitter, before the label's
    rounding to 0.2): what an oracle that knows the image's true noise and streak measures would
    predict. ``qcnode evaluate`` reports its agreement with the labels as the labels' ceiling."""
    seen = seen_noise_hu(noise_hu, anatomy, routine_own_noise_hu)
    total = 0.0
    for r in readers:
        q = _reader_judgement(r, seen, streak_index)
        # P(round(q + jitter Z) >= k) for k = 1..4 (the normal survival function, via erfc);
        # clipping to [0, 4] folds the tails into 0 and 4
        total += sum(0.5 * math.erfc((k - 0.5 - q) / (r.jitter * math.sqrt(2.0))) if r.jitter > 0
                     else float(q >= k - 0.5) for k in range(1, 5))
    return total / len(readers)


def recorded_readers(split_dir: Path) -> tuple[Reader, ...] | None:
    """The readers that labelled a simulated split, as its ``simulation.json`` records them (None when
    not recorded): older data sets were labelled by other readers than today's READERS."""
    record = Path(split_dir).parent / "simulation.json"
    try:
        readers = json.loads(record.read_text()).get("readers")
    except (OSError, ValueError):
        return None
    return tuple(Reader(**r) for r in readers) if readers else None


def mean_label(scores: Sequence[int]) -> float:
    """Mean reader score rounded to 0.2 and clipped to [0, 4]."""
    return float(min(4.0, max(0.0, round(float(np.mean(scores)) * 5.0) / 5.0)))
