"""``qcnode evaluate``: metrics, physics baseline, dose monotonicity, scatter plot."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from iqa_helpers import TINY_CONFIG, make_tiny_dataset
from qcnode.cli import main as qcnode_main
from qcnode.model.network import MDIQAConfig
from qcnode.model.scorer import write_untrained_checkpoint

torch.set_num_threads(1)


def test_evaluate_writes_metrics_plot_and_baseline(tmp_path, capsys):
    data = make_tiny_dataset(tmp_path / "test", n_sources=3, size=64, split="test")
    model = write_untrained_checkpoint(tmp_path / "m.pt", MDIQAConfig.from_dict({**MDIQAConfig().to_dict(),
                                                                               **TINY_CONFIG}))
    out = tmp_path / "eval"
    assert qcnode_main(["evaluate", "--model", str(model), "--data", str(data), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "metrics.json").read_text())
    assert printed["model_metrics"] == saved["model_metrics"]
    m = saved["model_metrics"]
    assert m["n"] == 12 and m["overall"] == pytest.approx(m["plcc"] + m["srocc"] + m["krocc"])
    assert 0.0 <= m["coverage"] <= 1.0
    # the physics baseline (-GNL) recovers the known noise law of the tiny data almost perfectly
    base = saved["baseline"]["metrics"]
    assert base["srocc"] > 0.9
    mono = saved["dose_monotonicity"]
    assert mono["baseline"]["n_groups"] == 3 and mono["baseline"]["mean_tau"] > 0.9
    assert (out / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "predictions.csv").read_text().splitlines()) == 13


def test_evaluate_reports_the_labels_ceiling(tmp_path, capsys):
    import csv

    from qcnode.simulation.readers import expected_reader_mean
    data = make_tiny_dataset(tmp_path / "test", n_sources=3, size=64, split="test")
    model = write_untrained_checkpoint(tmp_path / "m.pt", MDIQAConfig.from_dict({**MDIQAConfig().to_dict(),
                                                                               **TINY_CONFIG}))
    args = ["evaluate", "--model", str(model), "--data", str(data), "--no-baseline"]
    assert qcnode_main(args) == 0
    assert "label_ceiling" not in json.loads(capsys.readouterr().out)  # meta.csv lacks the reader inputs
    with (data / "meta.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows):  # labels = the reader model's expectation, except one image
        row.update(streak_index=8.0 * (i % 3), anatomy="body")
        row["label"] = round(expected_reader_mean(float(row["noise_hu"]), row["streak_index"], "body"), 3)
    rows[0]["label"] = 4.0 - float(rows[0]["label"])
    with (data / "meta.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (data / "test.json").write_text(json.dumps({r["file"]: float(r["label"]) for r in rows}))
    assert qcnode_main(args) == 0
    ceiling = json.loads(capsys.readouterr().out)["label_ceiling"]["metrics"]
    assert ceiling["n"] == 12 and 1.0 < ceiling["overall"] < 3.0 - 1e-6  # one label is off
    # Labels made by other readers (an older simulation): the oracle uses the readers its record names.
    from dataclasses import asdict, replace

    from qcnode.simulation.readers import READERS
    older = [replace(r, noise_tolerance_hu=r.noise_tolerance_hu * 3, streak_step=r.streak_step * 2) for r in READERS]
    labels = {r["file"]: expected_reader_mean(float(r["noise_hu"]), r["streak_index"], "body", older) for r in rows}
    assert np.corrcoef(list(labels.values()),
                       [expected_reader_mean(float(r["noise_hu"]), r["streak_index"], "body") for r in rows])[0, 1] < 0.999
    (data / "test.json").write_text(json.dumps(labels))
    (data.parent / "simulation.json").write_text(json.dumps({"readers": [asdict(r) for r in older]}))
    assert qcnode_main(args) == 0
    assert json.loads(capsys.readouterr().out)["label_ceiling"]["metrics"]["plcc"] > 0.9999
    # a routine smooth-kernel slice (meta.csv routine_smooth 1) is read as routine by the oracle too
    from qcnode.training.evaluate import reader_oracle
    row = {"noise_hu": "25.0", "streak_index": "0.0", "anatomy": "body", "own_noise_hu": "25.0"}
    plain, routine = reader_oracle([row, {**row, "routine_smooth": "1"}])
    assert routine == pytest.approx(expected_reader_mean(25.0, 0.0, "body", routine_own_noise_hu=25.0))
    assert routine > plain + 0.5


def test_evaluate_missing_model_and_data(tmp_path):
    data = make_tiny_dataset(tmp_path / "test", n_sources=1, size=32, split="test")
    assert qcnode_main(["evaluate", "--model", str(tmp_path / "none.pt"), "--data", str(data)]) == 1
    assert qcnode_main(["evaluate", "--model", str(tmp_path / "none.pt"), "--data", str(tmp_path / "x")]) == 2


def _untrained(tmp_path):
    return write_untrained_checkpoint(tmp_path / "m.pt", MDIQAConfig.from_dict({**MDIQAConfig().to_dict(),
                                                                               **TINY_CONFIG}))


def test_evaluate_reports_the_tif_convention(tmp_path, capsys):
    data = make_tiny_dataset(tmp_path / "test", n_sources=1, size=64, split="test")
    args = ["evaluate", "--model", str(_untrained(tmp_path)), "--data", str(data), "--no-baseline"]
    assert qcnode_main(args) == 0
    assert "tif convention auto" in json.loads(capsys.readouterr().out)["reading"]
    assert qcnode_main(args + ["--convention", "ldctiqac"]) == 0
    assert "[-1000, 400] HU" in json.loads(capsys.readouterr().out)["reading"]
    assert qcnode_main(args + ["--convention", "window:9"]) == 2
    assert "window:LO,HI" in capsys.readouterr().err


def test_evaluate_a_dicom_folder_with_a_sites_labels(tmp_path, capsys, shared_ct):
    import csv
    import shutil

    import pydicom
    folder = tmp_path / "site"
    files = sorted((shared_ct / "ge_head").glob("*.dcm"))[:6]
    for f in files:
        shutil.copy(f, folder / f.name if folder.exists() else (folder.mkdir() or folder / f.name))
    shutil.copy(shared_ct / "philips_head_phantom" / "localizer_I10.dcm", folder / "scout.dcm")  # skipped
    # three by file name (CSV), three by SOP Instance UID
    with (tmp_path / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "score"])
        for f in files[:3]:
            w.writerow([f.name, 3.5])
        for f in files[3:]:
            w.writerow([pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID, 2.0])
    model = str(_untrained(tmp_path))
    out = tmp_path / "eval"
    args = ["evaluate", "--model", model, "--data", str(folder), "--labels", str(tmp_path / "labels.csv")]
    assert qcnode_main(args + ["--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 6 and result["reading"].startswith("DICOM")
    assert result["model_metrics"]["n"] == 6 and 0 <= result["interval_coverage"] <= 1
    assert result["baseline"]["n_undefined"] < 6  # HU from the rescale tags: the noise level is defined
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert sorted(r["file"] for r in rows) == sorted(f.name for f in files)
    # JSON labels; a label that matches no slice is a clear error
    (tmp_path / "labels.json").write_text(json.dumps({files[0].name: 4, "missing.dcm": 1}))
    assert qcnode_main(["evaluate", "--model", model, "--data", str(folder),
                        "--labels", str(tmp_path / "labels.json")]) == 2
    assert "match no scorable DICOM slice" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("name,value\na,1\n")
    assert qcnode_main(["evaluate", "--model", model, "--data", str(folder), "--labels",
                        str(tmp_path / "bad.csv")]) == 2
    assert "score column" in capsys.readouterr().err
    # the same file name in two subfolders: a bare name is ambiguous, a relative path is not
    (folder / "again").mkdir()
    shutil.copy(files[0], folder / "again" / files[0].name)
    (tmp_path / "same.json").write_text(json.dumps({files[0].name: 4}))
    assert qcnode_main(["evaluate", "--model", model, "--data", str(folder), "--labels",
                        str(tmp_path / "same.json")]) == 2
    assert "several subfolders" in capsys.readouterr().err
