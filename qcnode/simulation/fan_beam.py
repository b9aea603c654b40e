"""Fan-beam CT projector and equiangular fan-beam FBP in torch, over a full 360-degree rotation.

A third-generation scanner's geometry: a point source on a circle of radius ``R`` (pixels) around the
isocentre (the image centre ``c = N // 2``), an equiangular detector arc, views evenly spread over
360 degrees. Sparse views keep the fan of each view, so their streaks are a scanner's, not a
parallel-beam rebinning's. Coordinates: ``x = col - c``, ``y = row - c``; the source of view ``beta``
sits at ``R (cos beta, sin beta)``; the ray of channel angle ``gamma`` is the central ray (towards the
isocentre) turned by ``gamma``. Line integrals are in pixel units, as in ``ct_projector``.

FBP follows Kak & Slaney (ch. 3.4.1, equiangular rays): weight ``R cos(gamma)``, convolve with
``g(gamma) = (gamma / sin gamma)^2 h(gamma) / 2`` (``h`` the ramp, apodised like ``ct_projector``'s
filters), back-project with ``1 / L^2`` over 2 pi. ``tests/test_simulate.py`` checks it on phantoms
and against the parallel-beam FBP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from qcnode.simulation.ct_projector import FILTERS

SOURCE_TO_ISO_MM = 595.0  # Siemens SOMATOM Definition (the Mayo data's scanner family)


@dataclass(frozen=True)
class FanGeometry:
    """Fan-beam geometry for an ``n x n`` grid, all lengths in pixels."""
    n: int
    source_radius: float
    channel_step: float  # radians between detector channels
    channels: int

    @property
    def centre(self) -> int:
        return self.n // 2

    def channel_angles(self) -> torch.Tensor:
        half = (self.channels - 1) / 2
        return (torch.arange(self.channels, dtype=torch.float32) - half) * self.channel_step


def geometry(n: int, pixel_mm: float, source_to_iso_mm: float = SOURCE_TO_ISO_MM) -> FanGeometry:
    """The scanner's geometry for an ``n x n`` image of ``pixel_mm`` pixels: the source circle is kept
    outside the image's corners; channels are one pixel apart at the isocentre."""
    half_diagonal = math.sqrt(2) * n / 2 + 1
    radius = max(source_to_iso_mm / pixel_mm, 1.25 * half_diagonal)
    step = 1.0 / radius
    gamma_max = math.asin(half_diagonal / radius)
    return FanGeometry(n, float(radius), step, 2 * int(math.ceil(gamma_max / step)) + 1)


def view_angles(views: int) -> torch.Tensor:
    """``views`` source angles evenly spread over [0, 2 pi)."""
    return torch.arange(views, dtype=torch.float32) * (2 * math.pi / views)


def forward_project(images: torch.Tensor | np.ndarray, geo: FanGeometry, betas: torch.Tensor) -> torch.Tensor:
    """Fan-beam line integrals of a batch of ``(B, n, n)`` images: ``(B, views, channels)``."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.ndim != 3 or x.shape[-2:] != (geo.n, geo.n):
        raise ValueError(f"images must be (B, {geo.n}, {geo.n}), got {tuple(x.shape)}")
    b, n = x.shape[0], geo.n
    half_diagonal = math.sqrt(2) * n / 2 + 1
    ts = torch.arange(geo.source_radius - half_diagonal, geo.source_radius + half_diagonal, 1.0)
    gammas = geo.channel_angles()
    out = torch.empty((b, betas.numel(), geo.channels), dtype=torch.float32)
    step = max(1, min(betas.numel(), 6_000_000 // (geo.channels * ts.numel())))
    src = x[None]  # (1, B, n, n): the batch rides in the channels, interpolation weights shared
    for start in range(0, betas.numel(), step):
        beta = betas[start:start + step][:, None, None]
        direction = beta + math.pi + gammas[None, :, None]  # central ray points from the source to the centre
        px = geo.source_radius * torch.cos(beta) + ts[None, None, :] * torch.cos(direction)
        py = geo.source_radius * torch.sin(beta) + ts[None, None, :] * torch.sin(direction)
        grid = torch.stack((2 * (px + geo.centre) / (n - 1) - 1, 2 * (py + geo.centre) / (n - 1) - 1), dim=-1)
        sampled = F.grid_sample(src.expand(beta.shape[0], b, n, n), grid, mode="bilinear",
                                padding_mode="zeros", align_corners=True)  # (views, B, channels, samples)
        out[:, start:start + beta.shape[0]] = sampled.sum(dim=-1).transpose(0, 1)
    return out


def _filter_kernel(geo: FanGeometry, size: int, filter_name: str) -> torch.Tensor:
    # Kak & Slaney eq. 3.3-style discrete equiangular kernel, in the Fourier domain, apodised.
    k = np.fft.fftfreq(size, 1.0 / size).astype(np.int64)  # signed channel offsets 0, 1, ..., -1
    alpha = geo.channel_step
    g = np.zeros(size)
    g[k == 0] = 1.0 / (8 * alpha ** 2)
    odd = k % 2 != 0
    g[odd] = -1.0 / (2 * np.pi ** 2 * np.sin(k[odd] * alpha) ** 2)
    spec = np.real(np.fft.fft(g)) * alpha
    freq = np.fft.fftfreq(size)
    if filter_name == "shepp-logan":
        omega = np.pi * freq
        spec[1:] *= np.sin(omega[1:]) / omega[1:]
    elif filter_name == "cosine":
        spec *= np.cos(np.pi * freq)
    elif filter_name in ("hamming", "hann"):
        a0 = 0.54 if filter_name == "hamming" else 0.5
        spec *= a0 + (1 - a0) * np.cos(2 * np.pi * freq)
    elif filter_name != "ramp":
        raise ValueError(f"unknown filter {filter_name!r}; choose one of {FILTERS}")
    return torch.as_tensor(spec, dtype=torch.float32)


def fbp(sino: torch.Tensor, geo: FanGeometry, betas: torch.Tensor, filter_name: str = "ramp") -> torch.Tensor:
    """Equiangular fan-beam FBP of ``(B, views, channels)`` line integrals over 360 degrees: ``(B, n, n)``."""
    s = torch.as_tensor(sino, dtype=torch.float32)
    b, a, c = s.shape
    if a != betas.numel() or c != geo.channels:
        raise ValueError(f"sinogram {tuple(s.shape)} does not match {betas.numel()} views x {geo.channels} channels")
    gammas = geo.channel_angles()
    weighted = s * (geo.source_radius * torch.cos(gammas))
    size = max(64, int(2 ** math.ceil(math.log2(2 * c))))
    kernel = _filter_kernel(geo, size, filter_name)
    q = torch.fft.irfft(torch.fft.rfft(weighted, n=size, dim=-1) * kernel[: size // 2 + 1], n=size, dim=-1)[..., :c]
    n = geo.n
    coords = torch.arange(n, dtype=torch.float32) - geo.centre
    ys, xs = coords[:, None], coords[None, :]
    out = torch.zeros((b, n, n), dtype=torch.float32)
    step = max(1, min(a, 4_000_000 // (n * n)))
    src = q[None]  # (1, B, views, channels)
    half = (c - 1) / 2
    for start in range(0, a, step):
        beta = betas[start:start + step][:, None, None]
        along = geo.source_radius - xs * torch.cos(beta) - ys * torch.sin(beta)  # towards the centre
        across = xs * torch.sin(beta) - ys * torch.cos(beta)
        gamma = torch.atan2(across, along)
        inv_l2 = 1.0 / (along ** 2 + across ** 2)
        gx = 2 * (gamma / geo.channel_step + half) / (c - 1) - 1
        view_idx = torch.arange(start, start + beta.shape[0], dtype=torch.float32)
        gy = (2 * view_idx / (a - 1) - 1 if a > 1 else torch.zeros_like(view_idx))[:, None, None].expand_as(gx)
        grid = torch.stack((gx, gy), dim=-1).reshape(1, -1, n, 2)
        sampled = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out += (sampled[0].reshape(b, beta.shape[0], n, n) * inv_l2[None]).sum(dim=1)
    return out * (2 * math.pi / a)
