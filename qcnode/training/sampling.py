"""Which training images a batch holds: real-slice weighting and dose-order pairs.

* Real-slice weighting (``real_weight`` > 1): anchors are drawn from a pool in which the images
  of real source slices (meta.csv ``source_kind`` "real") appear ``real_weight`` times, so the few
  real scanner textures weigh more against the many phantoms.
* Dose-order pairs (``rank_weight`` > 0, RankIQA-style): half of a batch are anchors, the other
  half one partner each from the same source slice whose quality order is known by construction
  (dose and views both at least as high, one of them higher, is better). The reader labels cannot
  teach this order where readers see no difference (noise below their tolerance), so without it
  the score of such slices need not fall with dose.
An epoch keeps its number of steps either way.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from qcnode.training.data import meta_value


def dose_order_partners(meta: list[dict[str, Any]]) -> list[list[tuple[int, bool]]]:
    """For each image: (index, anchor_is_better) of the images of the same source slice whose quality
    order is known by construction (dose fraction and view count both >= or both <=, not both equal).
    Images without ``source_id``/``dose_fraction``/``views`` in their meta row get no partners."""
    by_source: dict[str, list[tuple[int, float, float]]] = {}
    for i, row in enumerate(meta):
        sid, dose, views = row.get("source_id"), meta_value(row, "dose_fraction"), meta_value(row, "views")
        if sid and math.isfinite(dose) and math.isfinite(views):
            by_source.setdefault(sid, []).append((i, dose, views))
    partners: list[list[tuple[int, bool]]] = [[] for _ in meta]
    for members in by_source.values():
        for i, di, vi in members:
            for j, dj, vj in members:
                if (di, vi) == (dj, vj):
                    continue
                if di >= dj and vi >= vj:
                    partners[i].append((j, True))
                elif di <= dj and vi <= vj:
                    partners[i].append((j, False))
    return partners


def sampling_pool(meta: list[dict[str, Any]], tr_idx: list[int], n: int, real_weight: int) -> torch.Tensor:
    """Rows of the training tensor to draw an epoch's anchors from: every row once, and the rows of
    real source slices (meta.csv ``source_kind`` "real") ``real_weight - 1`` more times. Rows past
    ``tr_idx`` (pseudo-labeled images) are drawn once."""
    rows = torch.arange(n)
    if real_weight <= 1:
        return rows
    real = [p for p, i in enumerate(tr_idx) if i < len(meta) and meta[i].get("source_kind") == "real"]
    return torch.cat([rows, torch.as_tensor(real, dtype=torch.long).repeat(real_weight - 1)])


def pair_batch(anchors: torch.Tensor, partners: list[list[tuple[int, bool]]], n: int,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anchors + one partner each (a random image where an anchor has none); returns (batch
    indices, positions of the better images, positions of the worse images) within the batch."""
    h = anchors.numel()
    chosen, better, worse = [], [], []
    draws = torch.rand(h, generator=gen).tolist()
    fill = torch.randint(0, n, (h,), generator=gen).tolist()
    for k, a in enumerate(anchors.tolist()):
        options = partners[a] if a < len(partners) else []
        if not options:
            chosen.append(fill[k])
            continue
        j, anchor_better = options[min(len(options) - 1, int(draws[k] * len(options)))]
        chosen.append(j)
        better.append(k if anchor_better else h + k)
        worse.append(h + k if anchor_better else k)
    idx = torch.cat([anchors, torch.as_tensor(chosen, dtype=anchors.dtype)])
    return idx, torch.as_tensor(better, dtype=torch.long), torch.as_tensor(worse, dtype=torch.long)
