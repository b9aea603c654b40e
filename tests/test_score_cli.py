"""``qcnode score`` on real CT: JSON/CSV output, skipped objects, unreadable files, exit codes."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from qcnode.model.scorer import DEFAULT_CHECKPOINT, Scorer, write_untrained_checkpoint

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """The shipped model when present, else a small untrained checkpoint (keeps CI fast)."""
    if DEFAULT_CHECKPOINT.is_file():
        return DEFAULT_CHECKPOINT
    return write_untrained_checkpoint(tmp_path_factory.mktemp("m") / "untrained.pt")


def qcnode(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qcnode.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=PROJECT_ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"})


def test_score_shared_ct_json(shared_ct, model_path):
    r = qcnode("score", str(shared_ct), "--model", str(model_path))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model"]["version"].startswith(model_path.name[:-3] + "-")
    by_dir: dict[str, list] = {}
    skipped = []
    for s in doc["series"]:
        skipped += s["skipped"]
        for sl in s["slices"]:
            by_dir.setdefault(Path(sl["path"]).parent.name, []).append(sl)
            assert 0 <= sl["score_low"] <= sl["score"] <= sl["score_high"] <= 4
            assert sl["sop_instance_uid"] and isinstance(sl["instance_number"], int)
        if s["slices"]:
            assert s["summary"]["n_slices"] == len(s["slices"])
            assert s["summary"]["min"] <= s["summary"]["p10"] <= s["summary"]["mean"] <= s["summary"]["max"]
    assert len(by_dir["ge_head"]) == 28 and len(by_dir["philips_head_phantom"]) == 28  # every axial slice
    loc = [s for s in skipped if s["path"].endswith("localizer_I10.dcm")]
    assert len(loc) == 1 and "localizer" in loc[0]["reason"]
    assert not any(sl["path"].endswith("localizer_I10.dcm") for v in by_dir.values() for sl in v)


def test_corrupt_files_are_reported_not_fatal(shared_ct, model_path, tmp_path):
    good = shared_ct / "ge_head" / "01.dcm"
    shutil.copy(good, tmp_path / "good.dcm")
    data = good.read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.dcm").write_bytes(b"\x00garbage" * 100)
    r = qcnode("score", str(tmp_path), "--model", str(model_path))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    slices = [sl for s in doc["series"] for sl in s["slices"]]
    skipped = {Path(x["path"]).name: x["reason"] for s in doc["series"] for x in s["skipped"]}
    assert [Path(s["path"]).name for s in slices] == ["good.dcm"]
    assert set(skipped) == {"truncated.dcm", "garbage.dcm"}
    assert all(reason for reason in skipped.values())


def test_compressed_transfer_syntaxes_score_like_the_original(shared_ct, model_path, tmp_path):
    src = shared_ct / "philips_head_phantom" / "I100.dcm"
    for syntax, name in ((RLELossless, "rle.dcm"), (JPEG2000Lossless, "j2k.dcm")):
        ds = pydicom.dcmread(src)
        ds.compress(syntax)
        ds.save_as(tmp_path / name)
    shutil.copy(src, tmp_path / "raw.dcm")
    r = qcnode("score", str(tmp_path), "--model", str(model_path), "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 3
    scores = {Path(row["path"]).name: float(row["score"]) for row in rows}
    assert scores["rle.dcm"] == pytest.approx(scores["raw.dcm"], abs=1e-4)
    assert scores["j2k.dcm"] == pytest.approx(scores["raw.dcm"], abs=1e-4)


def test_exit_codes(shared_ct, tmp_path):
    r = qcnode("score", str(tmp_path / "missing"))
    assert r.returncode == 2 and "not found" in r.stderr
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    r = qcnode("score", str(shared_ct / "ge_head" / "01.dcm"), "--model", str(tmp_path / "bad.pt"))
    assert r.returncode == 1 and "bad.pt" in r.stderr


def test_scorer_api_scores_hu_slices(shared_ct, model_path):
    from qcnode.dicom.pixels import load_slices

    scorer = Scorer.load(model_path, threads=1)
    hu = [load_slices(shared_ct / "ge_head" / f"{i:02d}.dcm")[0].hu for i in (5, 6, 7)]
    res = scorer.score_hu(hu, batch_size=2)
    assert len(res) == 3
    assert all(0 <= q.score_low <= q.score <= q.score_high <= 4 for q in res)
    assert scorer.info["version"] == scorer.version


def test_derive_changes_inference_settings_only(tmp_path):
    import torch
    from qcnode.model.scorer import derive_checkpoint, file_hash, read_checkpoint

    src = write_untrained_checkpoint(tmp_path / "src.pt")
    r = qcnode("derive", "--model", str(src), "--out", str(tmp_path / "tta.pt"), "--set", "test_time_views=2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    a, b = read_checkpoint(src), read_checkpoint(tmp_path / "tta.pt")
    assert b["config"]["test_time_views"] == 2 and a["config"]["test_time_views"] == 1
    assert {k: v for k, v in b["config"].items() if k != "test_time_views"} == \
        {k: v for k, v in a["config"].items() if k != "test_time_views"}
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert b["meta"]["derived_from"] == {"version": f"src-{file_hash(src)[:8]}", "sha256": file_hash(src),
                                         "set": {"test_time_views": 2}}
    assert out["version"] == Scorer.load(tmp_path / "tta.pt").version != Scorer.load(src).version
    # weights are not an inference setting; bad values, a missing source and overwriting the source fail
    with pytest.raises(ValueError, match="input_size"):
        derive_checkpoint(src, tmp_path / "x.pt", {"input_size": 96})
    r = qcnode("derive", "--model", str(src), "--out", str(tmp_path / "x.pt"), "--set", "test_time_views=3")
    assert r.returncode == 2 and "test_time_views must be one of" in r.stderr
    r = qcnode("derive", "--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.pt"),
               "--set", "test_time_views=2")
    assert r.returncode == 1 and "nope.pt" in r.stderr
    r = qcnode("derive", "--model", str(src), "--out", str(src), "--set", "test_time_views=2")
    assert r.returncode == 2 and "must differ" in r.stderr
    (tmp_path / "folder.pt").mkdir()
    r = qcnode("derive", "--model", str(src), "--out", str(tmp_path / "folder.pt"), "--set", "test_time_views=2")
    assert r.returncode == 2 and "is a folder" in r.stderr and not list(tmp_path.glob("*.tmp"))
    assert not (tmp_path / "x.pt").exists() and read_checkpoint(src)["config"]["test_time_views"] == 1
    # a derived copy of a derived copy keeps the chain
    derive_checkpoint(tmp_path / "tta.pt", tmp_path / "one.pt", {"test_time_views": 1})
    chain = read_checkpoint(tmp_path / "one.pt")["meta"]["derived_from"]
    assert chain["set"] == {"test_time_views": 1} and chain["source_derived_from"]["sha256"] == file_hash(src)
    # training validates and calibrates one view: the setting is refused there
    r = qcnode("train", "--data", str(tmp_path), "--out", str(tmp_path / "t.pt"), "--set", "test_time_views=2")
    assert r.returncode == 2 and "qcnode derive" in r.stderr
