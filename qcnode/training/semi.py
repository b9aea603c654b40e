"""Semi-supervised training: an ensemble of teacher checkpoints pseudo-labels unlabeled slices,
the confident ones are kept, and a student trains on labeled + pseudo-labeled data.

Pseudo label = mean of the teachers' scores. Confidence filter (both must hold):
* teacher agreement: the standard deviation of the teachers' scores <= ``max_std``;
* interval width: among those, only the ``keep`` fraction with the narrowest mean 5-95 %
  interval (mean over teachers) is kept.
With a single teacher only the width filter applies.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from qcnode.model.network import MDIQAConfig
from qcnode.model.scorer import Scorer
from qcnode.training.data import iter_unlabeled, preprocess_many


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class PseudoLabels:
    """Teacher-ensemble pseudo labels for one unlabeled folder."""
    ids: list[str]
    images: list[np.ndarray]  # HU, as read
    score: np.ndarray       # ensemble mean (N,)
    std: np.ndarray         # teacher disagreement (N,)
    width: np.ndarray       # mean 5-95 % interval width (N,)
    keep: np.ndarray        # bool (N,): passed the confidence filter

    def summary(self) -> dict[str, Any]:
        k = self.keep
        return {"n_unlabeled": int(len(self.ids)), "n_kept": int(k.sum()),
                "mean_pseudo_score_kept": float(self.score[k].mean()) if k.any() else None,
                "mean_teacher_std": float(self.std.mean()) if len(self.std) else None,
                "mean_interval_width": float(self.width.mean()) if len(self.width) else None}


def pseudo_label(teachers: Sequence[str | Path], unlabeled: str | Path, max_std: float = 0.3,
                 keep: float = 0.8, batch_size: int = 32,
                 progress: Callable[[str], None] = _log) -> PseudoLabels:
    """Score every unlabeled slice with every teacher and apply the confidence filter."""
    if not teachers:
        raise ValueError("semi-supervised training needs at least one teacher checkpoint")
    items = list(iter_unlabeled(unlabeled))
    if not items:
        raise ValueError(f"{unlabeled}: no readable tif or DICOM slices")
    ids = [i for i, _ in items]
    images = [img for _, img in items]
    scores, widths = [], []
    for t in teachers:
        scorer = Scorer.load(t)
        x = preprocess_many(images, scorer.config.input_size, scorer.config.window_hu)
        res = scorer.score_tensors(x, batch_size)
        scores.append([r.score for r in res])
        widths.append([r.score_high - r.score_low for r in res])
        progress(f"semi: teacher {scorer.version} scored {len(res)} unlabeled slices")
    s = np.asarray(scores, dtype=np.float64)
    w = np.asarray(widths, dtype=np.float64).mean(0)
    mean, std = s.mean(0), s.std(0)
    ok = std <= max_std
    if ok.any() and keep < 1.0:
        cut = np.quantile(w[ok], keep)
        ok &= w <= cut
    pl = PseudoLabels(ids, images, mean, std, w, ok)
    progress(f"semi: kept {int(ok.sum())}/{len(ids)} pseudo-labeled slices "
             f"(teacher std <= {max_std}, narrowest {keep:.0%} of intervals)")
    return pl


def pseudo_training_set(pl: PseudoLabels, size: int, window: tuple[float, float]) -> tuple[torch.Tensor, np.ndarray]:
    """The kept pseudo-labeled slices preprocessed for the student, with their labels."""
    idx = np.flatnonzero(pl.keep)
    x = preprocess_many([pl.images[i] for i in idx], size, window)
    return x, pl.score[idx].astype(np.float32)


def train_semi_supervised(opts: Any, n_teachers: int, progress: Callable[[str], None] = _log) -> dict[str, Any]:
    """``qcnode train --unlabeled``: train ``n_teachers`` teachers (OUT.teacherN.pt) unless
    ``opts.teachers`` names them, pseudo-label ``opts.unlabeled`` with them, and train the student
    OUT on labeled + confident pseudo-labeled data; returns the student's summary."""
    from qcnode.training.train import train

    out = Path(opts.out)
    teachers = list(opts.teachers)
    if not teachers:
        for i in range(1, max(1, n_teachers) + 1):
            t_out = out.with_name(f"{out.name[:-3] if out.name.endswith('.pt') else out.name}.teacher{i}.pt")
            state = t_out.with_name(t_out.name + ".state.pt")
            if opts.resume and t_out.is_file() and not state.is_file():
                progress(f"train: teacher {i} already trained: {t_out}")
            else:
                progress(f"train: training teacher {i}/{n_teachers} -> {t_out}")
                train(replace(opts, out=str(t_out), seed=opts.seed + 1000 * i, unlabeled=None, teachers=[]))
                if state.is_file():
                    state.unlink()
            teachers.append(str(t_out))
    pl = pseudo_label(teachers, opts.unlabeled, opts.pseudo_max_std, opts.pseudo_keep)
    cfg = MDIQAConfig.from_dict(opts.config)
    x, y = pseudo_training_set(pl, cfg.input_size, cfg.window_hu)
    info = {"unlabeled": str(opts.unlabeled), "teachers": teachers, **pl.summary(),
            "max_std": opts.pseudo_max_std, "keep": opts.pseudo_keep, "weight": opts.pseudo_weight}
    progress(f"train: training the student on labeled + {len(y)} pseudo-labeled slices -> {out}")
    return train(replace(opts, teachers=teachers), extra_x=x, extra_y=y, extra_info=info)
