"""Evaluation of a checkpoint on labeled data (``qcnode evaluate``).

For the model and for the physics baseline (minus the global noise level, GNL,
``qcnode.dicom.physics.global_noise_level``): raw PLCC, SROCC, KROCC and their sum (the challenge
score), PLCC after the 4-parameter logistic fit and (model only) the 5-95 % interval coverage;
the same per subgroup when meta.csv is present (streak-degraded, noise-only, per anatomy); dose
monotonicity (Kendall tau between dose and prediction per source slice and view count); the
labels' ceiling where meta.csv carries the reader model's inputs (an oracle predicting
``qcnode.simulation.readers.expected_reader_mean``: no model can be expected to beat it); a
scatter plot and a per-image predictions CSV. Data: an LDCTIQAC2023-layout folder of tifs, or a
folder of DICOM with a site's own readers' labels (``load_dicom_labeled``).
"""
from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats

from qcnode.training.data import load_labeled, meta_value, preprocess, read_tif_hu
from qcnode.training.metrics import all_metrics

MIN_GROUP = 5


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class EvalSet:
    """Labeled images to evaluate, whatever their layout: names, labels, meta rows, and a loader of
    image i in HU."""
    names: list[str]
    labels: np.ndarray
    meta: list[dict[str, str]]
    spacings: list[float | None]
    load_hu: Callable[[int], np.ndarray]
    reading: str  # how pixel values became HU (reported)

    def __len__(self) -> int:
        return len(self.names)


def tif_eval_set(data: str | Path, convention: str | None = None) -> EvalSet:
    """An LDCTIQAC2023-layout folder as an EvalSet (tifs mapped to HU under the folder's convention)."""
    ds = load_labeled(data, convention)
    paths = ds.paths()
    spacings = [meta_value(m, "pixel_spacing_mm") for m in ds.meta]
    return EvalSet(ds.files, ds.labels.astype(np.float64), ds.meta,
                   [s if math.isfinite(s) else None for s in spacings],
                   lambda i: read_tif_hu(paths[i], ds.convention), f"tif convention {ds.convention.describe()}")


def read_label_file(path: str | Path) -> dict[str, float]:
    """A labels file: JSON {key: score} or CSV with a key column (file, path, sop_instance_uid or
    SOPInstanceUID) and a score column (score or label)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() == ".json":
        raw = json.loads(text)
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"{path}: expected a non-empty JSON object {{file or SOP Instance UID: score}}")
        items = raw.items()
    else:
        rows = list(csv.DictReader(text.splitlines()))
        cols = {c.lower(): c for c in (rows[0].keys() if rows else [])}
        key = next((cols[c] for c in ("file", "path", "sop_instance_uid", "sopinstanceuid") if c in cols), None)
        score = next((cols[c] for c in ("score", "label") if c in cols), None)
        if key is None or score is None:
            raise ValueError(f"{path}: CSV needs a file (or sop_instance_uid) column and a score column")
        items = [(r[key], r[score]) for r in rows]
    out = {}
    for k, v in items:
        try:
            out[str(k).strip()] = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: non-numeric score {v!r} for {k!r}") from None
    return out


def load_dicom_labeled(folder: str | Path, labels_file: str | Path) -> EvalSet:
    """DICOM slices under ``folder`` labeled by ``labels_file`` (keys: the file's path relative to
    the folder, its name, or its SOP Instance UID). Every label must match a scorable slice."""
    from qcnode.dicom.pixels import SkipSlice, UnreadableFile, load_slices

    folder = Path(folder)
    labels = read_label_file(labels_file)
    found: dict[str, tuple[str, object]] = {}
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    names = Counter(f.name for f in files)
    ambiguous = sorted(k for k in labels if names[k] > 1)
    if ambiguous:
        raise ValueError(f"{labels_file}: file name {ambiguous[0]!r} is in several subfolders of {folder}; "
                         "label it by its relative path or SOP Instance UID")
    for f in files:
        try:
            slices = load_slices(f)
        except (SkipSlice, UnreadableFile):
            continue
        for sl in slices:
            rel = f.relative_to(folder).as_posix()
            for key in (rel, f.name, sl.sop_instance_uid):
                if key in labels and key not in found:
                    found[key] = (rel, sl)
    missing = sorted(set(labels) - set(found))
    if missing:
        raise ValueError(f"{labels_file}: {len(missing)} labeled entries match no scorable DICOM slice "
                         f"under {folder}, e.g. {missing[:3]}")
    keys = sorted(found, key=lambda k: found[k][0])
    slices = [found[k][1] for k in keys]
    spacings = [float(s.pixel_spacing_mm[0]) if s.pixel_spacing_mm else None for s in slices]
    return EvalSet([found[k][0] for k in keys], np.asarray([labels[k] for k in keys], dtype=np.float64),
                   [{} for _ in keys], spacings, lambda i: slices[i].hu, "DICOM (HU from the rescale tags)")


def baseline_gnl(es: EvalSet, progress: Callable[[str], None] = _log) -> np.ndarray:
    """Global noise level (HU) per image; NaN where it is undefined (too little soft tissue)."""
    from qcnode.dicom.physics import global_noise_level

    out = np.full(len(es), np.nan)
    for i in range(len(es)):
        v = global_noise_level(es.load_hu(i), es.spacings[i])
        out[i] = np.nan if v is None else v
        if (i + 1) % 500 == 0:
            progress(f"evaluate: baseline GNL {i + 1}/{len(es)}")
    return out


def dose_monotonicity(meta: list[dict[str, str]], pred: np.ndarray) -> dict[str, Any]:
    """Kendall tau between dose fraction and prediction per (source slice, views) group."""
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for i, m in enumerate(meta):
        if m.get("source_id") and m.get("dose_fraction"):
            groups[(m["source_id"], m.get("series", ""), m.get("views", ""))].append(i)
    taus = []
    for idx in groups.values():
        dose = np.asarray([meta_value(meta[i], "dose_fraction") for i in idx])
        if len(set(dose.tolist())) < 3:
            continue
        t = stats.kendalltau(dose, pred[idx]).statistic
        taus.append(0.0 if np.isnan(t) else float(t))
    if not taus:
        return {"n_groups": 0}
    a = np.asarray(taus)
    return {"n_groups": int(a.size), "mean_tau": float(a.mean()), "median_tau": float(np.median(a)),
            "min_tau": float(a.min()), "fraction_tau_ge_0.9": float(np.mean(a >= 0.9 - 1e-9))}


def reader_oracle(meta: list[dict[str, str]], readers: Sequence[Any] | None = None) -> np.ndarray | None:
    """The reader-model oracle's prediction per image (None without the needed meta columns); ``readers``
    are those that made the labels (default: today's READERS)."""
    from qcnode.simulation.readers import READERS, expected_reader_mean, routine_own_noise

    readers = readers or READERS
    oracle = []
    for m in meta:
        noise, streak = meta_value(m, "noise_hu"), meta_value(m, "streak_index")
        if not (math.isfinite(noise) and math.isfinite(streak) and m.get("anatomy")):
            return None
        oracle.append(expected_reader_mean(noise, streak, m["anatomy"], readers, routine_own_noise(m)))
    return np.asarray(oracle) if oracle else None


def _subgroups(meta: list[dict[str, str]]) -> dict[str, np.ndarray]:
    if not any(meta):
        return {}
    views = np.asarray([meta_value(m, "views") for m in meta])
    out: dict[str, np.ndarray] = {}
    if np.isfinite(views).any():
        vmax = np.nanmax(views)
        out["streak_degraded"] = views < vmax
        out["noise_only"] = views == vmax
    for key in ("anatomy", "source_kind"):
        for val in sorted({m.get(key, "") for m in meta} - {""}):
            out[f"{key}={val}"] = np.asarray([m.get(key) == val for m in meta])
    return out


def _metrics_or_none(pred: np.ndarray, label: np.ndarray, low=None, high=None) -> dict[str, Any] | None:
    ok = np.isfinite(pred)
    if ok.sum() < MIN_GROUP:
        return None
    if low is not None:
        return all_metrics(pred[ok], label[ok], low[ok], high[ok])
    return all_metrics(pred[ok], label[ok])


def evaluate(model: str | Path | None, data: str | Path, out_dir: str | Path | None = None,
             batch_size: int = 32, baseline: bool = True, threads: int = 0,
             progress: Callable[[str], None] = _log, labels_file: str | Path | None = None,
             convention: str | None = None, with_predictions: bool = False) -> dict[str, Any]:
    """Score a labeled folder (LDCTIQAC2023 tifs, or DICOM with ``labels_file``) and compute every
    metric; writes metrics.json, predictions.csv and scatter.png into ``out_dir`` when given.
    Returns the metrics dict (with ``with_predictions``, also {"predictions": {name: score}})."""
    import torch

    from qcnode.model.scorer import Scorer

    t0 = time.time()
    scorer = Scorer.load(model, threads=threads)
    ds = load_dicom_labeled(data, labels_file) if labels_file else tif_eval_set(data, convention)
    progress(f"evaluate: {len(ds)} images in {data} ({ds.reading}) with {scorer.version}")
    xs = [preprocess(ds.load_hu(i), scorer.config.input_size, scorer.config.window_hu) for i in range(len(ds))]
    res = scorer.score_tensors(torch.stack(xs), batch_size)
    pred = np.asarray([r.score for r in res])
    low = np.asarray([r.score_low for r in res])
    high = np.asarray([r.score_high for r in res])
    label = ds.labels
    progress(f"evaluate: scored {len(res)} images in {time.time() - t0:.1f} s")

    result: dict[str, Any] = {"model": scorer.info["version"], "data": str(data), "reading": ds.reading,
                              "n": len(ds), "model_metrics": _metrics_or_none(pred, label, low, high),
                              "mean_absolute_error": float(np.mean(np.abs(pred - label))),
                              "interval_coverage": float(np.mean((low <= label) & (label <= high))),
                              "mean_interval_width": float(np.mean(high - low))}
    gnl = None
    if baseline:
        gnl = baseline_gnl(ds, progress)
        result["baseline"] = {"name": "global noise level (mode of local SD in soft tissue, HU); prediction = -GNL",
                              "n_undefined": int(np.isnan(gnl).sum()),
                              "metrics": _metrics_or_none(-gnl, label)}
    from qcnode.simulation.readers import recorded_readers
    oracle = reader_oracle(ds.meta, recorded_readers(Path(data)))
    if oracle is not None:
        result["label_ceiling"] = {"name": "reader-model oracle: expected mean reader score from the true "
                                           "noise_hu and streak_index (meta.csv)",
                                   "metrics": _metrics_or_none(oracle, label)}
    groups = _subgroups(ds.meta)
    result["subgroups"] = {}
    for name, mask in groups.items():
        if not mask.any():
            continue
        entry = {"n": int(mask.sum()), "model": _metrics_or_none(pred[mask], label[mask], low[mask], high[mask])}
        if gnl is not None:
            entry["baseline"] = _metrics_or_none(-gnl[mask], label[mask])
        if oracle is not None:
            entry["label_ceiling"] = _metrics_or_none(oracle[mask], label[mask])
        result["subgroups"][name] = entry
    if any(ds.meta):
        result["dose_monotonicity"] = {"model": dose_monotonicity(ds.meta, pred),
                                       "labels": dose_monotonicity(ds.meta, label)}
        if gnl is not None:
            result["dose_monotonicity"]["baseline"] = dose_monotonicity(ds.meta, np.nan_to_num(-gnl, nan=0.0))
    result["seconds"] = round(time.time() - t0, 1)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
        _write_predictions(out / "predictions.csv", ds.names, label, pred, low, high, gnl, ds.meta)
        scatter_plot(out / "scatter.png", label, pred, low, high, gnl, groups.get("streak_degraded"),
                     title=f"{scorer.version} on {Path(data).name}")
        result["outputs"] = [str(out / n) for n in ("metrics.json", "predictions.csv", "scatter.png")]
    if with_predictions:
        result["predictions"] = dict(zip(ds.names, pred.tolist()))
    return result


def _write_predictions(path: Path, files, label, pred, low, high, gnl, meta) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "score", "score_low", "score_high", "gnl_hu", "dose_fraction", "views", "source_id"])
        for i, f in enumerate(files):
            m = meta[i] if meta else {}
            w.writerow([f, f"{label[i]:.3f}", f"{pred[i]:.4f}", f"{low[i]:.4f}", f"{high[i]:.4f}",
                        "" if gnl is None or np.isnan(gnl[i]) else f"{gnl[i]:.3f}",
                        m.get("dose_fraction", ""), m.get("views", ""), m.get("source_id", "")])


def scatter_plot(path: Path, label: np.ndarray, pred: np.ndarray, low: np.ndarray, high: np.ndarray,
                 gnl: np.ndarray | None, streak: np.ndarray | None, title: str = "") -> None:
    """Predicted-vs-label scatter (with 5-95 % intervals) and, if given, GNL-vs-label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = 2 if gnl is not None else 1
    fig, axes = plt.subplots(1, ncol, figsize=(5.5 * ncol, 5), squeeze=False)
    ax = axes[0, 0]
    jitter = np.random.default_rng(0).uniform(-0.04, 0.04, label.size)
    masks = [(np.ones(label.size, bool), "images", "tab:blue")] if streak is None else \
        [(~streak, "full views (noise)", "tab:blue"), (streak, "fewer views (streaks)", "tab:red")]
    for m, name, color in masks:
        ax.errorbar(label[m] + jitter[m], pred[m], yerr=[pred[m] - low[m], high[m] - pred[m]], fmt="o", ms=2.5,
                    alpha=0.35, elinewidth=0.5, color=color, label=name)
    ax.plot([0, 4], [0, 4], "k--", lw=1)
    ax.set_xlim(-0.2, 4.2)
    ax.set_ylim(-0.2, 4.2)
    ax.set_xlabel("label (mean reader score)")
    ax.set_ylabel("MD-IQA score (bars: 5-95 % interval)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    if gnl is not None:
        ax = axes[0, 1]
        for m, name, color in masks:
            ax.scatter(label[m] + jitter[m], gnl[m], s=5, alpha=0.4, color=color, label=name)
        ax.set_xlabel("label (mean reader score)")
        ax.set_ylabel("global noise level (HU)")
        ax.set_title("physics baseline", fontsize=9)
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
