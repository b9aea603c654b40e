"""IQA metrics as the LDCTIQAC2023 challenge scores them (raw PLCC, SROCC, KROCC and their sum),
PLCC after the usual 4-parameter logistic mapping, and interval coverage."""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from scipy import optimize, special, stats


def _pair(pred: Sequence[float], label: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64).ravel()
    y = np.asarray(label, dtype=np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"prediction and label lengths differ: {p.size} vs {y.size}")
    if p.size < 2:
        raise ValueError("need at least two samples")
    return p, y


def plcc(pred: Sequence[float], label: Sequence[float]) -> float:
    """Pearson linear correlation (0 when either side is constant)."""
    p, y = _pair(pred, label)
    if np.std(p) == 0 or np.std(y) == 0:
        return 0.0
    pc, yc = p - p.mean(), y - y.mean()
    return float((pc * yc).sum() / np.sqrt((pc ** 2).sum() * (yc ** 2).sum()))


def srocc(pred: Sequence[float], label: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties, as scipy)."""
    p, y = _pair(pred, label)
    return plcc(stats.rankdata(p), stats.rankdata(y))


def krocc(pred: Sequence[float], label: Sequence[float]) -> float:
    """Kendall tau-b (tie-corrected, as scipy.stats.kendalltau's default)."""
    p, y = _pair(pred, label)
    n = p.size
    if n > 3000:  # O(n^2) below; scipy's O(n log n) implementation for large inputs
        t = stats.kendalltau(p, y).statistic
        return 0.0 if np.isnan(t) else float(t)
    dp = np.sign(p[:, None] - p[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(n, 1)
    dp, dy = dp[iu], dy[iu]
    s = float((dp * dy).sum())
    n1, n2 = float((dp != 0).sum()), float((dy != 0).sum())
    if n1 == 0 or n2 == 0:
        return 0.0
    return float(s / np.sqrt(n1 * n2))


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """4-parameter logistic: (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2."""
    return (b1 - b2) * special.expit((np.asarray(x, dtype=np.float64) - b3) / (abs(b4) + 1e-9)) + b2


def fit_logistic4(pred: Sequence[float], label: Sequence[float]) -> np.ndarray:
    """Least-squares parameters of logistic4 mapping predictions to labels."""
    p, y = _pair(pred, label)
    b0 = [float(y.max()), float(y.min()), float(np.mean(p)), float(np.std(p)) / 4 + 1e-3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            params, _ = optimize.curve_fit(logistic4, p, y, p0=b0, maxfev=20000)
        except (RuntimeError, ValueError):
            params = np.asarray(b0)
    return np.asarray(params)


def plcc_logistic(pred: Sequence[float], label: Sequence[float]) -> float:
    """PLCC after fitting the 4-parameter logistic from predictions to labels."""
    p, y = _pair(pred, label)
    fitted = logistic4(p, *fit_logistic4(p, y))
    return plcc(fitted, y)


def coverage(label: Sequence[float], low: Sequence[float], high: Sequence[float]) -> float:
    """Fraction of labels inside their [low, high] interval (ends included)."""
    y = np.asarray(label, dtype=np.float64).ravel()
    lo = np.asarray(low, dtype=np.float64).ravel()
    hi = np.asarray(high, dtype=np.float64).ravel()
    if not (y.shape == lo.shape == hi.shape) or y.size == 0:
        raise ValueError("label, low and high must have the same non-zero length")
    return float(np.mean((y >= lo - 1e-6) & (y <= hi + 1e-6)))


def all_metrics(pred: Sequence[float], label: Sequence[float],
                low: Sequence[float] | None = None, high: Sequence[float] | None = None) -> dict[str, float]:
    """plcc, srocc, krocc, their sum ("overall", the challenge score), plcc_logistic, coverage, n."""
    out = {"plcc": plcc(pred, label), "srocc": srocc(pred, label), "krocc": krocc(pred, label)}
    out["overall"] = out["plcc"] + out["srocc"] + out["krocc"]
    out["plcc_logistic"] = plcc_logistic(pred, label)
    if low is not None and high is not None:
        out["coverage"] = coverage(label, low, high)
    out["n"] = int(np.asarray(label).size)
    return out
