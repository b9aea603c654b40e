"""Multi-scale Gaussian distribution regression: targets, loss, score readout, intervals.

A label s in [lo, hi] becomes, for each scale sigma_k, a discretised Gaussian over ``n_bins``
equally spaced bin centres c_i on [lo, hi]:  p_k(i) = exp(-(c_i - s)^2 / 2 sigma_k^2) / Z.
K softmax heads are trained against these with KL(p_k || q_k).

Readout. Near the ends of the range the discretised Gaussian is truncated, so its plain mean
is pulled towards the centre (mean of the target for s = 4 is below 4). The readout therefore
inverts the mean: for every head a monotone table m_k(mu) = E_{p_k(mu)}[c] is precomputed on a
fine grid of mu, and the head's estimate is m_k^{-1}(E_{q_k}[c]); the score is the average over
heads. Applied to the targets themselves the readout returns the label exactly (up to the grid).

Interval. The predicted distribution is the mixture (1/K) sum_k q_k; score_low/score_high are
its 5th/95th percentiles, read from the mixture CDF with linear interpolation between bins
(each bin's mass is spread uniformly over its cell).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

_INVERSE_GRID = 2001  # resolution of the mean-inversion tables


def bin_centers(n_bins: int, score_range: tuple[float, float] = (0.0, 4.0),
                device: torch.device | str | None = None) -> torch.Tensor:
    """The ``n_bins`` equally spaced score bin centres covering ``score_range`` (ends included)."""
    lo, hi = score_range
    return torch.linspace(float(lo), float(hi), int(n_bins), device=device)


def gaussian_targets(labels: torch.Tensor, sigmas: Sequence[float], centers: torch.Tensor) -> torch.Tensor:
    """Discretised Gaussians around ``labels`` (B,) -> (B, K, n_bins); every row sums to one."""
    labels = labels.reshape(-1, 1, 1).to(centers.dtype)
    sig = torch.as_tensor(list(sigmas), dtype=centers.dtype, device=centers.device).reshape(1, -1, 1)
    logits = -((centers.reshape(1, 1, -1) - labels) ** 2) / (2 * sig ** 2)
    return torch.softmax(logits, dim=-1)


def kl_loss(logits: torch.Tensor, targets: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """KL(target || softmax(logits)) for (B, K, n_bins): averaged over heads, then over the batch
    (``reduce=False`` returns the per-sample values (B,))."""
    logq = F.log_softmax(logits, dim=-1)
    kl = (targets * (torch.log(targets.clamp_min(1e-12)) - logq)).sum(-1).mean(-1)
    return kl.mean() if reduce else kl


class DistributionReadout:
    """Score and interval from K predicted bin distributions (see module docstring)."""

    def __init__(self, sigmas: Sequence[float], n_bins: int, score_range: tuple[float, float] = (0.0, 4.0)):
        self.sigmas = [float(s) for s in sigmas]
        self.score_range = (float(score_range[0]), float(score_range[1]))
        self.centers = bin_centers(n_bins, self.score_range, device="cpu").double()
        mu = torch.linspace(self.score_range[0], self.score_range[1], _INVERSE_GRID, dtype=torch.float64)
        t = gaussian_targets(mu, self.sigmas, self.centers)         # (G, K, n)
        self._mu = mu
        self._means = (t * self.centers).sum(-1).T.contiguous()      # (K, G), increasing in mu

    def head_means(self, probs: torch.Tensor) -> torch.Tensor:
        """Expected bin centre per head: (B, K, n) -> (B, K)."""
        return (probs.double() * self.centers.to(probs.device)).sum(-1)

    def invert(self, means: torch.Tensor) -> torch.Tensor:
        """Map per-head means (B, K) back to Gaussian locations mu (B, K) via the inverse tables."""
        out = torch.empty_like(means, dtype=torch.float64)
        for k in range(means.shape[1]):
            out[:, k] = _interp(means[:, k].double().cpu().contiguous(), self._means[k], self._mu).to(out.device)
        return out

    def score(self, probs: torch.Tensor) -> torch.Tensor:
        """The score (B,): inverted head means averaged over heads."""
        return self.invert(self.head_means(probs)).mean(1).float()

    def percentiles(self, probs: torch.Tensor, qs: Sequence[float] = (0.05, 0.95)) -> torch.Tensor:
        """Percentiles (B, len(qs)) of the mixture of the K head distributions (B, K, n)."""
        mix = probs.double().mean(1).cpu()                            # (B, n)
        mix = mix / mix.sum(-1, keepdim=True)
        c = self.centers
        half = (c[1] - c[0]) / 2 if len(c) > 1 else torch.tensor(0.5, dtype=torch.float64)
        edges = torch.cat([c[:1] - half, c + half])                  # n+1 cell edges
        cdf = torch.cat([torch.zeros(mix.shape[0], 1, dtype=torch.float64), mix.cumsum(-1)], dim=1)
        lo, hi = self.score_range
        q = torch.tensor([float(v) for v in qs], dtype=torch.float64).expand(mix.shape[0], -1).contiguous()
        idx = torch.searchsorted(cdf, q, right=False).clamp(1, cdf.shape[1] - 1)   # (B, m)
        c0, c1 = cdf.gather(1, idx - 1), cdf.gather(1, idx)
        w = ((q - c0) / (c1 - c0).clamp_min(1e-300)).clamp(0, 1)
        out = edges[idx - 1] + w * (edges[idx] - edges[idx - 1])
        return out.clamp(lo, hi).float()


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """np.interp for 1-D tensors: xp non-decreasing; flat stretches take their first point."""
    idx = torch.searchsorted(xp, x, right=False).clamp(1, len(xp) - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    w = torch.where(x1 > x0, (x - x0) / (x1 - x0).clamp_min(1e-300), torch.ones_like(x))
    return (f0 + w.clamp(0, 1) * (f1 - f0))
