"""Validation outputs and the interval calibration of a trained model.

The interval gets a temperature T (softmax(logits / T), the score readout is untouched) fitted on
the validation split so that ``TARGET_COVERAGE`` of the labels fall inside the 5-95 % interval;
it is stored as ``interval_temperature`` in the checkpoint's config.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from qcnode.model.network import MDIQA
from qcnode.training.metrics import all_metrics

TARGET_COVERAGE = 0.90


@torch.no_grad()
def predict_raw(model: MDIQA, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Raw network outputs for a cached tensor, in eval mode."""
    was = model.training
    model.eval()
    outs = [model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    model.train(was)
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate_outputs(model: MDIQA, out: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """The challenge metrics and interval coverage of raw outputs against labels."""
    s, lo, hi = model.readout_outputs(out)
    return all_metrics(s.numpy(), labels, lo.numpy(), hi.numpy())


def fit_interval_temperature(model: MDIQA, out: torch.Tensor, labels: np.ndarray,
                             target: float = TARGET_COVERAGE) -> tuple[float, float, float]:
    """Temperature T for the interval so that ``target`` of the labels are covered.

    Returns (T, coverage at T=1, coverage at T). Coverage grows with T, so bisection on log T.
    """
    if not model.is_distribution or out.shape[0] < 10:
        return 1.0, float("nan"), float("nan")

    def cov(t: float) -> float:
        model.config.interval_temperature = t
        _, lo, hi = model.readout_outputs(out)
        return float(np.mean((labels >= lo.numpy() - 1e-6) & (labels <= hi.numpy() + 1e-6)))

    old = model.config.interval_temperature
    raw = cov(1.0)
    a, b = math.log(0.1), math.log(10.0)
    for _ in range(30):
        mid = (a + b) / 2
        if cov(math.exp(mid)) < target:
            a = mid
        else:
            b = mid
    t = math.exp(b)
    final = cov(t)
    model.config.interval_temperature = old
    return t, raw, final
