"""Parallel-beam CT projector and filtered back-projection (FBP) in torch (CPU or GPU).

Geometry and conventions are those of ``skimage.transform.radon``/``iradon`` with
``circle=False``: angles in degrees over [0, 180), the image is zero-padded to its
diagonal ``D = ceil(sqrt(2) * N)`` so every pixel is seen in every view, the detector
coordinate of pixel (row, col) at angle theta is ``t = (col - c) cos(theta) - (row - c) sin(theta)``
with ``c = N // 2``, and detector bin ``i`` sits at ``t = i - D // 2``. Line integrals are in
pixel units (multiply by the pixel size to get physical units).

Both directions are batched over angles with ``torch.nn.functional.grid_sample`` (bilinear,
like skimage's ``warp`` and ``np.interp``); a batch of images rides in the channels, so the
interpolation weights are computed once for all of them; bench/bench_simulate.py times it
against skimage.
``tests/test_simulate.py`` checks both directions against skimage on a phantom.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")


def detector_count(n: int) -> int:
    """Detector bins for an ``n x n`` image (the padded diagonal, as skimage's circle=False)."""
    return int(math.ceil(math.sqrt(2) * n))


def default_angles(views: int) -> np.ndarray:
    """``views`` equally spaced angles over [0, 180) degrees."""
    return np.arange(views, dtype=np.float64) * (180.0 / views)


def _angle_chunks(count: int, n: int, budget: int = 6_000_000) -> int:
    # Angles per grid_sample call so that a chunk's grid stays near ``budget`` points.
    d = detector_count(n)
    return max(1, min(count, budget // (d * d)))


def forward_project(images: torch.Tensor | np.ndarray, angles_deg: np.ndarray) -> torch.Tensor:
    """Radon transform of a batch of square images.

    images: (B, N, N) or (N, N). Returns float32 sinograms (B, A, D) (or (A, D)),
    A = len(angles), D = detector_count(N).
    """
    x = torch.as_tensor(images, dtype=torch.float32)
    squeeze = x.ndim == 2
    if squeeze:
        x = x[None]
    if x.ndim != 3 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"images must be (B, N, N) or (N, N), got {tuple(x.shape)}")
    b, n, _ = x.shape
    d = detector_count(n)
    c = n // 2
    pos = torch.arange(d, dtype=torch.float32, device=x.device) - d // 2  # s (detector), u (ray)
    angles = torch.as_tensor(np.deg2rad(np.asarray(angles_deg, dtype=np.float64)), dtype=torch.float32,
                             device=x.device)
    out = torch.empty((b, angles.numel(), d), dtype=torch.float32, device=x.device)
    step = _angle_chunks(angles.numel(), n)
    src = x[None]  # (1, B, N, N): the batch rides in the channels, so interpolation weights are shared
    for start in range(0, angles.numel(), step):
        a = angles[start:start + step]
        cos, sin = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
        u, s = pos[None, :, None], pos[None, None, :]  # ray position along rows, detector along cols
        col = c + cos * s + sin * u
        row = c - sin * s + cos * u
        grid = torch.stack((2 * col / (n - 1) - 1, 2 * row / (n - 1) - 1), dim=-1)  # (a, D, D, 2)
        sampled = F.grid_sample(src.expand(a.numel(), b, n, n), grid, mode="bilinear",
                                padding_mode="zeros", align_corners=True)  # (a, B, D, D)
        out[:, start:start + a.numel()] = sampled.sum(dim=2).transpose(0, 1)
    return out[0] if squeeze else out


@lru_cache(maxsize=16)
def _fourier_filter(size: int, name: str) -> np.ndarray:
    # Ramp designed in the spatial domain (Kak & Slaney eq. 61), as skimage does.
    n = np.concatenate((np.arange(1, size / 2 + 1, 2, dtype=int), np.arange(size / 2 - 1, 0, -2, dtype=int)))
    f = np.zeros(size)
    f[0] = 0.25
    f[1::2] = -1 / (np.pi * n) ** 2
    filt = 2 * np.real(np.fft.fft(f))
    if name == "ramp":
        pass
    elif name == "shepp-logan":
        omega = np.pi * np.fft.fftfreq(size)[1:]
        filt[1:] *= np.sin(omega) / omega
    elif name == "cosine":
        filt *= np.fft.fftshift(np.sin(np.linspace(0, np.pi, size, endpoint=False)))
    elif name == "hamming":
        filt *= np.fft.fftshift(np.hamming(size))
    elif name == "hann":
        filt *= np.fft.fftshift(np.hanning(size))
    else:
        raise ValueError(f"unknown filter {name!r}; choose one of {FILTERS}")
    return filt


def filter_sinogram(sino: torch.Tensor, filter_name: str = "ramp") -> torch.Tensor:
    """Apply the FBP filter along the detector axis (last axis) of (..., A, D) sinograms."""
    d = sino.shape[-1]
    size = max(64, int(2 ** math.ceil(math.log2(2 * d))))
    filt = torch.as_tensor(_fourier_filter(size, filter_name), dtype=torch.float32, device=sino.device)
    spec = torch.fft.rfft(sino, n=size, dim=-1) * filt[: size // 2 + 1]
    return torch.fft.irfft(spec, n=size, dim=-1)[..., :d]


def back_project(sino: torch.Tensor | np.ndarray, angles_deg: np.ndarray, n: int) -> torch.Tensor:
    """Unfiltered back-projection of (B, A, D) or (A, D) sinograms onto an ``n x n`` grid.

    Scaled by pi / (2 A) like skimage's iradon, so back_project(filter_sinogram(p)) is the FBP.
    """
    s = torch.as_tensor(sino, dtype=torch.float32)
    squeeze = s.ndim == 2
    if squeeze:
        s = s[None]
    b, a, d = s.shape
    if a != len(angles_deg):
        raise ValueError(f"sinogram has {a} views but {len(angles_deg)} angles were given")
    c = n // 2
    angles = torch.as_tensor(np.deg2rad(np.asarray(angles_deg, dtype=np.float64)), dtype=torch.float32,
                             device=s.device)
    coords = torch.arange(n, dtype=torch.float32, device=s.device) - c
    rows, cols = coords[:, None], coords[None, :]
    out = torch.zeros((b, n, n), dtype=torch.float32, device=s.device)
    # grid_sample over the (A, D) sinogram "image": y = the view index (exact), x = detector position.
    step = max(1, min(a, 4_000_000 // (n * n)))
    src = s[None]  # (1, B, A, D): batch in the channels, interpolation weights shared
    for start in range(0, a, step):
        ang = angles[start:start + step]
        k = ang.numel()
        t = cols[None] * torch.cos(ang)[:, None, None] - rows[None] * torch.sin(ang)[:, None, None]
        gx = 2 * (t + d // 2) / (d - 1) - 1
        view_idx = torch.arange(start, start + k, dtype=torch.float32, device=s.device)
        gy = (2 * view_idx / (a - 1) - 1 if a > 1 else torch.zeros_like(view_idx))[:, None, None].expand_as(gx)
        grid = torch.stack((gx, gy), dim=-1).reshape(1, k * n, n, 2)
        sampled = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                                align_corners=True)  # (1, B, k*n, n)
        out += sampled[0].reshape(b, k, n, n).sum(dim=1)
    out *= math.pi / (2 * a)
    return out[0] if squeeze else out


def fbp(sino: torch.Tensor | np.ndarray, angles_deg: np.ndarray, n: int,
        filter_name: str = "ramp") -> torch.Tensor:
    """Filtered back-projection of (B, A, D) or (A, D) sinograms to (B, n, n) or (n, n) images."""
    s = torch.as_tensor(sino, dtype=torch.float32)
    return back_project(filter_sinogram(s, filter_name), angles_deg, n)
