"""Training losses of MD-IQA: KL against the heads' Gaussian targets (MSE for the plain-regression
ablation), and the dose-order hinge on a differentiable score (see ``qcnode.training.sampling``)."""
from __future__ import annotations

import torch

from qcnode.model import heads
from qcnode.model.network import MDIQA


def loss_fn(model: MDIQA, out: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL over all heads (distribution heads) or MSE (regression), optionally per-sample weighted."""
    cfg = model.config
    if model.is_distribution:
        centers = heads.bin_centers(cfg.n_bins, cfg.score_range, device=out.device)
        targets = heads.gaussian_targets(labels, cfg.head_sigmas, centers)
        per = heads.kl_loss(out, targets, reduce=False)
    else:
        per = (out[:, 0] - labels) ** 2
    if weights is None:
        return per.mean()
    return (per * weights).sum() / weights.sum().clamp_min(1e-12)


def soft_score(model: MDIQA, out: torch.Tensor) -> torch.Tensor:
    """A differentiable score per sample: mean over heads of the expected bin centre (monotone in
    the readout score of each head); the regression output itself for the plain-regression head."""
    if not model.is_distribution:
        return out[:, 0]
    cfg = model.config
    centers = heads.bin_centers(cfg.n_bins, cfg.score_range, device=out.device)
    return (torch.softmax(out, dim=-1) * centers).sum(-1).mean(-1)


def rank_loss(better: torch.Tensor, worse: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean hinge max(0, margin - (better - worse)) over pairs (0 for no pairs)."""
    if better.numel() == 0:
        return better.sum()
    return torch.relu(margin - (better - worse)).mean()
