"""Training of the MD-IQA scorer (``qcnode train``).

A run: ``prepare_data`` (an LDCTIQAC2023-layout folder preprocessed once into memory, validation
held out by anatomy or given as another folder, optional pseudo-labeled extras), then per epoch
``train_epoch`` (AdamW, warm-up then cosine decay, augmentation; KL loss plus the optional
dose-order ranking of ``qcnode.training.sampling``), ``validate`` (PLCC+SROCC+KROCC picks the best
epoch) and ``write_epoch`` (the best checkpoint OUT and a resumable OUT.state.pt), and at the end
``finish`` (interval calibration, ``qcnode.training.calibration``, and the final checkpoint).
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

from qcnode.model.network import MDIQA, MDIQAConfig
from qcnode.model.scorer import save_checkpoint
from qcnode.training.calibration import TARGET_COVERAGE, evaluate_outputs, fit_interval_temperature, predict_raw
from qcnode.training.data import augment, cache_labeled, group_split, load_labeled
from qcnode.training.losses import loss_fn, rank_loss, soft_score
from qcnode.training.sampling import dose_order_partners, pair_batch, sampling_pool


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


def _source_ids(ds) -> set[str]:
    """The meta.csv source ids (anatomy objects) of a labeled data set."""
    return {m["source_id"] for m in ds.meta if m.get("source_id")}


def _state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state.pt")


# ------------------------------------------------------------------------------------------ data

@dataclass
class TrainingData:
    """The preprocessed tensors of one run and how batches are drawn from them."""
    x_tr: torch.Tensor
    y_tr: torch.Tensor
    w_tr: torch.Tensor  # per-image loss weight (pseudo-labeled images: ``pseudo_weight``)
    x_va: torch.Tensor
    y_va: np.ndarray
    n_labeled: int  # labeled training images (the first rows of x_tr)
    partners: list[list[tuple[int, bool]]]  # dose-order partners per row (empty: ranking off)
    draw_pool: torch.Tensor  # rows an epoch's anchors are drawn from (see ``sampling_pool``)

    @property
    def n(self) -> int:
        return self.x_tr.shape[0]


def _split(opts: TrainOptions, ds, progress: Callable[[str], None]) -> tuple[Any, list[int], list[int]]:
    """(validation source, training indices into ``ds``, validation indices into the source)."""
    idx_all = list(range(len(ds)))
    if opts.max_images and opts.max_images < len(ds):
        idx_all = sorted(random.Random(opts.seed).sample(idx_all, opts.max_images))
    if opts.val_data:
        val_src = load_labeled(opts.val_data)
        # Only meta.csv source ids name anatomy; without them groups are file names, which may repeat.
        shared = sorted(_source_ids(ds) & _source_ids(val_src))
        if shared:
            raise ValueError(f"{opts.val_data} shares {len(shared)} anatomy group(s) with {opts.data} "
                             f"(e.g. {shared[0]}); validation must be held out")
        progress(f"train: {len(ds)} labeled images in {opts.data}, all for training; {len(val_src)} validation "
                 f"images in {opts.val_data}")
        return val_src, idx_all, list(range(len(val_src)))
    all_groups = ds.groups()
    groups = [all_groups[i] for i in idx_all]
    tr_rel, va_rel = group_split(groups, opts.val_fraction, opts.seed)
    tr_idx = [idx_all[i] for i in tr_rel]
    va_idx = [idx_all[i] for i in va_rel]
    progress(f"train: {len(ds)} labeled images in {opts.data}; using {len(tr_idx)} train / {len(va_idx)} "
             f"validation (split by anatomy, {len(set(groups))} groups)")
    return ds, tr_idx, va_idx


def _rank_partners(opts: TrainOptions, ds, tr_idx: list[int],
                   progress: Callable[[str], None]) -> list[list[tuple[int, bool]]]:
    """Dose-order partners per training row (empty when ranking is off or meta.csv has no groups)."""
    if opts.rank_weight <= 0:
        return []
    position = {i: p for p, i in enumerate(tr_idx)}  # dataset index -> row of x_tr
    by_image = dose_order_partners(ds.meta)
    partners = [[(position[j], better) for j, better in by_image[i] if j in position] for i in tr_idx]
    if not sum(len(p) for p in partners):
        progress("train: dose-order ranking requested, but meta.csv gives no source/dose/views groups: off")
        return []
    progress(f"train: dose-order ranking on (weight {opts.rank_weight}, margin {opts.rank_margin}): "
             f"{sum(1 for p in partners if p)} of {len(tr_idx)} images have ordered partners")
    return partners


def prepare_data(opts: TrainOptions, cfg: MDIQAConfig, extra_x: torch.Tensor | None = None,
                 extra_y: np.ndarray | None = None, progress: Callable[[str], None] = _log) -> TrainingData:
    """Load, split and preprocess the labeled data (plus extra pseudo-labeled images for training)."""
    ds = load_labeled(opts.data)
    val_src, tr_idx, va_idx = _split(opts, ds, progress)
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
    partners = _rank_partners(opts, ds, tr_idx, progress)
    draw_pool = sampling_pool(ds.meta, tr_idx, n, opts.real_weight)
    if len(draw_pool) > n:
        progress(f"train: real source slices drawn {opts.real_weight}x as often: "
                 f"{(len(draw_pool) - n) // (opts.real_weight - 1)} of {n} training images are real")
    return TrainingData(x_tr, y_tr, w_tr, x_va, y_va, len(tr_idx), partners, draw_pool)


# ------------------------------------------------------------------------------------- optimiser

@dataclass
class TrainingState:
    """What an epoch changes, and what OUT.state.pt saves to resume."""
    model: MDIQA
    optim: torch.optim.Optimizer
    sched: Any  # LambdaLR
    gen: torch.Generator
    steps_per_epoch: int
    epoch: int = 0  # epochs done
    best: float = -float("inf")  # selection score of the best epoch so far
    history: list[dict[str, Any]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        torch.save({"model": self.model.state_dict(), "optim": self.optim.state_dict(),
                    "sched": self.sched.state_dict(), "gen": self.gen.get_state(),
                    "torch_rng": torch.get_rng_state(), "epoch": self.epoch, "best": self.best,
                    "history": json.dumps(self.history)}, path)

    def load(self, path: Path) -> None:
        st = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(st["model"])
        self.optim.load_state_dict(st["optim"])
        self.sched.load_state_dict(st["sched"])
        self.gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        self.epoch, self.best = int(st["epoch"]), float(st["best"])
        self.history = json.loads(st["history"])


def new_state(cfg: MDIQAConfig, opts: TrainOptions, n: int, gen: torch.Generator) -> TrainingState:
    """A fresh model, AdamW (no weight decay on biases, norms and embeddings) and the schedule:
    linear warm-up over ``warmup_epochs``, then cosine decay to 0 at the last step."""
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
    return TrainingState(model, optim, sched, gen, steps_per_epoch)


# ---------------------------------------------------------------------------------------- epochs

def train_epoch(st: TrainingState, data: TrainingData, opts: TrainOptions,
                progress: Callable[[str], None] = _log) -> dict[str, Any]:
    """One pass over the training rows (epoch ``st.epoch + 1``); returns its history record."""
    model, gen, n, steps = st.model, st.gen, data.n, st.steps_per_epoch
    epoch = st.epoch
    perm = torch.randperm(n, generator=gen)
    if len(data.draw_pool) > n:  # (with uniform drawing the permutation is as before: same runs, same seeds)
        perm = data.draw_pool[torch.randperm(len(data.draw_pool), generator=gen)]
    t_ep, run_loss = time.time(), 0.0
    for b in range(steps):
        if data.partners:
            half = max(1, opts.batch_size // 2)
            at = (b * half) % len(perm)
            ib, better, worse = pair_batch(perm[at:at + half], data.partners, n, gen)
        else:
            ib = perm[b * opts.batch_size:(b + 1) * opts.batch_size]
        xb = augment(data.x_tr[ib], generator=gen)
        out = model(xb)
        loss = loss_fn(model, out, data.y_tr[ib], data.w_tr[ib])
        if data.partners:
            s_b = soft_score(model, out)
            loss = loss + opts.rank_weight * rank_loss(s_b[better], s_b[worse], opts.rank_margin)
        st.optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        st.optim.step()
        st.sched.step()
        run_loss += loss.item()
        if (b + 1) % 20 == 0 or b + 1 == steps:
            el = time.time() - t_ep
            rate = (b + 1) * opts.batch_size / max(el, 1e-9)
            eta = (steps - b - 1 + (opts.epochs - epoch - 1) * steps) * opts.batch_size / rate
            progress(f"train: epoch {epoch + 1}/{opts.epochs} step {b + 1}/{steps} "
                     f"loss {run_loss / (b + 1):.4f} lr {st.sched.get_last_lr()[0]:.2e} "
                     f"{rate:.1f} img/s ETA {eta / 60:.1f} min")
    return {"epoch": epoch + 1, "train_loss": run_loss / steps, "seconds": round(time.time() - t_ep, 1)}


def validate(model: MDIQA, data: TrainingData, rec: dict[str, Any]) -> float:
    """Add the validation loss and metrics to ``rec``; returns the epoch's selection score (the
    validation PLCC+SROCC+KROCC; minus the training loss with fewer than 3 validation images)."""
    if len(data.y_va) < 3:
        return -rec["train_loss"]
    val_out = predict_raw(model, data.x_va)
    rec["val_loss"] = float(loss_fn(model, val_out, torch.from_numpy(data.y_va)))
    rec["val"] = evaluate_outputs(model, val_out, data.y_va)
    return rec["val"]["overall"]


def write_epoch(st: TrainingState, score: float, opts: TrainOptions, cfg: MDIQAConfig, data: TrainingData,
                extra_info: dict[str, Any] | None, t_start: float, progress: Callable[[str], None] = _log) -> None:
    """After an epoch: the checkpoint OUT if this epoch is the best so far, and OUT.state.pt."""
    out_path = Path(opts.out)
    if not math.isfinite(st.best) or score > st.best:
        st.best = score
        summary = _summary(opts, cfg, st.history, data.n_labeled, len(data.y_va), extra_info, t_start)
        save_checkpoint(st.model, cfg, out_path, summary)
        progress(f"train: saved best checkpoint {out_path} (validation overall {score:.4f})")
    st.save(_state_path(out_path))


def finish(opts: TrainOptions, data: TrainingData, history: list[dict[str, Any]], t_start: float,
           progress: Callable[[str], None] = _log) -> dict[str, Any]:
    """Reload the best epoch's checkpoint, fit the interval temperature on the validation split
    (``opts.calibrate``) and write the final checkpoint; returns its summary."""
    from qcnode.model.scorer import model_from_checkpoint, read_checkpoint
    out_path = Path(opts.out)
    best_model, cfg = model_from_checkpoint(read_checkpoint(out_path), out_path)
    summary = dict(read_checkpoint(out_path).get("meta") or {})
    if opts.calibrate and len(data.y_va) >= 10 and best_model.is_distribution:
        val_out = predict_raw(best_model, data.x_va)
        t, raw, fin = fit_interval_temperature(best_model, val_out, data.y_va)
        cfg.interval_temperature = t
        summary["interval_calibration"] = {"temperature": t, "validation_coverage_uncalibrated": raw,
                                           "validation_coverage_calibrated": fin, "target": TARGET_COVERAGE}
        progress(f"train: interval temperature {t:.3f} (validation coverage {raw:.3f} -> {fin:.3f})")
    summary["history"] = history
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    save_checkpoint(best_model, cfg, out_path, summary)
    progress(f"train: wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB) in {summary['wall_seconds']:.0f} s")
    return summary


def train(opts: TrainOptions, extra_x: torch.Tensor | None = None, extra_y: np.ndarray | None = None,
          extra_info: dict[str, Any] | None = None,
          progress: Callable[[str], None] = _log) -> dict[str, Any]:
    """Train one model; returns the summary stored in the checkpoint metadata.

    ``extra_x``/``extra_y``: additional (pseudo-labeled) preprocessed images and labels used for
    training only, weighted by ``opts.pseudo_weight``. ``opts.resume`` continues from OUT.state.pt.
    """
    if opts.threads and opts.threads > 0:
        torch.set_num_threads(opts.threads)
    gen = seed_everything(opts.seed)
    cfg = MDIQAConfig.from_dict(opts.config) if opts.config else MDIQAConfig()
    t_start = time.time()
    data = prepare_data(opts, cfg, extra_x, extra_y, progress)
    st = new_state(cfg, opts, data.n, gen)
    state_path = _state_path(Path(opts.out))
    if opts.resume and state_path.is_file():
        st.load(state_path)
        progress(f"train: resumed from {state_path} at epoch {st.epoch}/{opts.epochs}")
    elif opts.resume:
        progress(f"train: no state file {state_path}; starting from scratch")
    while st.epoch < opts.epochs:
        rec = train_epoch(st, data, opts, progress)
        score = validate(st.model, data, rec)
        st.history.append(rec)
        st.epoch += 1
        progress(f"train: epoch {st.epoch} done: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                                for k, v in _flat(rec).items()}))
        write_epoch(st, score, opts, cfg, data, extra_info, t_start, progress)
    return finish(opts, data, st.history, t_start, progress)


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
