"""Low-dose simulation: projector vs skimage, noise vs dose, streaks vs views, reader model, layout, splits."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from qcnode.simulation import ct_projector, degrade, fan_beam, readers, simulate, sources
from qcnode.simulation.phantoms import make_phantom

torch.set_num_threads(1)


def _small_phantom(size: int = 64) -> np.ndarray:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import resize
    return resize(shepp_logan_phantom(), (size, size), anti_aliasing=True).astype(np.float64)


def test_forward_projection_matches_skimage_radon():
    from skimage.transform import radon
    img = _small_phantom(64)
    theta = ct_projector.default_angles(90)
    ref = radon(img, theta, circle=False)  # (D, A)
    ours = ct_projector.forward_project(img, theta).numpy().T
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("filter_name", ["ramp", "shepp-logan", "hann"])
def test_fbp_matches_skimage_iradon(filter_name):
    from skimage.transform import iradon, radon
    img = _small_phantom(64)
    theta = ct_projector.default_angles(120)
    sino = radon(img, theta, circle=False)
    ref = iradon(sino, theta, output_size=64, filter_name=filter_name, circle=False)
    ours = ct_projector.fbp(sino.T, theta, 64, filter_name).numpy()
    assert np.abs(ours - ref).max() < 0.01 * np.abs(ref).max()
    # and it is a reconstruction: close to the object itself
    assert np.abs(ours - img).mean() < 0.03


def test_batched_projection_equals_single():
    imgs = np.stack([_small_phantom(48), _small_phantom(48)[::-1].copy()])
    theta = ct_projector.default_angles(60)
    batch = ct_projector.forward_project(imgs, theta)
    for i in range(2):
        assert torch.allclose(batch[i], ct_projector.forward_project(imgs[i], theta), atol=1e-4)
    rec = ct_projector.fbp(batch, theta, 48)
    assert torch.allclose(rec[1], ct_projector.fbp(batch[1], theta, 48), atol=1e-4)


def _disk(n: int, cx: float, cy: float, radius: float) -> np.ndarray:
    ys, xs = np.mgrid[:n, :n] - n // 2
    return (((xs - cx) ** 2 + (ys - cy) ** 2) <= radius ** 2).astype(np.float32)


def test_fan_beam_projection_matches_the_analytic_disk():
    # An off-centre disk: each ray's line integral is 2 sqrt(r^2 - d^2), d = distance of the disk's
    # centre from the ray (source at R(cos b, sin b), ray turned by gamma from the central ray).
    n, cx, cy, r = 128, 20.0, -12.0, 25.0
    geo = fan_beam.geometry(n, 2.0)
    betas = fan_beam.view_angles(24)
    p = fan_beam.forward_project(_disk(n, cx, cy, r)[None], geo, betas)[0].numpy()
    b = betas.numpy()[:, None]
    g = geo.channel_angles().numpy()[None, :]
    sx, sy = geo.source_radius * np.cos(b), geo.source_radius * np.sin(b)
    dx, dy = np.cos(b + np.pi + g), np.sin(b + np.pi + g)
    d = np.abs(dx * (cy - sy) - dy * (cx - sx))
    exact = 2 * np.sqrt(np.clip(r ** 2 - d ** 2, 0, None))
    inner = d < r - 2  # away from the edge, where the pixelated disk differs from the round one
    assert inner.sum() > 200
    assert np.abs(p - exact)[inner].mean() < 0.02 * 2 * r
    assert np.abs(p[d > r + 2]).max() < 1e-3


def test_fan_beam_fbp_reconstructs_and_sparse_views_streak_more_than_parallel():
    n = 128
    img = _disk(n, 0, 0, 50) + 0.5 * _disk(n, 15, -10, 8) + _disk(n, -20, 5, 5)
    geo = fan_beam.geometry(n, 2.8)
    inside = _disk(n, 0, 0, 45) > 0
    full = fan_beam.view_angles(720)
    p = fan_beam.forward_project(img[None], geo, full)
    rec = fan_beam.fbp(p, geo, full, "shepp-logan")[0].numpy()
    assert np.abs(rec - img)[inside].mean() < 0.03
    flat = inside & (_disk(n, 15, -10, 12) == 0) & (_disk(n, -20, 5, 9) == 0)
    assert abs(rec[flat].mean() - 1.0) < 0.01
    streaks = {}
    for v in (256, 128, 64):
        idx = torch.as_tensor(degrade.view_indices(v))  # the simulator's subsets over 360 degrees
        assert idx.numel() == v
        sub = fan_beam.fbp(p[:, idx], geo, full[idx], "shepp-logan")[0].numpy()
        assert abs(sub[flat].mean() - 1.0) < 0.01  # sparse views keep the scale
        streaks[v] = float(np.sqrt(np.mean((sub - rec)[inside] ** 2)))
    assert streaks[256] < streaks[128] < streaks[64]
    # a full rotation of 64 fan views aliases more than 64 parallel views over 180 degrees
    ang = ct_projector.default_angles(64)
    par = ct_projector.fbp(ct_projector.forward_project(img, ang), ang, n, "shepp-logan").numpy()
    ang_full = ct_projector.default_angles(720)
    par_full = ct_projector.fbp(ct_projector.forward_project(img, ang_full), ang_full, n, "shepp-logan").numpy()
    assert streaks[64] > 1.1 * float(np.sqrt(np.mean((par - par_full)[inside] ** 2)))


def test_fan_beam_noise_matches_parallel_at_equal_views_and_counts():
    # I0 per ray is shared by both geometries: the same ray noise must give about the same image noise.
    torch.manual_seed(0)
    n = 96
    inside = _disk(n, 0, 0, 30) > 0
    geo = fan_beam.geometry(n, 3.5)
    fan = fan_beam.fbp(0.01 * torch.randn(3, 720, geo.channels), geo, fan_beam.view_angles(720), "shepp-logan")
    ang = ct_projector.default_angles(720)
    par = ct_projector.fbp(0.01 * torch.randn(3, 720, ct_projector.detector_count(n)), ang, n, "shepp-logan")
    ratio = float(np.mean([f.numpy()[inside].std() for f in fan]) / np.mean([q.numpy()[inside].std() for q in par]))
    assert 0.85 < ratio < 1.2, ratio


def test_unknown_geometry_is_refused():
    with pytest.raises(ValueError, match="geometry"):
        degrade.line_integrals(np.zeros((32, 32)), 1.0, "cone")


def _spec(anatomy: str = "body", seed: int = 11, variants=None, split: str = "train") -> sources.SourceSpec:
    grid = [(d, v) for v in (720, 360, 180) for d in (1.0, 0.5, 0.25, 0.1)]
    return sources.SourceSpec(f"phantom:{anatomy}:{seed}", "phantom", anatomy, f"phantom_{anatomy}", split,
                               seed=seed, variants=variants or grid)


@pytest.fixture(scope="module")
def simulated_body():
    """All 12 dose/view variants of one body phantom at 96x96."""
    return simulate.simulate_sources([_spec("body", 11)], 96)


def test_noise_std_rises_as_dose_falls(simulated_body):
    rows = {(r["dose_fraction"], r["views"]): (img, r) for _, _, img, r in simulated_body}
    ref = degrade.reconstruct_hu(
        degrade.line_integrals(make_phantom("body", 11, 96).hu, make_phantom("body", 11, 96).pixel_spacing_mm),
        720, 96, make_phantom("body", 11, 96).pixel_spacing_mm)[0].numpy()
    tissue = degrade.soft_tissue_mask(ref)
    measured = [float(np.std((rows[(d, 720)][0] - ref)[tissue])) for d in (1.0, 0.5, 0.25, 0.1)]
    assert all(a < b for a, b in zip(measured, measured[1:])), measured
    # Quantum noise: sd ~ 1/sqrt(dose); the 10x dose step gives about sqrt(10) (more with electronic noise).
    assert 2.5 < measured[-1] / measured[0] < 5.0
    for v in (720, 360, 180):
        reported = [rows[(d, v)][1]["noise_hu"] for d in (1.0, 0.5, 0.25, 0.1)]
        assert all(a < b for a, b in zip(reported, reported[1:])), (v, reported)


def test_streaks_rise_as_views_fall(simulated_body):
    streak = {r["views"]: r["streak_index"] for _, _, _, r in simulated_body}
    assert streak[720] == 0.0
    assert streak[720] < streak[360] < streak[180]
    noise_full = {r["views"]: r["noise_hu"] for _, _, _, r in simulated_body if r["dose_fraction"] == 1.0}
    assert noise_full[720] < noise_full[180]  # fewer views at the same tube current = less dose


def test_labels_on_grid_and_monotone_in_expectation(simulated_body):
    for _, _, img, r in simulated_body:
        assert img.dtype == np.float32 and img.shape == (96, 96)
        assert 0.0 <= r["label"] <= 4.0
        assert abs(r["label"] * 5 - round(r["label"] * 5)) < 1e-9
        assert all(r[c] in (0, 1, 2, 3, 4) for c in readers.READER_COLUMNS)
    # Expected label over the reader jitter: non-increasing in noise and streaks, spanning the range.
    rng = np.random.default_rng(0)

    def expected(noise, streak, anatomy="body"):
        return np.mean([readers.mean_label(readers.reader_scores(noise, streak, anatomy, rng))
                        for _ in range(300)])

    by_noise = [expected(n, 0.0) for n in (3, 8, 12, 18, 27, 40, 60)]
    assert all(a >= b - 0.05 for a, b in zip(by_noise, by_noise[1:])), by_noise
    assert by_noise[0] > 3.7 and by_noise[-1] < 0.8
    by_streak = [expected(8, s) for s in (0, 8, 16, 32, 64, 128, 256)]  # the range fan-beam sparse views reach
    assert all(a >= b - 0.05 for a, b in zip(by_streak, by_streak[1:])), by_streak
    assert by_streak[0] - by_streak[-1] > 2.5
    assert expected(8, 0, "head") < expected(8, 0, "body")


def test_real_slice_keeps_its_pixels_and_gets_the_extra_noise_of_lower_doses(shared_ct):
    """A real slice at full dose and views is the slice itself; lower doses and fewer views add the
    extra noise of quantum statistics on top of the slice's own measured noise, and streaks."""
    from qcnode.dicom.pixels import load_slices
    from qcnode.dicom.physics import global_noise_level
    path = shared_ct / "ge_head" / "10.dcm"
    variants = [(1.0, 720), (0.5, 720), (0.25, 720), (1.0, 180), (0.25, 180)]
    spec = sources.SourceSpec("real:ge_head/10", "real", "head", "ge_head", "train", path=str(path),
                               variants=variants)
    out = {(r["dose_fraction"], r["views"]): (img, r) for _, _, img, r in simulate.simulate_sources([spec], 128)}
    sl = load_slices(path)[0]
    src, spacing = sources.resample_square(sl.hu, sl.pixel_spacing_mm[0], 128)
    assert spacing == pytest.approx(sl.pixel_spacing_mm[0] * 4)
    np.testing.assert_array_equal(out[(1.0, 720)][0], src)  # nothing added: the slice as acquired
    own = global_noise_level(src, spacing)
    assert all(r["own_noise_hu"] == pytest.approx(own, abs=1e-3) for _, r in out.values())
    # total noise = own noise x sqrt(full views / (dose x views)): variance adds as dose falls
    for (d, v), (_, r) in out.items():
        assert r["noise_hu"] == pytest.approx(own * np.sqrt(720 / (d * v)), rel=0.02), (d, v)
    body = src > -500
    added = {k: float(np.std((img - src)[body])) for k, (img, _) in out.items()}
    assert added[(1.0, 720)] == 0 < added[(0.5, 720)] < added[(0.25, 720)] < added[(0.25, 180)]
    assert out[(1.0, 180)][1]["streak_index"] > 0 == out[(1.0, 720)][1]["streak_index"]


def test_real_noise_scale_adds_only_the_extra_variance():
    # own 10 HU; at quarter dose the total is 20 HU, so the simulated image (std 5) is scaled to sqrt(300)
    assert degrade.real_noise_scale(10.0, 5.0, 0.25, 720) == pytest.approx(np.sqrt(300) / 5)
    assert degrade.real_noise_scale(10.0, 5.0, 1.0, 720) == 0.0
    assert degrade.real_noise_scale(10.0, 5.0, 1.0, 180) == pytest.approx(np.sqrt(300) / 5)
    assert degrade.real_noise_scale(10.0, 0.0, 0.5, 720) == 0.0


def test_clinical_slices_split_by_patient_and_thinned():
    root = simulate_data_root()
    slices = sources.find_real_slices([root / "lung_pet_ct_dx"])
    assert {r.series for r in slices} == {f"series{i}" for i in range(1, 5)}
    assert len({r.patient for r in slices}) == 2
    kernels = {r.series: r.kernel for r in slices}
    assert kernels["series1"] == "B40f" and kernels["series3"] == "B70f"
    one = next(iter(sorted({r.patient for r in slices})))
    train, val = sources.split_by_patient(slices, {one})
    assert train and val and not {r.patient for r in train} & {r.patient for r in val}
    thin = sources.thin_series(slices, 5)
    assert len(thin) == 4 * 5 and {r.series for r in thin} == {r.series for r in slices}
    assert sources.thin_series(slices, 0) == slices


def simulate_data_root():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "clinical_ct"
    if not root.is_dir():
        pytest.fail(f"shared clinical CT missing at {root}")
    return root


def test_relabel_reproduces_the_labels_of_a_run(tmp_path, shared_ct):
    from qcnode.cli import main
    out = tmp_path / "sim"
    assert main(["simulate", "--out", str(out), "--size", "64", "--doses", "1,0.25", "--views", "720,64",
                 "--train-phantoms", "2", "--clinical", "--sources", str(shared_ct / "ge_head" / "01.dcm")]) == 0
    before = (out / "train" / "meta.csv").read_text(), (out / "train" / "train.json").read_text()
    (out / "train" / "train.json").write_text("{}")
    record = json.loads((out / "simulation.json").read_text())
    (out / "simulation.json").write_text(json.dumps({**record, "readers": []}))
    assert simulate.relabel(out) == {"train": 12}
    assert ((out / "train" / "meta.csv").read_text(), (out / "train" / "train.json").read_text()) == before
    assert json.loads((out / "simulation.json").read_text())["readers"] == record["readers"]


def test_plan_keeps_objects_out_of_two_splits():
    real_train = [("real:a/1", "a", "head", "x1"), ("real:a/2", "a", "head", "x2")]
    real_test = [("real:b/1", "b", "head", "y1")]
    splits = simulate.plan(doses=[1, 0.5, 0.1], views=[720, 180], train_phantoms=30, test_phantoms=12,
                           unlabeled_phantoms=10, seed=3, real_train=real_train, real_test=real_test)
    ids = {k: {s.source_id for s in v} for k, v in splits.items()}
    seeds = {k: {s.seed for s in v if s.seed is not None} for k, v in splits.items()}
    for a, b in [("train", "test"), ("train", "unlabeled"), ("test", "unlabeled")]:
        assert not ids[a] & ids[b]
        assert not seeds[a] & seeds[b]
    assert sum(len(s.variants) for s in splits["train"]) == 32 * 6
    assert {s.anatomy for s in splits["test"] if s.kind == "phantom"} == {"head", "body"}
    # File numbers are contiguous per split.
    for specs in splits.values():
        nxt = 0
        for s in specs:
            assert s.first_index == nxt
            nxt += len(s.variants)
    # The same seed gives the same plan; another seed other phantoms.
    again = simulate.plan(doses=[1, 0.5, 0.1], views=[720, 180], train_phantoms=30, test_phantoms=12,
                          unlabeled_phantoms=10, seed=3)
    assert [s.seed for s in again["test"]] == [s.seed for s in splits["test"] if s.kind == "phantom"]
    other = simulate.plan(doses=[1], views=[720], train_phantoms=30, test_phantoms=0, unlabeled_phantoms=0, seed=4)
    assert not {s.seed for s in other["train"]} & seeds["train"]
    with pytest.raises(ValueError):
        simulate.plan(doses=[1.5], views=[720], train_phantoms=1, test_phantoms=0, unlabeled_phantoms=0)
    with pytest.raises(ValueError):
        simulate.plan(doses=[1], views=[1440], train_phantoms=1, test_phantoms=0, unlabeled_phantoms=0)


def test_phantoms_are_seeded_and_varied():
    a, b = make_phantom("head", 5, 64), make_phantom("head", 5, 64)
    assert np.array_equal(a.hu, b.hu)
    assert not np.array_equal(a.hu, make_phantom("head", 6, 64).hu)
    body = make_phantom("body", 5, 64)
    assert body.hu.dtype == np.float32 and body.hu.shape == (64, 64)
    assert body.hu.min() >= -1001 and body.hu.max() > 300  # air and bone present
    with pytest.raises(ValueError):
        make_phantom("knee", 1)


def test_simulate_command_writes_challenge_layout(tmp_path, shared_ct):
    import tifffile

    from qcnode.cli import main
    out = tmp_path / "sim"
    rc = main(["simulate", "--out", str(out), "--size", "64", "--doses", "1,0.1", "--views", "720,180",
               "--train-phantoms", "2", "--test-phantoms", "1", "--unlabeled-phantoms", "1", "--clinical",
               "--sources", str(shared_ct / "ge_head" / "01.dcm"),
               "--test-sources", str(shared_ct / "philips_head_phantom" / "I10.dcm"),
               str(shared_ct / "philips_head_phantom" / "localizer_I10.dcm")])
    assert rc == 0
    metas = {}
    for split in ("train", "test", "unlabeled"):
        files = sorted(p.name for p in (out / split / "image").glob("*.tif"))
        with open(out / split / "meta.csv") as fh:
            metas[split] = list(csv.DictReader(fh))
        assert [m["file"] for m in metas[split]] == files
        img = tifffile.imread(out / split / "image" / files[0])
        assert img.dtype == np.float32 and img.shape == (64, 64)
        if split != "unlabeled":
            labels = json.loads((out / split / f"{split}.json").read_text())
            assert sorted(labels) == files
            assert all(0.0 <= v <= 4.0 for v in labels.values())
        else:
            assert not (out / split / "unlabeled.json").exists()
    assert len(metas["train"]) == 3 * 4 and len(metas["test"]) == 2 * 4  # localizer skipped
    assert len(metas["unlabeled"]) >= 1 and all(m["label"] == "" for m in metas["unlabeled"])
    ids = {k: {m["source_id"] for m in v} for k, v in metas.items()}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["unlabeled"] and not ids["test"] & ids["unlabeled"]
    assert {m["source_kind"] for m in metas["test"]} == {"real", "phantom"}
    params = json.loads((out / "simulation.json").read_text())
    assert params["images"] == {"train": 12, "test": 8, "unlabeled": len(metas["unlabeled"])}
    assert params["geometry"] == "fan"
    # The older parallel-beam geometry stays available, recorded, and gives other (equally valid) images.
    par = tmp_path / "par"
    assert main(["simulate", "--out", str(par), "--size", "64", "--doses", "1,0.1", "--views", "720,180",
                 "--train-phantoms", "1", "--no-real", "--geometry", "parallel"]) == 0
    assert json.loads((par / "simulation.json").read_text())["geometry"] == "parallel"
    fan_only = tmp_path / "fan"
    assert main(["simulate", "--out", str(fan_only), "--size", "64", "--doses", "1,0.1", "--views", "720,180",
                 "--train-phantoms", "1", "--no-real"]) == 0
    low_dose_sparse = sorted((par / "train" / "image").glob("*.tif"))[-1].name
    assert not np.allclose(tifffile.imread(par / "train" / "image" / low_dose_sparse),
                           tifffile.imread(fan_only / "train" / "image" / low_dose_sparse))
    # Refuses to overwrite a non-empty folder.
    assert main(["simulate", "--out", str(out), "--no-real", "--train-phantoms", "1"]) == 2


def test_tissue_free_skull_phantoms_planned_seeded_and_labelled():
    """skull_air / skull_water head phantoms: in every split, reproducible, labels fall with dose."""
    splits = simulate.plan(doses=[1, 0.1], views=[720, 180], train_phantoms=16, test_phantoms=16,
                           unlabeled_phantoms=16, seed=0)
    for split in ("train", "test", "unlabeled"):  # the splits that hold phantoms ("val" is real patients)
        kinds = [s.phantom for s in splits[split]]
        assert {"skull_air", "skull_water"} <= set(kinds), split
        assert all(s.anatomy == "head" for s in splits[split] if s.phantom.startswith("skull"))
    for kind in ("skull_air", "skull_water"):
        a, b = make_phantom(kind, 21, 128), make_phantom(kind, 21, 128)
        assert np.array_equal(a.hu, b.hu) and a.region == kind and a.anatomy == "head"
        assert not np.array_equal(a.hu, make_phantom(kind, 22, 128).hu)
        assert (a.hu > 400).any()  # a bone ring
        inside = a.hu[60:68, 60:68]
        assert (np.median(inside) < -900) if kind == "skull_air" else (abs(np.median(inside)) < 60)
    torch.set_num_threads(1)
    for kind, seed in (("skull_air", 101), ("skull_water", 102)):
        spec = sources.SourceSpec(f"phantom:{kind}:{seed}", "phantom", "head", f"phantom_{kind}", "train",
                                   seed=seed, variants=[(1.0, 720), (0.1, 720), (1.0, 180), (0.1, 180)], phantom=kind)
        rows = {(r["dose_fraction"], r["views"]): r for *_, r in simulate.simulate_sources([spec], 96)}
        again = {(r["dose_fraction"], r["views"]): r for *_, r in simulate.simulate_sources([spec], 96)}
        assert rows == again
        assert all(r["region"] == kind and np.isfinite(r["noise_hu"]) and r["noise_hu"] > 0 for r in rows.values())
        for v in (720, 180):
            assert rows[(0.1, v)]["noise_hu"] > 1.5 * rows[(1.0, v)]["noise_hu"]
        assert rows[(1.0, 720)]["label"] >= 3.4  # full dose, all views: a good image
        assert rows[(0.1, 180)]["label"] < rows[(1.0, 720)]["label"]
        assert sum(rows[(0.1, v)]["label"] for v in (720, 180)) < sum(rows[(1.0, v)]["label"] for v in (720, 180))


def test_readers_are_tied_to_the_challenge_scale():
    """The calibrated readers: a routine smooth-kernel slice (about 7 HU at 256 px) is good to
    excellent, a quarter of its dose still fair to good, a sharp kernel (25 HU) fair, 64 views poor,
    64 views at a quarter of the dose bad to poor."""
    e = readers.expected_reader_mean
    assert e(7.0, 0.0, "body") >= 3.5
    assert 2.5 <= e(14.0, 0.0, "body") < e(7.0, 0.0, "body")
    assert 1.7 <= e(25.0, 0.0, "body") <= 2.3
    # 64 fan-beam views of a routine slice (24 HU, streak index 80, the median at 64 views) poor,
    # with a quarter of the dose as well (47 HU) bad to poor
    assert e(24.0, 80.0, "body") < 1.5 and e(47.0, 80.0, "body") < 0.8
    assert e(7.0, 0.0, "head") < e(7.0, 0.0, "body")


def test_routine_smooth_acquisition_is_read_as_routine():
    """A routine smooth-kernel slice as acquired is 3-4 whatever its own noise (thin slice, large
    patient); the noise a simulation adds still counts in full, so its lower doses still fall."""
    e = readers.expected_reader_mean
    cap = readers.ROUTINE_OWN_NOISE_CAP_HU
    # as acquired, 25 HU of its own: read as a routine slice at the cap, not as 25 HU
    assert e(25.0, 0.0, "body", routine_own_noise_hu=25.0) == pytest.approx(e(cap, 0.0, "body"))
    assert e(25.0, 0.0, "body", routine_own_noise_hu=25.0) >= 3.0 > 2.3 >= e(25.0, 0.0, "body")
    # below the cap nothing changes; heads are weighed x1.6 before the cap
    assert e(8.0, 30.0, "body", routine_own_noise_hu=8.0) == e(8.0, 30.0, "body")
    assert readers.seen_noise_hu(10.0, "head", 10.0) == pytest.approx(cap)
    # its lower doses: the added noise (own x sqrt(1/d - 1)) counts in full, labels fall at each step
    by_dose = [e(25.0 / np.sqrt(d), 0.0, "body", routine_own_noise_hu=25.0) for d in (1.0, 0.75, 0.5, 0.25)]
    assert all(a > b for a, b in zip(by_dose, by_dose[1:])) and by_dose[-1] < 1.5
    assert readers.seen_noise_hu(50.0, "body", 25.0) == pytest.approx(np.sqrt(cap ** 2 + 50.0 ** 2 - 25.0 ** 2))
    # the flag comes from meta.csv
    assert readers.routine_own_noise({"routine_smooth": "1", "own_noise_hu": "25.0"}) == 25.0
    assert readers.routine_own_noise({"routine_smooth": "0", "own_noise_hu": "25.0"}) is None
    assert readers.routine_own_noise({"own_noise_hu": "25.0"}) is None


def test_not_diagnostic_scans_are_told_by_their_headers():
    from pydicom.dataset import Dataset

    from qcnode.dicom.acquisition import not_diagnostic_reason

    def ds(series="", protocol="", study=""):
        d = Dataset()
        d.SeriesDescription, d.ProtocolName, d.StudyDescription = series, protocol, study
        return d

    assert not_diagnostic_reason(ds("Chest Routine #1", "1 Chest Routine 1mm")) == ""
    assert not_diagnostic_reason(ds("CHEST ROUTINE 5.0 B20f", "01 ABD_PEL", "CT Abd and Pelvis")) == ""
    assert not_diagnostic_reason(ds("Smart Prep Series", "5.2 CAP ALL")) == "SMART PREP"
    assert not_diagnostic_reason(ds("PRE SCAN", "5.15 ***OR LUNG IMAGE GUIDAN")) == "GUIDAN, PRE SCAN"
    assert not_diagnostic_reason(ds("CT WB 5.0 B31f", "1WBPETCT")) == "PET"
    assert not_diagnostic_reason(ds("HELICAL MODE", "", "lung bx")) == "BX"
    assert not_diagnostic_reason(ds("STD CTAC")) == "CTAC"
    assert not_diagnostic_reason(ds("BOXED", "", "ABX")) == ""  # BX only as a word of its own
    assert not_diagnostic_reason(ds("HEAD", "PETROUS BONE", "COMPETENCE")) == ""  # PET only as PET or PETCT
    # series-level words count in the series description only: a protocol's diagnostic run may name
    # its test bolus, and a follow-up of a localized finding is no localiser
    assert not_diagnostic_reason(ds("BOTTOM TO TOP", "5.35 PE TEST BOLUS BOTTOM TO TOP")) == ""
    assert not_diagnostic_reason(ds("LOCALIZATION", "5.35 PE TEST BOLUS BOTTOM TO TOP")) == "LOCALIZ"
    assert not_diagnostic_reason(ds("HELICAL MODE", "5.11 CHEST ROUTINE", "CT LIMITED OR LOCALIZED F/U")) == ""
    assert not_diagnostic_reason(Dataset()) == ""


def test_head_or_body_from_the_header():
    """BodyPartExamined first; a scan range that reaches the head ("Skull to thigh", "pelvis to head")
    is a body scan; a folder named head only when the header says nothing else."""
    from pydicom.dataset import Dataset

    from qcnode.dicom.acquisition import anatomy

    def ds(part=None, protocol="", series=""):
        d = Dataset()
        if part is not None:
            d.BodyPartExamined = part
        d.ProtocolName, d.SeriesDescription = protocol, series
        return d

    assert anatomy(ds("HEAD")) == anatomy(ds("", "BRAIN ROUTINE")) == "head"
    assert anatomy(ds("THYROID", "PETCT_Skull_To_Thigh")) == "body"
    assert anatomy(ds("CHEST", "01 Head Routine")) == "body"
    assert anatomy(ds("", "5.27 PET CT 3D WB PELVIS TO HEAD")) == "body"
    assert anatomy(ds("", "1.23 Glowa Neuronawigacja"), "/data/cptac_gbm_head/1.dcm") == "head"
    assert anatomy(ds("", "CHEST"), "/data/chest/1.dcm") == "body"
    assert anatomy(ds("", "CHEST"), "/data/overhead/1.dcm") == "body"  # a folder named head, not containing it
    assert anatomy(ds("SINUS")) == anatomy(ds("", "WHOLE BRAIN PERFUSION")) == "head"
    found = sources.find_real_slices([simulate_data_root() / "tcga_thca_wholebody", simulate_data_root() / "cptac_gbm_head"])
    assert {(r.series, r.anatomy) for r in found} == {("tcga_thca_wholebody", "body"), ("cptac_gbm_head", "head")}


def test_simulate_marks_routine_smooth_slices_and_relabel_rewrites_them(tmp_path, shared_ct, capsys):
    """Smooth-kernel slices of routine folders are marked in meta.csv; sharp kernels and folders
    listed as not routine are not; ``relabel`` re-marks an existing folder from a set of ids."""
    from qcnode.cli import main
    clinical = simulate_data_root() / "lung_pet_ct_dx"
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"validation_patients": [], "not_routine_series": "series2"}))  # not a list
    assert main(["simulate", "--out", str(tmp_path / "bad"), "--clinical", str(clinical),
                 "--validation-patients", str(split)]) == 2
    assert "not_routine_series must be a list" in capsys.readouterr().err
    split.write_text(json.dumps({"validation_patients": [], "not_routine_series": ["series2"]}))
    out = tmp_path / "sim"
    assert main(["simulate", "--out", str(out), "--size", "32", "--doses", "1,0.25", "--views", "720",
                 "--train-phantoms", "0", "--test-phantoms", "0", "--unlabeled-phantoms", "0",
                 "--max-per-series", "1", "--clinical", str(clinical), "--validation-patients", str(split),
                 "--sources", str(shared_ct / "ge_head" / "01.dcm")]) == 0
    with open(out / "train" / "meta.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["series"] != "ge_head"]  # --sources: never marked
    marked = {r["series"]: r["routine_smooth"] for r in rows}
    # series1 B40f and series2 Philips B are smooth, series3 B70f and series4 L sharp; series2 not routine
    assert marked == {"series1": "1", "series2": "0", "series3": "0", "series4": "0"}
    slices = sources.find_real_slices([clinical])
    assert sources.routine_smooth_ids(slices, set()) == {r.source_id for r in slices
                                                          if r.series in ("series1", "series2")}
    # relabel without ids keeps the run's labels; with ids it re-marks, and a marked sharp slice
    # (own noise far above the cap) is then read as routine: its full-dose label rises
    labels = json.loads((out / "train" / "train.json").read_text())
    assert simulate.relabel(out) == {"train": len(labels)}
    assert json.loads((out / "train" / "train.json").read_text()) == labels
    # (at 32 px the measured noise is small: give series4's full-dose row the 25 HU of a 256 px L kernel)
    with open(out / "train" / "meta.csv") as fh:
        before = list(csv.DictReader(fh))
    for r in before:
        if r["series"] == "series4" and r["dose_fraction"] == "1.0":
            r["noise_hu"] = r["own_noise_hu"] = "25.0"
    with open(out / "train" / "meta.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(before[0]))
        w.writeheader()
        w.writerows(before)
    simulate.relabel(out)
    with open(out / "train" / "meta.csv") as fh:
        before = list(csv.DictReader(fh))
    series4 = {r["source_id"] for r in rows if r["series"] == "series4"}
    assert simulate.relabel(out, series4)["routine_smooth_slices"] == 1
    with open(out / "train" / "meta.csv") as fh:
        after = list(csv.DictReader(fh))
    assert {r["series"]: r["routine_smooth"] for r in after} == {
        "series1": "0", "series2": "0", "series3": "0", "series4": "1", "ge_head": "0"}
    full = [(float(b["label"]), float(a["label"])) for b, a in zip(before, after)
            if a["series"] == "series4" and a["dose_fraction"] == "1.0"]
    assert len(full) == 1 and full[0][1] > full[0][0] + 0.5, full
    assert json.loads((out / "simulation.json").read_text())["routine_own_noise_cap_hu"] == \
        readers.ROUTINE_OWN_NOISE_CAP_HU


def test_expected_reader_mean_is_the_exact_expectation():
    rng = np.random.default_rng(1)
    for noise, streak, anatomy in [(5.0, 0.0, "body"), (12.0, 1.5, "head"), (30.0, 4.0, "body")]:
        monte_carlo = np.mean([np.mean(readers.reader_scores(noise, streak, anatomy, rng)) for _ in range(20000)])
        assert readers.expected_reader_mean(noise, streak, anatomy) == pytest.approx(monte_carlo, abs=0.02)
    by_noise = [readers.expected_reader_mean(n, 0.0, "body") for n in (2, 8, 16, 32, 64)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:])) and 0.0 <= by_noise[-1] < by_noise[0] <= 4.0


def test_default_real_sources_hold_three_real_heads_for_training(shared_ct):
    """The default real sources: the shared GE head series and pydicom's bundled CT slices (CT_small
    and two JPEG 2000 heads from other scanners) train; the Philips phantom is the test series; the
    localizer is left out; every source decodes to a square HU image."""
    from qcnode.cli.simulate import TEST_SERIES
    found = sources.default_real_sources(shared_ct)
    series = {s[1] for s in found}
    assert {"ge_head", "philips_head_phantom", "pydicom_ct_small", "pydicom_head_j2k_a",
            "pydicom_head_j2k_b"} <= series
    assert not any("localizer" in s[0] for s in found)
    train_heads = {s[1] for s in found if s[2] == "head" and s[1] not in TEST_SERIES}
    assert train_heads == {"ge_head", "pydicom_head_j2k_a", "pydicom_head_j2k_b"}
    for sid, ser, anatomy, path in found:
        if ser.startswith("pydicom_head"):
            spec = sources.SourceSpec(sid, "real", anatomy, ser, "train", path=path, variants=[(1.0, 720)])
            im = sources.load_source(spec, 128)
            assert im.hu.shape == (128, 128)
            assert im.hu.min() >= -1000.0 and im.hu.max() > 300.0  # air clamped; skull present


def test_series_noise_level_is_the_median_of_the_acquisition():
    from qcnode.dicom.pixels import load_slices
    from qcnode.dicom.physics import global_noise_level
    files = sorted((simulate_data_root() / "lidc_idri_0001").glob("*.dcm"))[20:25]
    single = sorted((simulate_data_root() / "lung_pet_ct_dx" / "series2").glob("*.dcm"))[0]
    found = [(f"a{i}", "lidc", str(f)) for i, f in enumerate(files)] + [("b", "other", str(single))]
    levels = sources.series_noise_levels(found, 256)

    def own(path):
        sl = load_slices(path)[0]
        return global_noise_level(*sources.resample_square(sl.hu, sl.pixel_spacing_mm[0], 256))
    each = [own(f) for f in files]
    assert [levels[f"a{i}"] for i in range(5)] == [pytest.approx(float(np.median(each)))] * 5
    assert levels["b"] == pytest.approx(own(single))  # a series of one keeps its own measurement


def test_extra_sources_cannot_leak_a_patient_into_two_splits(tmp_path, shared_ct, capsys):
    from qcnode.cli import main
    clinical = simulate_data_root() / "lung_pet_ct_dx"
    base = ["simulate", "--size", "64", "--doses", "1", "--views", "720", "--train-phantoms", "0",
            "--clinical", str(clinical)]
    # a held-out patient's folder given again as a training source, or the clinical slices twice
    assert main(base + ["--out", str(tmp_path / "a"), "--sources", str(clinical / "series2")]) == 2
    assert "repeats slices of --clinical" in capsys.readouterr().err
    assert main(["simulate", "--size", "64", "--doses", "1", "--views", "720", "--train-phantoms", "0",
                 "--clinical", "--out", str(tmp_path / "b"), "--sources", str(clinical / "series1"),
                 "--test-sources", str(clinical / "series3")]) == 2
    assert "share a patient" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
