"""Validation on real patients' CT (``qcnode validate``): does the score mean what a radiologist means?

On the held-out patients of ``models/clinical_split.json`` (split by patient, never by slice):

(a) every routine diagnostic series reconstructed with a smooth or standard kernel PASSes under
    the verdict config (a diagnostic scan is 3-4 on the LDCTIQAC2023 scale); routine: not in a folder
    the split file lists as not routine, and no header word of a PET/CT, bolus-tracking, localisation
    or interventional scan (``qcnode.dicom.acquisition``);
(b) each kernel pair (the same acquisition reconstructed smooth and sharp) scores higher smooth:
    the sharp kernel is read in the soft-tissue window and looks noisier;
(c) simulated lower doses of the real slices score lower, slice by slice (a folder made by
    ``qcnode simulate``: for every source slice and view count, each dose step down);
(d) the usual sums on those simulated images, with the physics baseline beside them
    (``qcnode evaluate``).
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from qcnode.dicom.acquisition import kernel_class


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class SeriesCheck:
    """One real series scored as the daemon would: summary, verdict, and what it should be."""
    series: str
    patient_group: str  # "validation" or "training"
    kernel: str
    kernel_class: str
    routine: bool  # a routine diagnostic acquisition (``RealSlice.routine``: not PET/CT, bolus tracking, ...)
    n_slices: int
    mean_score: float
    fraction_below: float
    verdict: str
    scores: list[float]

    @property
    def must_pass(self) -> bool:
        return self.routine and self.kernel_class == "smooth"


@dataclass
class SplitFile:
    """models/clinical_split.json: who is held out, which series are routine, the kernel pairs."""
    validation_patients: set[str]
    not_routine: set[str]  # series (folder names) that are not routine diagnostic CT (PET/CT)
    kernel_pairs: list[tuple[str, str]]  # (smooth series, sharp series) of one acquisition

    @classmethod
    def read(cls, path: str | Path) -> "SplitFile":
        doc = json.loads(Path(path).read_text())
        if not isinstance(doc.get("not_routine_series", []), list):
            raise ValueError(f"{path}: not_routine_series must be a list of folder names")
        return cls(set(doc["validation_patients"]), set(doc.get("not_routine_series", [])),
                   [tuple(p) for p in doc.get("kernel_pairs", [])])


def score_series(scorer, clinical_dirs: Sequence[Path], split: SplitFile, verdict_config,
                 patients: str = "validation", progress: Callable[[str], None] = _log) -> list[SeriesCheck]:
    """Score every slice of the chosen patients' series (``patients``: validation, training or all)."""
    from qcnode.dicom.pixels import load_slices
    from qcnode.simulation.sources import find_real_slices
    from qcnode.scoring.summary import summarise

    groups: dict[tuple[str, str], list] = defaultdict(list)
    for r in find_real_slices(clinical_dirs):
        group = "validation" if r.patient in split.validation_patients else "training"
        if patients != "all" and group != patients:
            continue
        groups[(r.acquisition, group)].append(r)
    per_folder = Counter(slices[0].series for slices in groups.values())
    named: dict[tuple[str, str], list] = {}
    for (acquisition, group), slices in groups.items():
        # a folder holding several acquisitions names each by a digest, never by the patient ID
        folder = slices[0].series
        digest = hashlib.sha256(acquisition.encode()).hexdigest()[:8]
        named[(f"{folder}/{digest}" if per_folder[folder] > 1 else folder, group)] = slices
    groups = named
    out = []
    for (series, group), slices in sorted(groups.items()):
        scores = [q.score for q in scorer.score_hu([load_slices(r.path)[0].hu for r in slices])]
        s = summarise(scores, verdict_config.slice_threshold, verdict_config)
        out.append(SeriesCheck(series, group, slices[0].kernel, kernel_class(slices[0].kernel),
                               all(r.routine(split.not_routine) for r in slices), len(scores),
                               round(s.mean_score, 4), round(s.fraction_below, 4), str(s.verdict),
                               [round(x, 4) for x in scores]))
        progress(f"validate: {series} ({slices[0].kernel}): mean {s.mean_score:.2f} {s.verdict}")
    return out


def kernel_pair_order(checks: Sequence[SeriesCheck], pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Smooth vs sharp twin: series means and the fraction of slice pairs (same position) in order."""
    by_name = {c.series: c for c in checks}
    out = []
    for smooth, sharp in pairs:
        if smooth not in by_name or sharp not in by_name:
            continue
        a, b = by_name[smooth], by_name[sharp]
        n = min(len(a.scores), len(b.scores))
        ordered = float(np.mean(np.asarray(a.scores[:n]) > np.asarray(b.scores[:n]))) if n else float("nan")
        out.append({"smooth": smooth, "sharp": sharp, "smooth_mean": a.mean_score, "sharp_mean": b.mean_score,
                    "smooth_above_sharp": a.mean_score > b.mean_score, "slice_pairs_in_order": ordered})
    return out


def dose_order(sim_folder: str | Path, predictions: dict[str, float]) -> dict[str, Any]:
    """Slice-by-slice dose order of the simulated real slices of a ``qcnode simulate`` split.

    For every (source slice, views) the score must fall at each dose step down; reports the
    fraction of those steps in order, of full-dose-above-quarter-dose pairs, and of groups
    entirely in order."""
    from qcnode.training.data import read_meta

    meta = read_meta(Path(sim_folder))
    groups: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for f, row in meta.items():
        if row.get("source_kind") == "real" and f in predictions:
            groups[(row["source_id"], row["views"])].append((float(row["dose_fraction"]), predictions[f]))
    steps = full_vs_quarter = groups_ok = 0
    n_steps = n_pairs = 0
    for pts in groups.values():
        pts.sort(reverse=True)  # highest dose first
        ok = [hi[1] > lo[1] for hi, lo in zip(pts, pts[1:])]
        steps += sum(ok)
        n_steps += len(ok)
        groups_ok += all(ok)
        if pts[0][0] == 1.0 and pts[-1][0] <= 0.25:
            n_pairs += 1
            full_vs_quarter += pts[0][1] > pts[-1][1]
    return {"groups": len(groups), "fraction_steps_in_order": steps / n_steps if n_steps else None,
            "fraction_groups_in_order": groups_ok / len(groups) if groups else None,
            "full_above_quarter_dose": full_vs_quarter / n_pairs if n_pairs else None}


def validate(model: str | Path | None, clinical_dirs: Sequence[Path], split_path: str | Path,
             sim_folder: str | Path | None, verdict_config, patients: str = "validation",
             progress: Callable[[str], None] = _log) -> dict[str, Any]:
    """Checks (a)-(d) of the module docstring for one checkpoint; returns a JSON-ready dict."""
    from qcnode.model.scorer import Scorer

    scorer = Scorer.load(model)
    split = SplitFile.read(split_path)
    checks = score_series(scorer, clinical_dirs, split, verdict_config, patients, progress)
    must = [c for c in checks if c.must_pass]
    result: dict[str, Any] = {
        "model": scorer.version, "patients": patients,
        "a_routine_smooth_series": {"n": len(must), "pass": sum(c.verdict == "PASS" for c in must),
                                    "not_pass": [c.series for c in must if c.verdict != "PASS"]},
        "b_kernel_pairs": kernel_pair_order(checks, split.kernel_pairs),
        "series": [{k: v for k, v in asdict(c).items() if k != "scores"} for c in checks],
    }
    if sim_folder is not None:
        from qcnode.training.evaluate import evaluate
        metrics = evaluate(model, sim_folder, baseline=True, progress=progress, with_predictions=True)
        result["c_dose_order"] = dose_order(sim_folder, metrics["predictions"])
        result["d_simulated"] = {k: metrics.get(k) for k in ("data", "n", "model_metrics", "baseline",
                                                             "label_ceiling", "interval_coverage",
                                                             "mean_absolute_error")}
    return result
