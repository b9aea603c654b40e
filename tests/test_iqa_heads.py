"""Distribution targets, the readout that inverts them, and the percentile interval."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcnode.model import heads

SIGMAS = (0.1, 0.25, 0.5)


@given(st.lists(st.floats(0.0, 4.0), min_size=1, max_size=8))
@settings(max_examples=30, deadline=None)
def test_targets_sum_to_one_and_readout_inverts_them(labels):
    c = heads.bin_centers(41)
    t = heads.gaussian_targets(torch.tensor(labels), SIGMAS, c)
    assert t.shape == (len(labels), 3, 41)
    assert torch.allclose(t.sum(-1), torch.ones(len(labels), 3), atol=1e-5)
    r = heads.DistributionReadout(SIGMAS, 41)
    np.testing.assert_allclose(r.score(t).numpy(), labels, atol=5e-3)


def test_plain_mean_is_biased_at_the_ends_but_readout_is_not():
    c = heads.bin_centers(41)
    t = heads.gaussian_targets(torch.tensor([4.0]), (0.5,), c)
    plain_mean = float((t * c).sum())
    assert plain_mean < 3.8  # truncated Gaussian: the mean is pulled inwards
    assert float(heads.DistributionReadout((0.5,), 41).score(t)) == pytest.approx(4.0, abs=5e-3)


def test_target_peak_and_width_follow_sigma():
    c = heads.bin_centers(81)
    t = heads.gaussian_targets(torch.tensor([2.0]), (0.1, 0.5), c)[0]
    assert int(t[0].argmax()) == int(t[1].argmax()) == 40
    assert t[0].max() > t[1].max()


def test_percentiles_of_a_central_gaussian():
    c = heads.bin_centers(161)
    t = heads.gaussian_targets(torch.tensor([2.0]), (0.4,), c)
    lo, hi = heads.DistributionReadout((0.4,), 161).percentiles(t)[0].tolist()
    assert lo == pytest.approx(2.0 - 1.645 * 0.4, abs=0.03)
    assert hi == pytest.approx(2.0 + 1.645 * 0.4, abs=0.03)


def test_percentiles_of_a_point_mass_bracket_the_bin():
    p = torch.zeros(1, 1, 41)
    p[0, 0, 10] = 1.0  # all mass on the 1.0 bin (cell 0.95..1.05)
    lo, hi = heads.DistributionReadout((0.1,), 41).percentiles(p)[0].tolist()
    assert 0.95 <= lo < hi <= 1.05


def test_kl_loss_is_zero_at_the_target_and_positive_elsewhere():
    c = heads.bin_centers(41)
    t = heads.gaussian_targets(torch.tensor([1.0, 3.0]), SIGMAS, c)
    assert float(heads.kl_loss(torch.log(t.clamp_min(1e-30)), t)) == pytest.approx(0.0, abs=1e-5)
    assert float(heads.kl_loss(torch.zeros_like(t), t)) > 0.1
