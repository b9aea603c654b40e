"""Training: loss goes down, checkpoints load, resume, seeding, semi-supervised student, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from iqa_helpers import TINY_CONFIG, make_tiny_dataset
from qcnode.cli import main as qcnode_main
from qcnode.training.data import cache_labeled, load_labeled
from qcnode.model.network import MDIQA, MDIQAConfig
from qcnode.model.scorer import Scorer, read_checkpoint
from qcnode.training.losses import loss_fn, rank_loss, soft_score
from qcnode.training.sampling import dose_order_partners
from qcnode.training.train import TrainOptions, train

torch.set_num_threads(1)
CFG = {**MDIQAConfig().to_dict(), **TINY_CONFIG}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("iqa")
    make_tiny_dataset(root / "train", n_sources=5, size=64)
    make_tiny_dataset(root / "unlabeled", n_sources=2, size=64, seed=3, labeled=False, split="unlabeled")
    return root


@pytest.mark.parametrize("head", ["multiscale", "regression"])
def test_a_few_steps_lower_the_loss(tiny_data, head):
    torch.manual_seed(0)
    cfg = MDIQAConfig.from_dict({**CFG, "head": head})
    ds = load_labeled(tiny_data / "train")
    x, y = cache_labeled(ds, cfg.input_size, cfg.window_hu), torch.from_numpy(ds.labels)
    model = MDIQA(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        loss = loss_fn(model, model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.75 * losses[0], losses


def _opts(tiny_data, out, **kw):
    base = dict(data=str(tiny_data / "train"), out=str(out), config=CFG, epochs=2, batch_size=8,
                val_fraction=0.4, threads=1, seed=7)
    base.update(kw)
    return TrainOptions(**base)


def test_train_writes_loadable_checkpoint_and_resumes(tiny_data, tmp_path):
    out = tmp_path / "m.pt"
    summary = train(_opts(tiny_data, out, epochs=1))
    assert out.is_file() and (tmp_path / "m.pt.state.pt").is_file()
    assert len(summary["history"]) == 1
    scorer = Scorer.load(out)
    assert scorer.version.startswith("m-") and scorer.info["training"]["n_train"] > 0
    assert scorer.config.interval_temperature > 0
    res = scorer.score_hu([np.zeros((64, 64), np.float32)])
    assert 0 <= res[0].score_low <= res[0].score <= res[0].score_high <= 4
    summary2 = train(_opts(tiny_data, out, epochs=2, resume=True))
    assert [h["epoch"] for h in summary2["history"]] == [1, 2]


def test_training_is_seeded(tiny_data, tmp_path):
    a = train(_opts(tiny_data, tmp_path / "a.pt", epochs=1, calibrate=False))
    b = train(_opts(tiny_data, tmp_path / "b.pt", epochs=1, calibrate=False))
    assert a["history"][0]["train_loss"] == pytest.approx(b["history"][0]["train_loss"], rel=1e-5)
    wa = read_checkpoint(tmp_path / "a.pt")["state_dict"]
    wb = read_checkpoint(tmp_path / "b.pt")["state_dict"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_cli_semi_supervised_student(tiny_data, tmp_path):
    out = tmp_path / "student.pt"
    argv = ["train", "--data", str(tiny_data / "train"), "--out", str(out), "--epochs", "1", "--batch-size", "8",
            "--threads", "1", "--val-fraction", "0.4", "--unlabeled", str(tiny_data / "unlabeled"),
            "--n-teachers", "2", "--pseudo-keep", "0.5", "--pseudo-max-std", "10"]
    for k, v in TINY_CONFIG.items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    assert qcnode_main(argv) == 0
    assert (tmp_path / "student.teacher1.pt").is_file() and (tmp_path / "student.teacher2.pt").is_file()
    meta = read_checkpoint(out)["meta"]
    semi = meta["semi_supervised"]
    assert semi["n_unlabeled"] == 8 and semi["n_kept"] == 4  # keep the narrowest half
    assert len(semi["teachers"]) == 2
    assert meta["n_train"] > 0


def test_cli_train_bad_arguments(tmp_path):
    assert qcnode_main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "m.pt")]) == 2
    (tmp_path / "d").mkdir()
    assert qcnode_main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "m.pt"),
                        "--set", "head=bogus"]) == 2


def test_dose_order_partners_follow_dose_and_views():
    meta = [{"source_id": "a", "dose_fraction": "1.0", "views": "720"},   # 0: best of a
            {"source_id": "a", "dose_fraction": "0.5", "views": "720"},   # 1
            {"source_id": "a", "dose_fraction": "1.0", "views": "180"},   # 2: fewer views
            {"source_id": "a", "dose_fraction": "0.5", "views": "180"},   # 3: worst of a
            {"source_id": "b", "dose_fraction": "0.1", "views": "720"},   # 4: another slice
            {"file": "no-meta.tif"}]                                      # 5: no order known
    partners = dose_order_partners(meta)
    assert sorted(partners[0]) == [(1, True), (2, True), (3, True)]
    assert sorted(partners[3]) == [(0, False), (1, False), (2, False)]
    # 1 (less dose, more views) and 2 (more dose, fewer views): no known order
    assert sorted(partners[1]) == [(0, False), (3, True)]
    assert partners[4] == [] and partners[5] == []


def test_rank_loss_orders_pairs():
    better, worse = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.05])
    assert rank_loss(better, worse, 0.1).item() == pytest.approx((0.0 + 0.15) / 2)
    assert rank_loss(torch.empty(0), torch.empty(0), 0.1).item() == 0.0
    # a few steps on the ranking loss alone put every higher-dose image of the tiny set above its partner
    torch.manual_seed(0)
    cfg = MDIQAConfig.from_dict(CFG)
    model = MDIQA(cfg).train()
    # four images that differ only in their noise level, and no labels
    x = torch.rand(4, 1, 64, 64) * 0.02 + 0.5
    x = x + torch.randn(4, 1, 64, 64) * torch.tensor([0.001, 0.004, 0.016, 0.064]).reshape(4, 1, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(40):
        s = soft_score(model, model(x))
        loss = rank_loss(s[:3], s[1:], 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        s = soft_score(model, model(x))
    assert bool((s[:3] > s[1:] + 0.05).all()), s


def test_training_with_dose_order_ranking(tiny_data, tmp_path, capsys):
    summary = train(_opts(tiny_data, tmp_path / "r.pt", epochs=1, rank_weight=1.0, calibrate=False))
    err = capsys.readouterr().err
    assert "dose-order ranking on" in err and "have ordered partners" in err
    assert summary["options"]["rank_weight"] == 1.0
    assert np.isfinite(summary["history"][0]["train_loss"])


def test_ranking_without_meta_is_off(tmp_path, capsys):
    root = make_tiny_dataset(tmp_path / "train", n_sources=3, size=64)
    (root / "meta.csv").unlink()
    train(TrainOptions(data=str(root), out=str(tmp_path / "m.pt"), config=CFG, epochs=1, batch_size=8,
                       val_fraction=0.4, threads=1, rank_weight=1.0, calibrate=False))
    assert "gives no source/dose/views groups: off" in capsys.readouterr().err


def test_cli_rank_options_reach_the_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "r.pt"
    argv = ["train", "--data", str(tiny_data / "train"), "--out", str(out), "--epochs", "1", "--batch-size", "8",
            "--threads", "1", "--val-fraction", "0.4", "--no-calibrate", "--rank-weight", "2.5", "--rank-margin", "0.05"]
    for k, v in TINY_CONFIG.items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    assert qcnode_main(argv) == 0
    options = read_checkpoint(out)["meta"]["options"]
    assert options["rank_weight"] == 2.5 and options["rank_margin"] == 0.05


def test_cli_negative_rank_options_are_refused(tiny_data, tmp_path, capsys):
    out = tmp_path / "m.pt"
    for flag in ("--rank-weight", "--rank-margin"):
        assert qcnode_main(["train", "--data", str(tiny_data / "train"), "--out", str(out), "--epochs", "1",
                            flag, "-1"]) == 2
        assert "must be >= 0" in capsys.readouterr().err
    assert not out.exists()


def test_separate_validation_folder(tiny_data, tmp_path, capsys):
    """--val-data: every --data image trains, the folder validates (best epoch, calibration); a folder
    sharing an anatomy group with the training data is refused with nothing written."""
    val = make_tiny_dataset(tmp_path / "val", n_sources=3, size=64, seed=9, split="val")
    out = tmp_path / "m.pt"
    argv = ["train", "--data", str(tiny_data / "train"), "--out", str(out), "--epochs", "1", "--batch-size", "8",
            "--threads", "1", "--val-data", str(val)]
    for k, v in CFG.items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    assert qcnode_main(argv) == 0
    meta = read_checkpoint(out)["meta"]
    assert meta["n_train"] == len(load_labeled(tiny_data / "train")) and meta["n_val"] == len(load_labeled(val))
    assert meta["options"]["val_data"] == str(val) and "validation" in meta
    out2 = tmp_path / "bad.pt"
    argv[argv.index("--out") + 1] = str(out2)
    argv[argv.index("--val-data") + 1] = str(tiny_data / "train")
    assert qcnode_main(argv) == 2
    assert "shares" in capsys.readouterr().err and not out2.exists()
    argv[argv.index("--val-data") + 1] = str(tmp_path / "missing")
    assert qcnode_main(argv) == 2
    assert "validation folder not found" in capsys.readouterr().err


def test_sampling_pool_draws_real_slices_more_often():
    from qcnode.training.sampling import sampling_pool
    meta = [{"source_kind": k} for k in ("phantom", "real", "phantom", "real", "real")]
    tr_idx = [0, 1, 2, 3]  # image 4 is in validation
    assert sampling_pool(meta, tr_idx, 6, 1).tolist() == [0, 1, 2, 3, 4, 5]  # 6 rows: 2 pseudo-labeled
    pool = sampling_pool(meta, tr_idx, 6, 3).tolist()
    assert sorted(pool) == [0, 1, 1, 1, 2, 3, 3, 3, 4, 5]


def test_real_weight_in_training_and_cli(tmp_path, capsys):
    import csv
    root = make_tiny_dataset(tmp_path / "train", n_sources=5, size=64)
    with (root / "meta.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["source_kind"] = "real" if r["source_id"] in ("train-0", "train-1") else "phantom"
    with (root / "meta.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "m.pt"
    argv = ["train", "--data", str(root), "--out", str(out), "--epochs", "1", "--batch-size", "8", "--threads", "1",
            "--val-fraction", "0.2", "--no-calibrate", "--rank-weight", "1", "--real-weight", "4", "--seed", "1"]
    for k, v in TINY_CONFIG.items():
        argv += ["--set", f"{k}={json.dumps(v)}"]
    assert qcnode_main(argv) == 0
    err = capsys.readouterr().err
    assert "real source slices drawn 4x as often" in err
    n_real = int(err.split("drawn 4x as often: ")[1].split(" of ")[0])
    assert n_real in (4, 8)  # one or both real sources in training (the other may be the validation group)
    assert read_checkpoint(out)["meta"]["options"]["real_weight"] == 4
    assert qcnode_main(argv[:-4] + ["--real-weight", "0"]) == 2
    assert "--real-weight must be 1-20" in capsys.readouterr().err
