"""Training of the MD-IQA scorer (``qcnode train``).

* Data: an LDCTIQAC2023-layout folder, preprocessed once into memory (``qcnode.training.data``).
  A validation split is held out by anatomy (meta.csv ``source_id``; the file when absent).
* Loss: KL against the discretised Gaussians of every head (``qcnode.model.heads``); MSE for the
  plain-regression ablation.
* AdamW, linear warm-up then cosine decay; augmentation: flips, rot90, small shifts.
* Every epoch: validation metrics, a resumable state file ``OUT.state.pt`` (model, optimiser,
  schedule, RNG states) and the deployable checkpoint OUT (the epoch with the best validation
  PLCC+SROCC+KROCC). ``resume=True`` continues from the state file.
* Interval calibration: at the end, a temperature T for the interval only (softmax(logits / T),
  the score readout is untouched) is fitted on the validation split so that 90 % of validation
  labels fall inside the 5-95 % interval; stored as ``interval_temperature`` in the config.
* Semi-supervised: optional extra (pseudo-labeled) images and labels, see ``qcnode.training.semi``.
* Real-slice weighting (``real_weight`` > 1): anchors are drawn from a pool in which the images
  of real source slices (meta.csv ``source_kind`` "real") appear ``real_weight`` times, so the few
  real scanner textures weigh more against the many phantoms; an epoch keeps its number of steps.
* Dose-order ranking (``rank_weight`` > 0; RankIQA-style, needs meta.csv with ``source_id``,
  ``dose_fraction`` and ``views``, as ``qcnode simulate`` writes): half of each batch are anchors,
  the other half one partner each from the same source slice whose quality order is known by
  construction (dose and views both at least as high, one of them higher, is better). A hinge
  ``max(0, margin - (s_better - s_worse))`` on the differentiable score (mean over heads of the
  expected bin centre) is added to the KL. The reader labels cannot teach this order where the
  readers do not see the difference (noise below their tolerance, e.g. in air-filled heads), so
  without it the score of such slices need not fall with dose. An epoch keeps its number of
  steps (so its cost); each image is an anchor about every other epoch and a partner in between.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from qcnode.model import heads
from qcnode.training.data import augment, cache_labeled, group_split, load_labeled, meta_value
from qcnode.training.metrics import all_metrics
from qcnode.model.network import MDIQA, MDIQAConfig
from qcnode.model.scorer import save_checkpoint

TARGET_COVERAGE = 0.90


@dataclass
class TrainOptions:
    """Everything that defines a training run (recorded in the checkpoint metadata)."""
    data: str
    out: str
    config: dict[str, Any] = field(default_factory=dict)  # MDIQAConfig.to_dict()
    epochs: int = 15
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    seed: int = 0
    val_fraction: float = 0.1
    val_data: str | None = None    # separate labeled folder for validation (then all of ``data`` trains)
    threads: int = 2
    max_images: int = 0            # 0 = all; else a seeded subset (short ablation runs)
    resume: bool = False
    calibrate: bool = True
    unlabeled: str | None = None   # folder of unlabeled DICOM/tif (semi-supervised)
    teachers: list[str] = field(default_factory=list)
    pseudo_max_std: float = 0.3
    pseudo_keep: float = 0.8
    pseudo_weight: float = 1.0
    rank_weight: float = 0.0       # weight of the dose-order ranking loss (0 = off)
    rank_margin: float = 0.1       # score points the better image of a pair must lead by
    real_weight: int = 1           # images of real source slices drawn this many times as often (1 = uniform)
    command: str = ""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; returns a torch Generator for shuffling/augmentation."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


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


def _pair_batch(anchors: torch.Tensor, partners: list[list[tuple[int, bool]]], n: int,
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


@torch.no_grad()
def predict_raw(model: MDIQA, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Raw network outputs for a cached tensor, in eval mode."""
    was = model.training
    model.eval()
    outs = [model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    model.train(was)
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate_outputs(model: MDIQA, out: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
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


def _source_ids(ds) -> set[str]:
    """The meta.csv source ids (anatomy objects) of a labeled data set."""
    return {m["source_id"] for m in ds.meta if m.get("source_id")}


def _state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state.pt")


def train(opts: TrainOptions, extra_x: torch.Tensor | None = None, extra_y: np.ndarray | None = None,
          extra_info: dict[str, Any] | None = None,
          progress: Callable[[str], None] = _log) -> dict[str, Any]:
    """Train one model; returns the summary stored in the checkpoint metadata.

    ``extra_x``/``extra_y``: additional (pseudo-labeled) preprocessed images and labels used for
    training only, weighted by ``opts.pseudo_weight``.
    """
    if opts.threads and opts.threads > 0:
        torch.set_num_threads(opts.threads)
    gen = seed_everything(opts.seed)
    cfg = MDIQAConfig.from_dict(opts.config) if opts.config else MDIQAConfig()
    out_path = Path(opts.out)
    t_start = time.time()

    ds = load_labeled(opts.data)
    idx_all = list(range(len(ds)))
    if opts.max_images and opts.max_images < len(ds):
        idx_all = sorted(random.Random(opts.seed).sample(idx_all, opts.max_images))
    if opts.val_data:
        val_src = load_labeled(opts.val_data)  # validation source: another folder, or ds itself below
        # Only meta.csv source ids name anatomy; without them groups are file names, which may repeat.
        shared = sorted(_source_ids(ds) & _source_ids(val_src))
        if shared:
            raise ValueError(f"{opts.val_data} shares {len(shared)} anatomy group(s) with {opts.data} "
                             f"(e.g. {shared[0]}); validation must be held out")
        tr_idx, va_idx = idx_all, list(range(len(val_src)))
        progress(f"train: {len(ds)} labeled images in {opts.data}, all for training; {len(val_src)} validation "
                 f"images in {opts.val_data}")
    else:
        val_src = ds
        all_groups = ds.groups()
        groups = [all_groups[i] for i in idx_all]
        tr_rel, va_rel = group_split(groups, opts.val_fraction, opts.seed)
        tr_idx = [idx_all[i] for i in tr_rel]
        va_idx = [idx_all[i] for i in va_rel]
        progress(f"train: {len(ds)} labeled images in {opts.data}; using {len(tr_idx)} train / {len(va_idx)} "
                 f"validation (split by anatomy, {len(set(groups))} groups)")
    t0 = time.time()

    def cache(d):
        return cache_labeled(d, cfg.input_size, cfg.window_hu,
                             progress=lambda n: n % 500 == 0 and progress(f"train: preprocessed {n}/{len(d)}"))
    x_all = cache(ds)
    progress(f"train: preprocessed {len(ds)} images to {cfg.input_size}x{cfg.input_size} in {time.time() - t0:.1f} s")
    x_tr, y_tr = x_all[tr_idx], torch.from_numpy(ds.labels[tr_idx])
    w_tr = torch.ones(len(tr_idx))
    x_va = (x_all if val_src is ds else cache(val_src))[va_idx]
    y_va = val_src.labels[va_idx]
    if extra_x is not None and extra_y is not None and len(extra_y):
        x_tr = torch.cat([x_tr, extra_x])
        y_tr = torch.cat([y_tr, torch.as_tensor(extra_y, dtype=torch.float32)])
        w_tr = torch.cat([w_tr, torch.full((len(extra_y),), float(opts.pseudo_weight))])
        progress(f"train: + {len(extra_y)} pseudo-labeled images (weight {opts.pseudo_weight})")
    n = x_tr.shape[0]
    if n == 0:
        raise ValueError(f"{opts.data}: no training images")
    partners: list[list[tuple[int, bool]]] = []
    if opts.rank_weight > 0:
        position = {i: p for p, i in enumerate(tr_idx)}  # dataset index -> row of x_tr
        by_image = dose_order_partners(ds.meta)
        partners = [[(position[j], better) for j, better in by_image[i] if j in position] for i in tr_idx]
        n_pairs = sum(len(p) for p in partners)
        if n_pairs:
            progress(f"train: dose-order ranking on (weight {opts.rank_weight}, margin {opts.rank_margin}): "
                     f"{sum(1 for p in partners if p)} of {len(tr_idx)} images have ordered partners")
        else:
            progress("train: dose-order ranking requested, but meta.csv gives no source/dose/views groups: off")
            partners = []

    draw_pool = sampling_pool(ds.meta, tr_idx, n, opts.real_weight)
    if len(draw_pool) > n:
        progress(f"train: real source slices drawn {opts.real_weight}x as often: "
                 f"{(len(draw_pool) - n) // (opts.real_weight - 1)} of {n} training images are real")

    model = MDIQA(cfg)
    model.train()
    decay = [p for nme, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in nme and "cls_token" not in nme]
    no_decay = [p for nme, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in nme and "cls_token" not in nme)]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr)
    steps_per_epoch = max(1, math.ceil(n / opts.batch_size))
    total = steps_per_epoch * opts.epochs
    warm = max(1, int(opts.warmup_epochs * steps_per_epoch))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)

    start_epoch, best, history = 0, -float("inf"), []
    state_path = _state_path(out_path)
    if opts.resume and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        optim.load_state_dict(st["optim"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        start_epoch, best = int(st["epoch"]), float(st["best"])
        history = json.loads(st["history"])
        progress(f"train: resumed from {state_path} at epoch {start_epoch}/{opts.epochs}")
    elif opts.resume:
        progress(f"train: no state file {state_path}; starting from scratch")

    summary: dict[str, Any] = {}
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, opts.epochs):
        perm = torch.randperm(n, generator=gen)
        if len(draw_pool) > n:  # (with uniform drawing the permutation is as before: same runs, same seeds)
            perm = draw_pool[torch.randperm(len(draw_pool), generator=gen)]
        t_ep, run_loss = time.time(), 0.0
        for b in range(steps_per_epoch):
            if partners:
                half = max(1, opts.batch_size // 2)
                at = (b * half) % len(perm)
                ib, better, worse = _pair_batch(perm[at:at + half], partners, n, gen)
            else:
                ib = perm[b * opts.batch_size:(b + 1) * opts.batch_size]
            xb = augment(x_tr[ib], generator=gen)
            out = model(xb)
            loss = loss_fn(model, out, y_tr[ib], w_tr[ib])
            if partners:
                s_b = soft_score(model, out)
                loss = loss + opts.rank_weight * rank_loss(s_b[better], s_b[worse], opts.rank_margin)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
            optim.step()
            sched.step()
            step += 1
            run_loss += loss.item()
            if (b + 1) % 20 == 0 or b + 1 == steps_per_epoch:
                el = time.time() - t_ep
                rate = (b + 1) * opts.batch_size / max(el, 1e-9)
                eta = (steps_per_epoch - b - 1 + (opts.epochs - epoch - 1) * steps_per_epoch) * opts.batch_size / rate
                progress(f"train: epoch {epoch + 1}/{opts.epochs} step {b + 1}/{steps_per_epoch} "
                         f"loss {run_loss / (b + 1):.4f} lr {sched.get_last_lr()[0]:.2e} "
                         f"{rate:.1f} img/s ETA {eta / 60:.1f} min")
        rec: dict[str, Any] = {"epoch": epoch + 1, "train_loss": run_loss / steps_per_epoch,
                               "seconds": round(time.time() - t_ep, 1)}
        if len(y_va) >= 3:
            val_out = predict_raw(model, x_va)
            rec["val_loss"] = float(loss_fn(model, val_out, torch.from_numpy(y_va)))
            rec["val"] = evaluate_outputs(model, val_out, y_va)
            score = rec["val"]["overall"]
        else:
            score = -rec["train_loss"]
        history.append(rec)
        progress(f"train: epoch {epoch + 1} done: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                                 for k, v in _flat(rec).items()}))
        if not math.isfinite(best) or score > best:
            best = score
            summary = _summary(opts, cfg, history, len(tr_idx), len(y_va), extra_info, t_start)
            save_checkpoint(model, cfg, out_path, summary)
            progress(f"train: saved best checkpoint {out_path} (validation overall {score:.4f})")
        torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "sched": sched.state_dict(),
                    "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "epoch": epoch + 1,
                    "best": best, "history": json.dumps(history)}, state_path)

    # reload the best epoch's weights for calibration and the final write
    from qcnode.model.scorer import model_from_checkpoint, read_checkpoint
    best_model, cfg = model_from_checkpoint(read_checkpoint(out_path), out_path)
    summary = dict(read_checkpoint(out_path).get("meta") or {})
    if opts.calibrate and len(y_va) >= 10 and best_model.is_distribution:
        val_out = predict_raw(best_model, x_va)
        t, raw, fin = fit_interval_temperature(best_model, val_out, y_va)
        cfg.interval_temperature = t
        summary["interval_calibration"] = {"temperature": t, "validation_coverage_uncalibrated": raw,
                                           "validation_coverage_calibrated": fin, "target": TARGET_COVERAGE}
        progress(f"train: interval temperature {t:.3f} (validation coverage {raw:.3f} -> {fin:.3f})")
    summary["history"] = history
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    save_checkpoint(best_model, cfg, out_path, summary)
    progress(f"train: wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB) in {summary['wall_seconds']:.0f} s")
    return summary


def _flat(rec: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in rec.items():
        if isinstance(v, dict):
            out.update({f"{k}_{kk}": vv for kk, vv in v.items() if kk != "n"})
        else:
            out[k] = v
    return out


def _summary(opts: TrainOptions, cfg: MDIQAConfig, history: list[dict[str, Any]], n_train: int, n_val: int,
             extra_info: dict[str, Any] | None, t_start: float) -> dict[str, Any]:
    best = history[-1]
    d = {"options": {k: v for k, v in asdict(opts).items() if k != "config"},
         "n_train": n_train, "n_val": n_val, "best_epoch": best["epoch"],
         "validation": best.get("val", {}), "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
         "torch": torch.__version__}
    if opts.command:
        d["command"] = opts.command
    if extra_info:
        d["semi_supervised"] = extra_info
    return json.loads(json.dumps(d, default=str))
