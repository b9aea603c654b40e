"""Dose and view degradation of a CT slice in the projection domain, and its noise measures.

Attenuation ``mu = mu_water (1 + HU/1000)`` (~70 keV) is forward-projected at ``FULL_VIEWS`` views:
fan-beam over 360 degrees with a SOMATOM-like geometry (``fan_beam``, the default), or parallel-beam
over 180 degrees (``ct_projector``, the geometry of the data sets made before). A dose fraction ``f`` gives detector
counts ``Poisson(I0 f exp(-p)) + Normal(0, sigma_e^2)`` (electronic-noise floor), I0 per anatomy;
keeping ``V`` evenly spread views (same current per view) lowers dose further and adds streaks.
FBP (Shepp-Logan) brings it back to HU. A real slice keeps its own pixels and noise and gets only
the added noise and streaks (``real_noise_scale``).

The readers' measures (``qcnode.simulation.readers``): ``noise_hu``, the SD of (image - noiseless
image at the same views) over soft tissue (``soft_tissue_mask``), a real slice's own noise added in
quadrature; ``streak_index``, the RMS over the patient of (noiseless image at V views - at
``FULL_VIEWS``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from qcnode.dicom.physics import patient_mask
from qcnode.simulation import ct_projector, fan_beam

GEOMETRIES = ("fan", "parallel")
DEFAULT_GEOMETRY = "fan"
MU_WATER_PER_MM = 0.0192
FULL_VIEWS = 720
FBP_FILTER = "shepp-logan"
I0_BY_ANATOMY = {"head": 2.0e6, "body": 6.0e5}  # unattenuated counts per detector bin and view at f = 1
ELECTRONIC_NOISE_COUNTS = 10.0


def line_integrals(image_hu: np.ndarray, spacing_mm: float, geometry: str = DEFAULT_GEOMETRY,
                   views: int = FULL_VIEWS) -> torch.Tensor:
    """Noiseless sinogram (1, views, detectors) of one slice's attenuation line integrals (dimensionless)."""
    mu = np.maximum(MU_WATER_PER_MM * (1.0 + np.asarray(image_hu, dtype=np.float32) / 1000.0), 0.0)
    mu = mu[None] * np.float32(spacing_mm)  # per-pixel attenuation
    if geometry == "fan":
        return fan_beam.forward_project(mu, fan_beam.geometry(mu.shape[-1], spacing_mm), fan_beam.view_angles(views))
    _check_geometry(geometry)
    return ct_projector.forward_project(mu, ct_projector.default_angles(views))


def _check_geometry(geometry: str) -> None:
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown geometry {geometry!r}; choose one of {GEOMETRIES}")


def noisy_line_integrals(p: torch.Tensor, i0: float, dose: float, generator: torch.Generator,
                         electronic_sigma: float = ELECTRONIC_NOISE_COUNTS) -> torch.Tensor:
    """Line integrals from Poisson counts at I0*dose*exp(-p) plus Gaussian electronic noise."""
    expected = (i0 * dose) * torch.exp(-p)
    counts = torch.poisson(expected, generator=generator)
    counts += electronic_sigma * torch.randn(p.shape, generator=generator)
    return -torch.log(torch.clamp(counts, min=1.0) / (i0 * dose))


def view_indices(views: int, full_views: int = FULL_VIEWS) -> np.ndarray:
    """Indices of ``views`` evenly spread views out of ``full_views``."""
    if views <= 0 or views > full_views:
        raise ValueError(f"views must be in 1..{full_views}, got {views}")
    return np.unique(np.round(np.arange(views) * (full_views / views)).astype(int))


def reconstruct_hu(p: torch.Tensor, views: int, size: int, spacing_mm: float,
                   geometry: str = DEFAULT_GEOMETRY, full_views: int = FULL_VIEWS) -> torch.Tensor:
    """FBP of (B, full_views, D) line integrals using ``views`` of the views, in HU (B, size, size)."""
    idx = view_indices(views, full_views)
    if geometry == "fan":
        betas = fan_beam.view_angles(full_views)[torch.as_tensor(idx)]
        mu = fan_beam.fbp(p[:, idx], fan_beam.geometry(size, spacing_mm), betas, FBP_FILTER) / spacing_mm
    else:
        _check_geometry(geometry)
        angles = ct_projector.default_angles(full_views)[idx]
        mu = ct_projector.fbp(p[:, idx], angles, size, FBP_FILTER) / spacing_mm
    return 1000.0 * (mu / MU_WATER_PER_MM - 1.0)


def soft_tissue_mask(reference_hu: np.ndarray, body: np.ndarray | None = None) -> np.ndarray:
    """Soft tissue of a noiseless reference: local mean -20..150 HU inside the patient."""
    body = patient_mask(reference_hu) if body is None else body
    local = ndimage.uniform_filter(reference_hu.astype(np.float32), 5)
    tissue = body & (local >= -20) & (local <= 150)
    if tissue.sum() < 200:
        tissue = body & (reference_hu > -300) & (reference_hu < 300)
    if tissue.sum() < 200:
        tissue = body if body.sum() >= 50 else np.ones_like(body)
    return tissue


def real_noise_scale(own_noise_hu: float, simulated_noise_hu: float, dose: float, views: int) -> float:
    """Factor for a simulated noise image (dose ``dose``, ``views`` views) added to a real slice.

    The slice already carries its own noise (``own_noise_hu``, measured; whatever kernel, slice
    thickness and mAs made it). Quantum noise variance scales as 1 / (dose x views), so the slice at
    (dose, views) has ``own^2 FULL_VIEWS / (dose views)``; the extra variance is scaled from the
    simulated noise image, which keeps the simulated texture and streak-correlated noise."""
    extra = own_noise_hu * math.sqrt(max(0.0, FULL_VIEWS / (dose * views) - 1.0))
    return extra / simulated_noise_hu if simulated_noise_hu > 0 else 0.0
