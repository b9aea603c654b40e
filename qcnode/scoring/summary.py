"""The series summary and the verdict rules (``[verdict]`` in config.toml), pure numpy.

Used by the worker and by the real-patient validation (``qcnode validate``), which checks these
same rules on held-out patients.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from qcnode.config import VerdictConfig
from qcnode.scoring.types import SeriesSummary, Verdict


def verdict_for(mean_score: float, fraction_below: float, v: VerdictConfig) -> Verdict:
    """PASS / WARN / FAIL from the series mean and the fraction of low-quality slices."""
    if mean_score < v.fail_mean_below or fraction_below > v.fail_fraction_below:
        return Verdict.FAIL
    if mean_score < v.warn_mean_below or fraction_below > v.warn_fraction_below:
        return Verdict.WARN
    return Verdict.PASS


def summarise(scores: list[float], threshold: float, v: VerdictConfig) -> SeriesSummary:
    """Series summary of per-slice scores: mean, min, p10, fraction below threshold, verdict
    (no skipped instances, no physics: the caller adds those)."""
    arr = np.asarray(scores, dtype=float)
    mean, frac = float(arr.mean()), float((arr < threshold).mean())
    return SeriesSummary(mean_score=mean, min_score=float(arr.min()), p10_score=float(np.percentile(arr, 10)),
                         fraction_below=frac, verdict=verdict_for(mean, frac, v), n_slices=int(arr.size))


def finite_mean(values: Iterable[float | None]) -> float | None:
    """Mean of the finite values; None when there is none."""
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def finite_median(values: Iterable[float | None]) -> float | None:
    """Median of the finite values; None when there is none."""
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(vals)) if vals else None
