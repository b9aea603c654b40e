"""The LDCTIQAC2023 layout, the shared preprocessing, augmentation and splits."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from iqa_helpers import make_tiny_dataset, noisy_phantom
from qcnode.dicom.pixels import load_slices
from qcnode.training import data


def test_ldctiqac_layout_loads(tmp_path):
    root = make_tiny_dataset(tmp_path / "train", n_sources=2, size=32)
    ds = data.load_labeled(root)
    assert len(ds) == 8 and ds.files[0] == "0000.tif"
    labels = json.loads((root / "train.json").read_text())
    assert ds.labels.tolist() == pytest.approx([labels[f] for f in ds.files])
    assert set(ds.groups()) == {"train-0", "train-1"}
    assert all(p.is_file() for p in ds.paths())


def test_challenge_layout_without_meta_and_any_json_name(tmp_path):
    root = make_tiny_dataset(tmp_path / "x", n_sources=1, size=32, split="train")
    (root / "meta.csv").unlink()
    (root / "train.json").rename(root / "labels.json")
    ds = data.load_labeled(root)
    assert len(ds) == 4 and ds.groups() == ds.files  # no meta: each image is its own group


def test_layout_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="image/"):
        data.load_labeled(tmp_path)
    root = make_tiny_dataset(tmp_path / "train", n_sources=1, size=32)
    (root / "image" / "0001.tif").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        data.load_labeled(root)
    (root / "train.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        data.load_labeled(root)


def test_preprocess_window_resize_and_padding():
    hu = np.full((300, 200), 40.0, np.float32)
    hu[:10] = 3000.0
    x = data.preprocess(hu, size=64)
    assert x.shape == (1, 64, 64) and x.dtype == torch.float32
    assert float(x.min()) == 0.0  # padding is air -> 0
    assert float(x.max()) <= 1.0
    centre = float(x[0, 32, 32])
    assert centre == pytest.approx((40 + 160) / 400, abs=1e-5)


def test_challenge_tifs_are_read_as_the_ldctiqac_window(tmp_path):
    # the challenge's [0, 1] is [-1000, 400] HU (centre -300, width 1400), not the model's window
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 400, (64, 64)).astype(np.float32)
    tifffile.imwrite(tmp_path / "n.tif", (hu + 1000) / 1400)
    np.testing.assert_allclose(data.read_tif_hu(tmp_path / "n.tif"), hu, atol=0.05)
    x = data.preprocess_tif(tmp_path / "n.tif", size=64)
    np.testing.assert_allclose(x.numpy(), data.preprocess(hu, 64).numpy(), atol=1e-5)
    assert not data.looks_normalised(hu)  # HU tifs (the simulator's) are taken as HU
    tifffile.imwrite(tmp_path / "hu.tif", hu)
    np.testing.assert_allclose(data.read_tif_hu(tmp_path / "hu.tif"), hu)


def test_a_folder_declares_its_tif_convention(tmp_path):
    root = make_tiny_dataset(tmp_path / "train", n_sources=1, size=32)
    assert data.load_labeled(root).convention.name == "auto"
    (root / "convention.json").write_text(json.dumps({"convention": "window:-160,240"}))
    ds = data.load_labeled(root)
    assert ds.convention == data.TifConvention("window", (-160.0, 240.0))
    img = np.full((4, 4), 0.5, np.float32)
    assert ds.convention.to_hu(img)[0, 0] == pytest.approx(40.0)
    assert "[-160, 240] HU" in ds.convention.describe()
    assert data.load_labeled(root, convention="hu").convention.name == "hu"  # an option overrides the file
    (root / "convention.json").write_text(json.dumps({"convention": "bogus"}))
    with pytest.raises(ValueError, match="unknown tif convention"):
        data.load_labeled(root)
    for bad in ("window:5,1", "window:a,b"):
        with pytest.raises(ValueError, match="LO < HI"):
            data.TifConvention.parse(bad)


def test_dicom_and_tif_preprocess_identically(shared_ct, tmp_path):
    s = load_slices(shared_ct / "ge_head" / "10.dcm")[0]
    tifffile.imwrite(tmp_path / "s.tif", s.hu)
    a = data.preprocess(s.hu, 128)
    b = data.preprocess_tif(tmp_path / "s.tif", 128)
    assert torch.equal(a, b)


def test_augment_keeps_noise_level():
    rng = np.random.default_rng(0)
    x = torch.stack([data.preprocess(noisy_phantom(30.0, 64, rng), 64) for _ in range(8)])
    g = torch.Generator().manual_seed(0)
    y = data.augment(x, generator=g)
    assert y.shape == x.shape
    centre = (slice(None), 0, slice(24, 40), slice(24, 40))
    assert float(y[centre].std()) == pytest.approx(float(x[centre].std()), rel=0.1)


def test_group_split_keeps_groups_apart():
    groups = [f"g{i % 7}" for i in range(70)]
    tr, va = data.group_split(groups, 0.3, seed=1)
    assert sorted(tr + va) == list(range(70))
    assert not {groups[i] for i in tr} & {groups[i] for i in va}
    assert len({groups[i] for i in va}) == 2


def test_unlabeled_folder_reads_tif_and_dicom_skipping_localizer(shared_ct, tmp_path):
    import shutil
    make_tiny_dataset(tmp_path / "u", n_sources=1, size=32, labeled=False)
    for name in ("I10.dcm", "localizer_I10.dcm"):
        shutil.copy(shared_ct / "philips_head_phantom" / name, tmp_path / "u" / name)
    items = list(data.iter_unlabeled(tmp_path / "u"))
    ids = [i for i, _ in items]
    assert len(items) == 5
    assert any(i.endswith("I10.dcm") and "localizer" not in i for i in ids)
    assert not any("localizer" in i for i in ids)
