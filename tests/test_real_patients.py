"""The shipped model on real patients it never trained on (models/clinical_split.json's validation
patients): routine scans PASS, smooth kernels above sharp, lower doses lower, and a challenge tif
scores as its DICOM."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from qcnode.config import VerdictConfig
from qcnode.dicom.pixels import load_slices
from qcnode.training import realval
from qcnode.simulation import simulate, sources
from qcnode.training.data import LDCTIQAC_WINDOW_HU, preprocess_tif
from qcnode.model.scorer import Scorer

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CLINICAL = PROJECT_ROOT.parent / "shared" / "data" / "clinical_ct"
SPLIT = PROJECT_ROOT / "models" / "clinical_split.json"

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer.load(None)


@pytest.fixture(scope="module")
def validation_series(scorer) -> list[realval.SeriesCheck]:
    if not CLINICAL.is_dir():
        pytest.fail(f"shared clinical CT missing at {CLINICAL}")
    return realval.score_series(scorer, [CLINICAL], realval.SplitFile.read(SPLIT), VerdictConfig(),
                                progress=lambda _: None)


def test_shipped_model_trained_without_the_validation_patients(scorer):
    assert len(realval.SplitFile.read(SPLIT).validation_patients) == 16
    options = scorer.info["training"]["options"]
    # simulate's train split holds only training patients; the val split only validated
    assert Path(options["data"]).name == "train" and Path(options["val_data"]).name == "val"


def test_shipped_model_scores_each_slice_and_its_mirror(scorer, shared_ct):
    """The card's inference: two views per slice (as is, left-right mirror), so a slice and its
    mirror image get the same score and interval."""
    from qcnode.dicom.pixels import load_slices

    assert scorer.config.test_time_views == 2
    hu = load_slices(shared_ct / "ge_head" / "05.dcm")[0].hu
    a, b = scorer.score_hu([hu, hu[:, ::-1].copy()])
    assert a.score == pytest.approx(b.score, abs=1e-4) and a.score_low == pytest.approx(b.score_low, abs=1e-4)


@pytest.mark.slow
def test_routine_smooth_kernel_series_pass(validation_series):
    """Every routine diagnostic smooth-kernel series of the validation patients PASSes. Not routine
    (not held to PASS): the PET/CT folders and, by their headers, single slices of PET/CT, bolus
    tracking and CT-guided interventions (qcnode.dicom.acquisition)."""
    must = [c for c in validation_series if c.must_pass]
    assert len(must) == 12 and {c.kernel_class for c in must} == {"smooth"}
    series = [(c.series, c.mean_score, c.verdict) for c in must if c.n_slices > 1]
    assert len(series) == 3 and all(v == "PASS" and m >= 3.0 for _, m, v in series), series
    assert all(c.verdict == "PASS" for c in must), [(c.series, c.mean_score, c.verdict) for c in must]
    # the smooth-kernel slices left out by their headers: a bolus-tracking monitor scan, a pre-scan of
    # a CT-guided intervention, PET/CT and CT-guided biopsies; none is a routine diagnostic scan
    left_out = [c for c in validation_series if c.kernel_class == "smooth" and not c.routine
                and c.series.startswith("tcga_lung_single_slices/")]
    assert len(left_out) == 7


@pytest.mark.slow
def test_smooth_twin_scores_above_sharp_twin(validation_series):
    pairs = realval.kernel_pair_order(validation_series, realval.SplitFile.read(SPLIT).kernel_pairs)
    assert len(pairs) == 1  # the validation patient's pair (the other pair's patient trained)
    for p in pairs:
        assert p["smooth_above_sharp"] and p["slice_pairs_in_order"] >= 0.9, p


@pytest.mark.slow
def test_simulated_lower_doses_of_real_slices_score_lower(scorer):
    held_out = realval.SplitFile.read(SPLIT).validation_patients
    real = [r for r in sources.find_real_slices([CLINICAL / "lidc_idri_0001", CLINICAL / "lung_pet_ct_dx"])
            if r.patient in held_out]
    chosen = sources.thin_series([r for r in real if realval.kernel_class(r.kernel) == "smooth"], 2)
    variants = [(d, v) for v in (720, 128) for d in (1.0, 0.75, 0.5, 0.25)]
    specs = [sources.SourceSpec(r.source_id, "real", r.anatomy, r.series, "val", path=r.path, variants=variants)
             for r in chosen]
    out = simulate.simulate_sources(specs, 256)
    scores = scorer.score_hu([img for _, _, img, _ in out])
    by_group: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for (spec, _, _, row), q in zip(out, scores):
        by_group.setdefault((spec.source_id, row["views"]), []).append((row["dose_fraction"], q.score))
    assert len(by_group) == 2 * len(chosen) >= 8
    steps = []
    for key, pts in by_group.items():
        pts.sort(reverse=True)
        assert pts[0][1] > pts[-1][1], (key, pts)  # full dose above quarter dose, every slice
        steps += [hi[1] > lo[1] for hi, lo in zip(pts, pts[1:])]
    assert np.mean(steps) >= 0.9  # each dose step down scores lower (the card has the whole validation)


def test_challenge_tif_and_its_dicom_score_alike(scorer, tmp_path, shared_ct):
    """A slice written out in the challenge convention ([0, 1] = [-1000, 400] HU) scores within
    0.05 of the DICOM itself; the model's input window is the challenge's, so clipping never differs."""
    assert tuple(scorer.config.window_hu) == LDCTIQAC_WINDOW_HU
    for path in (CLINICAL / "lidc_idri_0001", shared_ct / "ge_head"):
        f = sorted(p for p in path.iterdir() if p.suffix == ".dcm")[len(list(path.iterdir())) // 2]
        hu = load_slices(f)[0].hu
        lo, hi = LDCTIQAC_WINDOW_HU
        tifffile.imwrite(tmp_path / "x.tif", np.clip((hu - lo) / (hi - lo), 0, 1).astype(np.float32))
        x_tif = preprocess_tif(tmp_path / "x.tif", scorer.config.input_size, scorer.config.window_hu)
        from_tif = scorer.score_tensors(x_tif[None])[0].score
        from_dicom = scorer.score_hu([hu])[0].score
        assert abs(from_tif - from_dicom) <= 0.05, (f, from_tif, from_dicom)
