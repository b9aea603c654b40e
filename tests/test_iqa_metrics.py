"""Metrics against scipy, logistic fit, coverage."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from qcnode.training import metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlations_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = np.round(rng.uniform(0, 4, 200) * 5) / 5          # challenge labels: steps of 0.2, many ties
    p = np.round(y + rng.normal(0, 0.6, y.size), 1)          # ties in predictions too
    assert metrics.plcc(p, y) == pytest.approx(stats.pearsonr(p, y)[0], abs=1e-12)
    assert metrics.srocc(p, y) == pytest.approx(stats.spearmanr(p, y)[0], abs=1e-12)
    assert metrics.krocc(p, y) == pytest.approx(stats.kendalltau(p, y)[0], abs=1e-12)


def test_all_metrics_sum_and_constant_prediction():
    y = np.linspace(0, 4, 50)
    m = metrics.all_metrics(y * 2 + 1, y, y - 0.1, y + 0.1)
    assert m["overall"] == pytest.approx(3.0)
    assert m["coverage"] == 1.0
    assert metrics.plcc(np.ones(50), y) == 0.0
    assert metrics.krocc(np.ones(50), y) == 0.0


def test_logistic_fit_linearises_a_sigmoid_relation():
    x = np.linspace(-3, 3, 300)
    y = 4 / (1 + np.exp(-2 * x))
    assert metrics.plcc(x, y) < 0.97
    assert metrics.plcc_logistic(x, y) > 0.999


def test_coverage_counts_inclusive_ends():
    assert metrics.coverage([1, 2, 3, 4], [1, 2.5, 2, 0], [1, 3, 2.9, 4]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.coverage([1, 2], [1], [2])
