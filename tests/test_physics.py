"""Per-slice CT physics: patient outline, water-equivalent diameter (TG-220), SSDE (TG-204), noise level."""
from __future__ import annotations

import math

import numpy as np
import pytest

from qcnode.dicom import physics


def _disk_image(size: int, spacing_mm: float, radius_mm: float, hu: float = 0.0, table: bool = False,
                air_hole_mm: float = 0.0) -> np.ndarray:
    c = (np.arange(size) - size / 2 + 0.5) * spacing_mm
    x, y = c[None, :], c[:, None]
    img = np.full((size, size), -1000.0, dtype=np.float32)
    img[x ** 2 + y ** 2 <= radius_mm ** 2] = hu
    if air_hole_mm:
        img[(x - radius_mm / 3) ** 2 + y ** 2 <= air_hole_mm ** 2] = -850.0  # lung-like
    if table:  # a 4 mm plastic plate a few mm below the patient, wider than the patient
        img[(y > radius_mm + 6) & (y < radius_mm + 10) & (np.abs(x) < radius_mm * 1.4)] = 200.0
    return img


# --- SSDE (AAPM TG-204) --------------------------------------------------------------------------
# Expected factors computed by hand from f = a exp(-b Dw):
#   32 cm (body): a = 3.704369, b = 0.03671937; 16 cm (head): a = 1.874799, b = 0.03871313.
@pytest.mark.parametrize("dw_cm, phantom, expected", [
    (10.0, "body", 2.5659),  # 3.704369 * exp(-0.3671937)
    (20.0, "body", 1.7774),  # 3.704369 * exp(-0.7343874)  (TG-204 table: 1.78)
    (30.0, "body", 1.2311),  # 3.704369 * exp(-1.1015811)  (TG-204 table: 1.23)
    (40.0, "body", 0.8528),  # 3.704369 * exp(-1.4687748)
    (8.0, "head", 1.3755),   # 1.874799 * exp(-0.3097050)
    (16.0, "head", 1.0091),  # 1.874799 * exp(-0.6194101)  (~1 at the phantom's own size)
    (24.0, "head", 0.7404),  # 1.874799 * exp(-0.9291151)
])
def test_ssde_conversion_factor_matches_tg204(dw_cm, phantom, expected):
    assert physics.ssde_conversion_factor(dw_cm, phantom) == pytest.approx(expected, abs=6e-5)


def test_ssde_scales_ctdivol():
    assert physics.ssde_mgy(10.0, 20.0, "body") == pytest.approx(17.774, abs=1e-3)
    assert physics.ssde_mgy(50.0, 16.0, "head") == pytest.approx(50.457, abs=2e-3)
    assert physics.ssde_mgy(0.0, 25.0) == 0.0


def test_ssde_rejects_bad_input():
    with pytest.raises(ValueError):
        physics.ssde_conversion_factor(20.0, "chest")
    with pytest.raises(ValueError):
        physics.ssde_conversion_factor(0.0)
    with pytest.raises(ValueError):
        physics.ssde_mgy(-1.0, 20.0)


# --- patient outline and Dw (AAPM TG-220) ---------------------------------------------------------
@pytest.mark.parametrize("size, spacing, radius_mm", [(512, 0.7, 150.0), (512, 0.45, 80.0), (256, 1.5, 120.0)])
def test_water_cylinder_dw_within_2_percent(size, spacing, radius_mm):
    img = _disk_image(size, spacing, radius_mm, hu=0.0, table=True)
    dw = physics.water_equivalent_diameter_cm(img, (spacing, spacing))
    assert dw == pytest.approx(2 * radius_mm / 10, rel=0.02)


def test_dw_weights_density_and_excludes_table():
    spacing, r = 0.8, 120.0
    plain = _disk_image(512, spacing, r, hu=-100.0)
    with_table = _disk_image(512, spacing, r, hu=-100.0, table=True)
    dw_plain = physics.water_equivalent_diameter_cm(plain, spacing)
    dw_table = physics.water_equivalent_diameter_cm(with_table, spacing)
    # Fat-like (-100 HU): Dw = D sqrt(0.9).
    assert dw_plain == pytest.approx(2 * r / 10 * math.sqrt(0.9), rel=0.02)
    assert dw_table == pytest.approx(dw_plain, rel=0.005)
    mask = physics.patient_mask(with_table)
    c = (np.arange(512) - 256 + 0.5) * spacing
    table_rows = (c > r + 6) & (c < r + 10)
    assert not mask[table_rows].any()


def test_patient_mask_fills_internal_air_and_handles_empty():
    img = _disk_image(256, 1.5, 140.0, hu=40.0, air_hole_mm=40.0)
    mask = physics.patient_mask(img)
    assert mask[128, 128 + int(140 / 3 / 1.5)]  # inside the lung-like hole
    assert not mask[0, 0]
    assert not physics.patient_mask(np.full((64, 64), -1000.0)).any()
    assert physics.water_equivalent_diameter_cm(np.full((64, 64), -1000.0), 1.0) is None
    assert physics.water_equivalent_diameter_cm(img, None) is None


# --- global noise level ----------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [5.0, 12.0, 30.0])
def test_global_noise_level_recovers_known_noise(sigma):
    rng = np.random.default_rng(1)
    img = _disk_image(512, 0.7, 160.0, hu=40.0)
    # Some structure that is not noise: a bone ring and a fat layer.
    c = (np.arange(512) - 256 + 0.5) * 0.7
    rr = np.hypot(c[None, :], c[:, None])
    img[(rr > 140) & (rr <= 160)] = -100.0
    img[(rr > 60) & (rr <= 66)] = 800.0
    noisy = img + rng.normal(0.0, sigma, img.shape).astype(np.float32)
    gnl = physics.global_noise_level(noisy, (0.7, 0.7))
    assert gnl == pytest.approx(sigma, rel=0.10)


def _gnl_by_definition(hu: np.ndarray, spacing: tuple[float, float]) -> float | None:
    """The global noise level exactly as documented: soft-tissue windows are those whose local mean
    is 0-100 HU and whose minimum and maximum stay within TISSUE_WINDOW_RANGE_HU."""
    from scipy import ndimage
    img = np.asarray(hu, dtype=np.float32)
    window = physics.noise_window_px(spacing)
    mean, std = physics.local_std(img, window)
    low, high = physics.TISSUE_WINDOW_RANGE_HU
    tissue = (mean >= 0.0) & (mean <= 100.0)
    tissue &= ndimage.minimum_filter(img, size=window, mode="nearest") >= low
    tissue &= ndimage.maximum_filter(img, size=window, mode="nearest") <= high
    values = std[tissue]
    if values.size < max(200, 0.01 * img.size):
        return None
    hi = float(np.percentile(values, 90))
    hist, edges = np.histogram(values, bins=200, range=(0.0, hi * 1.5))
    k = int(ndimage.gaussian_filter1d(hist.astype(np.float64), 2.0).argmax())
    return float(0.5 * (edges[k] + edges[k + 1]))


def test_global_noise_level_matches_its_definition(shared_ct):
    """The fast air/bone exclusion (one uint8 max filter) gives what the min/max definition gives,
    on real slices with noise and on noise images that cross both limits everywhere."""
    from qcnode.dicom.pixels import load_slices
    rng = np.random.default_rng(4)
    cases = [(sl.hu + rng.normal(0, s, sl.hu.shape).astype(np.float32), sl.pixel_spacing_mm)
             for path in sorted((shared_ct / "ge_head").glob("*.dcm"))[::7]
             for sl in load_slices(path) for s in (0.0, 20.0)]
    cases += [(rng.normal(50.0, 300.0, (300, 200)).astype(np.float32), (0.5, 0.5)) for _ in range(3)]
    cases += [(np.full((64, 64), v, np.float32), (1.0, 1.0)) for v in physics.TISSUE_WINDOW_RANGE_HU]
    for hu, spacing in cases:
        assert physics.global_noise_level(hu, spacing) == _gnl_by_definition(hu, spacing)


def test_global_noise_level_none_without_soft_tissue():
    rng = np.random.default_rng(2)
    air = -1000.0 + rng.normal(0, 5, (256, 256)).astype(np.float32)
    assert physics.global_noise_level(air, 1.0) is None


def test_global_noise_level_orders_real_slices(shared_ct):
    """More added noise on a real slice -> higher GNL."""
    from qcnode.dicom.pixels import load_slices
    sl = load_slices(shared_ct / "ge_head" / "10.dcm")[0]
    rng = np.random.default_rng(3)
    levels = [physics.global_noise_level(sl.hu + rng.normal(0, s, sl.hu.shape).astype(np.float32),
                                         sl.pixel_spacing_mm) for s in (0.0, 10.0, 25.0)]
    assert all(v is not None for v in levels)
    assert levels[0] < levels[1] < levels[2]
    dw = physics.water_equivalent_diameter_cm(sl.hu, sl.pixel_spacing_mm)
    assert 14.0 < dw < 24.0  # an adult head
