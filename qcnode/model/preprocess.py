"""The one preprocessing shared by training and scoring: a 2-D HU slice -> the network's input."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_WINDOW_HU = (-160.0, 240.0)  # soft-tissue window (W400 / L40)
DEFAULT_INPUT_SIZE = 128
AIR_HU = -1000.0
LDCTIQAC_WINDOW_HU = (-1000.0, 400.0)  # the challenge's [0, 1]: centre -300, width 1400


def preprocess(hu: np.ndarray, size: int = DEFAULT_INPUT_SIZE,
               window: tuple[float, float] = DEFAULT_WINDOW_HU) -> torch.Tensor:
    """The one preprocessing shared by training and scoring: 2-D HU array -> (1, size, size) in [0, 1].

    Pads to square (air), resizes (area when shrinking, bilinear when enlarging), windows HU
    [lo, hi] -> [0, 1] and clips.
    """
    img = np.asarray(hu, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {img.shape}")
    fill = AIR_HU
    img = np.nan_to_num(img, nan=fill, posinf=fill, neginf=fill)
    h, w = img.shape
    if h != w:
        n = max(h, w)
        padded = np.full((n, n), fill, dtype=np.float32)
        top, left = (n - h) // 2, (n - w) // 2
        padded[top:top + h, left:left + w] = img
        img = padded
    t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    if t.shape[-1] > size:
        t = F.adaptive_avg_pool2d(t, (size, size))
    elif t.shape[-1] < size:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    lo, hi = window
    t = (t - lo) / (hi - lo)
    return t[0].clamp_(0.0, 1.0)
