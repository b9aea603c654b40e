"""Per-slice CT physics: patient outline, water-equivalent diameter, SSDE, global noise level.

Pure numpy/scipy, cheap enough for the worker to call on every slice.
- ``water_equivalent_diameter_cm``: AAPM TG-220, ``Dw = 2 sqrt((mean HU / 1000 + 1) * A / pi)``
  over the patient outline (``patient_mask``: threshold, largest component, table removed).
- ``ssde_mgy``: AAPM TG-204, SSDE = CTDIvol x ``a exp(-b Dw)`` (32 cm or 16 cm phantom
  coefficients; TG-220 uses Dw for TG-204's effective diameter).
- ``global_noise_level``: mode of the local standard deviation over soft tissue, in HU
  (Christianson et al., Radiology 2015).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

# AAPM TG-204 exponential fits, f = a * exp(-b * Dw[cm]).
SSDE_COEFFICIENTS: dict[str, tuple[float, float]] = {
    "body": (3.704369, 0.03671937),  # 32 cm PMMA CTDI phantom
    "head": (1.874799, 0.03871313),  # 16 cm PMMA CTDI phantom
}
PATIENT_THRESHOLD_HU = -400.0
MIN_COMPONENT_FRACTION = 0.10
# no pixel of a noise window may leave this range (air and bone edges are not noise)
TISSUE_WINDOW_RANGE_HU = (-500.0, 600.0)
SOFT_TISSUE_HU = (0.0, 100.0)
DEFAULT_NOISE_KERNEL_MM = 6.0
DEFAULT_NOISE_KERNEL_PX = 5


def _spacing_mm(pixel_spacing_mm: float | Sequence[float] | None) -> tuple[float, float] | None:
    if pixel_spacing_mm is None:
        return None
    if isinstance(pixel_spacing_mm, (int, float)):
        value = float(pixel_spacing_mm)
        spacing = (value, value)
    else:
        spacing = (float(pixel_spacing_mm[0]), float(pixel_spacing_mm[1]))
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"pixel spacing must be positive, got {pixel_spacing_mm!r}")
    return spacing


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2


def patient_mask(hu: np.ndarray, threshold_hu: float = PATIENT_THRESHOLD_HU) -> np.ndarray:
    """Boolean outline of the patient, table excluded.

    Threshold at -400 HU, closing (bridges small gaps in thin shells such as a skull), fill
    holes (lungs, sinuses, an air-filled phantom inside its shell), opening (detaches thin tables,
    head holders and cables), largest connected component (with any other component of at least
    10 % of its size, e.g. the pieces of a bare skull phantom), then the edge detail the opening
    removed is restored within the filled outline. Radii scale with the matrix (about 4 pixels
    on 512x512); large matrices are segmented 2x-subsampled and the edge refined at full
    resolution. Returns an all-False mask when nothing is above the threshold.
    """
    img = np.asarray(hu)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {img.shape}")
    body = img > threshold_hu
    if not body.any():
        return body
    factor = 2 if min(img.shape) >= 384 else 1
    small = body[::factor, ::factor] if factor > 1 else body
    radius = max(1, round(min(img.shape) / 128 / factor))
    disk = _disk(radius)
    bridge = max(1, radius // 2)  # small: bridges gaps in a shell, not the air gap above a table
    closed = ndimage.binary_closing(np.pad(small, bridge + 1), structure=_disk(bridge))[bridge + 1:-bridge - 1,
                                                                                         bridge + 1:-bridge - 1]
    filled = ndimage.binary_fill_holes(closed | small)
    opened = ndimage.binary_opening(filled, structure=disk)
    labels, count = ndimage.label(opened)
    if count == 0:
        labels, count = ndimage.label(filled)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    # The largest component, plus any other of at least 10 % of its size (the pieces of a bare skull
    # phantom, both legs); small debris and what the opening cut off (table, holder) stay out.
    largest = np.isin(labels, np.flatnonzero(sizes >= MIN_COMPONENT_FRACTION * sizes.max()))
    largest = filled & ndimage.binary_dilation(largest, structure=disk, iterations=2)
    if factor > 1:
        largest = np.repeat(np.repeat(largest, factor, axis=0), factor, axis=1)
        largest = np.pad(largest, [(0, max(0, img.shape[0] - largest.shape[0])),
                                   (0, max(0, img.shape[1] - largest.shape[1]))], mode="edge")
        largest = largest[: img.shape[0], : img.shape[1]]
        # Refine the outline at full resolution: drop sub-threshold pixels on its edge band only
        # (holes inside the patient, e.g. lungs, stay filled).
        edge = largest & ~ndimage.binary_erosion(largest, iterations=factor)
        largest &= ~(edge & ~body)
    return largest


def water_equivalent_diameter_cm(hu: np.ndarray, pixel_spacing_mm: float | Sequence[float] | None,
                                 mask: np.ndarray | None = None) -> float | None:
    """AAPM TG-220 water-equivalent diameter in cm over the patient outline (table excluded).

    Returns None without a pixel spacing or when no patient is found.
    """
    spacing = _spacing_mm(pixel_spacing_mm)
    if spacing is None:
        return None
    img = np.asarray(hu, dtype=np.float32)
    m = patient_mask(img) if mask is None else mask
    n = int(m.sum())
    if n == 0:
        return None
    area_mm2 = n * spacing[0] * spacing[1]
    mean_hu = float(img[m].mean(dtype=np.float64))
    water_area = max(0.0, mean_hu / 1000.0 + 1.0) * area_mm2
    return 2.0 * math.sqrt(water_area / math.pi) / 10.0


def ssde_conversion_factor(dw_cm: float, phantom: str = "body") -> float:
    """AAPM TG-204 conversion factor f(Dw) from CTDIvol to SSDE (phantom: "body" = 32 cm, "head" = 16 cm)."""
    try:
        a, b = SSDE_COEFFICIENTS[phantom]
    except KeyError:
        raise ValueError(f"phantom must be 'body' or 'head', not {phantom!r}") from None
    if not (math.isfinite(dw_cm) and dw_cm > 0):
        raise ValueError(f"water-equivalent diameter must be positive, got {dw_cm!r}")
    return a * math.exp(-b * dw_cm)


def ssde_mgy(ctdivol_mgy: float, dw_cm: float, phantom: str = "body") -> float:
    """Size-specific dose estimate (mGy) = CTDIvol x TG-204 f(Dw)."""
    if not (math.isfinite(ctdivol_mgy) and ctdivol_mgy >= 0):
        raise ValueError(f"CTDIvol must be >= 0, got {ctdivol_mgy!r}")
    return ctdivol_mgy * ssde_conversion_factor(dw_cm, phantom)


def local_std(hu: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Local mean and (sample) standard deviation over a ``window`` x ``window`` box."""
    img = np.asarray(hu, dtype=np.float32)
    mean = ndimage.uniform_filter(img, window, mode="reflect")
    sq = ndimage.uniform_filter(img * img, window, mode="reflect")
    n = window * window
    var = np.maximum(sq - mean * mean, 0.0) * (n / (n - 1))
    return mean, np.sqrt(var)


def noise_window_px(pixel_spacing_mm: float | Sequence[float] | None, kernel_mm: float | None = None) -> int:
    """Odd window size (pixels) for the local standard deviation: ``kernel_mm`` wide, at least 3."""
    spacing = _spacing_mm(pixel_spacing_mm)
    if spacing is None:
        return DEFAULT_NOISE_KERNEL_PX
    width = (kernel_mm or DEFAULT_NOISE_KERNEL_MM) / min(spacing)
    w = max(3, int(round(width)))
    return w if w % 2 else w + 1


def global_noise_level(hu: np.ndarray, pixel_spacing_mm: float | Sequence[float] | None = None,
                       kernel_mm: float | None = None, min_fraction: float = 0.01) -> float | None:
    """Global noise level (HU): the mode of the local standard deviation over soft tissue.

    Soft tissue: pixels whose local mean is within 0-100 HU (the local mean, not the pixel value,
    so heavy noise does not fragment the mask), and whose whole window holds no air or bone
    (every pixel within ``TISSUE_WINDOW_RANGE_HU``): a window straddling a bone/air edge can also
    have a 0-100 HU mean, with a huge standard deviation that is not noise. The window is
    ``kernel_mm`` wide (default 6 mm; 5 pixels without a spacing). Returns None when soft tissue
    covers less than ``min_fraction`` of the slice (or fewer than 200 pixels).
    """
    img = np.asarray(hu, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {img.shape}")
    window = noise_window_px(pixel_spacing_mm, kernel_mm)
    mean, std = local_std(img, window)
    tissue = (mean >= SOFT_TISSUE_HU[0]) & (mean <= SOFT_TISSUE_HU[1])
    # no air or bone anywhere in the window: one max filter over the out-of-range pixels (uint8),
    # the same as minimum >= low and maximum <= high over the window, at a fifth of the cost
    outside = (img < TISSUE_WINDOW_RANGE_HU[0]) | (img > TISSUE_WINDOW_RANGE_HU[1])
    tissue &= ndimage.maximum_filter(outside.view(np.uint8), size=window, mode="nearest") == 0
    values = std[tissue]
    if values.size < max(200, min_fraction * img.size):
        return None
    hi = float(np.percentile(values, 90))
    if not math.isfinite(hi) or hi <= 0:
        return 0.0
    bins = 200
    hist, edges = np.histogram(values, bins=bins, range=(0.0, hi * 1.5))
    smooth = ndimage.gaussian_filter1d(hist.astype(np.float64), 2.0)
    k = int(smooth.argmax())
    return float(0.5 * (edges[k] + edges[k + 1]))
