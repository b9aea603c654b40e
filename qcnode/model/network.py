"""MD-IQA network (arXiv 2311.08024): dual ViT/ConvNeXt branches, deformable alignment at
several scales, a weighted patch head and multi-scale Gaussian distribution regression.

The input is the preprocessed slice plus fixed derived channels (``MDIQA.input_channels``). A
reduced timm ViT gives one token map; a reduced timm ConvNeXt gives stage maps, of which the
``align_stages`` are used. Per align stage the ViT map is resized to the stage grid and sampled by
a deformable 3x3 convolution whose offsets come from both maps (``deform_conv3x3``), then fused
with the ConvNeXt map; the stages are pooled to the coarsest grid and fused. A MANIQA-style
weighted patch head gives K x n_bins logits (``head="multiscale"``), one head (``"single"``) or
one score (``"regression"``, MSE). ``branches="vit"`` / ``"convnext"`` are single-branch
ablations. Everything trains from scratch (no hub weights).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import DeformConv2d

from qcnode.model.heads import DistributionReadout

BRANCHES = ("dual", "vit", "convnext")
HEADS = ("multiscale", "single", "regression")
INPUT_MODES = ("soft", "wide")
TEST_TIME_VIEWS = (1, 2, 4, 8)  # 1 = as is; 2 = + left-right mirror; 4 = + up-down mirrors; 8 = + transposes


@dataclass
class MDIQAConfig:
    """Everything needed to rebuild the network and its preprocessing (stored in checkpoints)."""
    vit_name: str = "vit_tiny_patch16_224"
    vit_kwargs: dict[str, Any] = field(default_factory=lambda: {"depth": 3, "embed_dim": 128, "num_heads": 4})
    convnext_name: str = "convnext_atto"
    convnext_kwargs: dict[str, Any] = field(default_factory=lambda: {"dims": [32, 64, 128, 256],
                                                                     "depths": [1, 1, 2, 1]})
    input_size: int = 128
    align_stages: tuple[int, ...] = (1, 2)
    sigmas: tuple[float, ...] = (0.1, 0.25, 0.5)
    n_bins: int = 41
    score_range: tuple[float, float] = (0.0, 4.0)
    branches: str = "dual"
    head: str = "multiscale"
    fuse_dim: int = 96
    align_dim: int = 24  # channels of the deformable alignment (ViT map projected to this)
    window_hu: tuple[float, float] = (-160.0, 240.0)  # HU window mapped to [0, 1] by preprocess
    highpass_gain: float = 16.0  # "soft" mode: gain of the high-pass channel (0 = image channel only)
    # "soft": preprocess with the soft-tissue window; channels = image (+ high-pass of the windowed image).
    # "wide": preprocess with a wide window (window_hu, e.g. -1024..1024 HU) so noise and streaks in air
    #         and bone stay visible; channels = soft-tissue view (tissue_window_hu), wide view, and a
    #         high-pass residual in HU / highpass_hu. Checkpoints without this key are "soft".
    input_mode: str = "soft"
    tissue_window_hu: tuple[float, float] = (-160.0, 240.0)
    highpass_hu: float = 10.0
    interval_temperature: float = 1.0  # softmax temperature for the interval only (fitted on validation)
    # inference only: score each slice in this many mirrored views (TEST_TIME_VIEWS) and average the
    # predicted distributions before the readout (training augments with the same flips). Training's
    # validation and interval fit see one view; set it after training (``qcnode derive``)
    test_time_views: int = 1

    def __post_init__(self) -> None:
        self.align_stages = tuple(int(s) for s in self.align_stages)
        self.sigmas = tuple(float(s) for s in self.sigmas)
        self.score_range = (float(self.score_range[0]), float(self.score_range[1]))
        self.window_hu = (float(self.window_hu[0]), float(self.window_hu[1]))
        self.tissue_window_hu = (float(self.tissue_window_hu[0]), float(self.tissue_window_hu[1]))
        if self.input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {self.input_mode!r}")
        if self.window_hu[1] <= self.window_hu[0] or self.tissue_window_hu[1] <= self.tissue_window_hu[0]:
            raise ValueError("HU windows must have low < high")
        if self.branches not in BRANCHES:
            raise ValueError(f"branches must be one of {BRANCHES}, got {self.branches!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.branches != "vit" and len(self.align_stages) < 1:
            raise ValueError("align_stages needs at least one ConvNeXt stage")
        if self.branches == "dual" and len(self.align_stages) < 2:
            raise ValueError("the dual-branch MD-IQA aligns at two or more scales (align_stages)")
        if not self.sigmas or min(self.sigmas) <= 0:
            raise ValueError("sigmas must be positive")
        if self.n_bins < 2:
            raise ValueError("n_bins must be >= 2")
        if type(self.test_time_views) is not int or self.test_time_views not in TEST_TIME_VIEWS:
            raise ValueError(f"test_time_views must be one of {TEST_TIME_VIEWS}, got {self.test_time_views!r}")
        if not isinstance(self.interval_temperature, (int, float)) or isinstance(self.interval_temperature, bool) \
                or not 0 < float(self.interval_temperature) < float("inf"):
            raise ValueError(f"interval_temperature must be a positive number, got {self.interval_temperature!r}")

    @property
    def head_sigmas(self) -> tuple[float, ...]:
        """The sigmas actually trained: all for "multiscale", the middle one for "single"."""
        if self.head == "single":
            return (self.sigmas[len(self.sigmas) // 2],)
        return self.sigmas

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("align_stages", "sigmas", "score_range", "window_hu", "tissue_window_hu"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MDIQAConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MDIQAConfig keys: {sorted(unknown)}")
        d = copy.deepcopy(d)
        d.setdefault("input_mode", "soft")  # checkpoints written before input modes existed
        return cls(**d)


PRESETS: dict[str, dict[str, Any]] = {
    # small enough for CPU deployment
    "default": {},
    # default network with the wide-window input (noise/streaks in air and bone stay visible);
    # see models/MODEL_CARD.md for why this is the recommended input for the next shipped model
    "wide": {"input_mode": "wide", "window_hu": (-1024.0, 1024.0)},
    # wide-mode channels over the LDCTIQAC2023 window [-1000, 400] HU (C -300 / W 1400): a challenge
    # tif and the DICOM it came from give the network the same input
    "challenge": {"input_mode": "wide", "window_hu": (-1000.0, 400.0)},
    # the paper-sized backbones (ViT-S + ConvNeXt-T); builds and trains, too slow to ship on CPU
    "paper": {"vit_name": "vit_small_patch16_224", "vit_kwargs": {}, "convnext_name": "convnext_tiny",
              "convnext_kwargs": {},
              "input_size": 224, "align_stages": (1, 2, 3), "fuse_dim": 256, "align_dim": 96},
}


def preset_config(name: str = "default", **overrides: Any) -> MDIQAConfig:
    """An MDIQAConfig from a named preset ("default", "paper") with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    d = MDIQAConfig().to_dict()
    d.update(copy.deepcopy(PRESETS[name]))
    d.update(overrides)
    return MDIQAConfig.from_dict(d)


def _local_mean(x: torch.Tensor) -> torch.Tensor:
    """3x3 box mean with replicated borders."""
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def deform_conv3x3(x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """3x3 deformable convolution (stride 1, padding 1, DCNv1), numerically identical to
    ``torchvision.ops.deform_conv2d`` with the same offsets layout (B, 2*9, H, W: dy, dx per tap).

    Implemented as 9 bilinear ``grid_sample`` calls plus a 1x1 convolution over the stacked taps,
    which on CPU is much faster than torchvision's kernel and makes CPU training feasible (tests
    check the equality).
    """
    b, c, h, w = x.shape
    ys = torch.arange(h, dtype=x.dtype, device=x.device).view(1, h, 1)
    xs = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, w)
    off = offsets.view(b, 9, 2, h, w)
    taps = []
    for k in range(9):
        py = ys + (k // 3 - 1) + off[:, k, 0]
        px = xs + (k % 3 - 1) + off[:, k, 1]
        grid = torch.stack([px * (2.0 / max(w - 1, 1)) - 1.0, py * (2.0 / max(h - 1, 1)) - 1.0], dim=-1)
        taps.append(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True))
    cols = torch.stack(taps, dim=2).reshape(b, c * 9, h, w)
    return F.conv2d(cols, weight.reshape(weight.shape[0], c * 9, 1, 1), bias)


class DeformAlign(nn.Module):
    """Align a ViT map to one ConvNeXt stage with a deformable 3x3 conv and fuse them."""

    def __init__(self, vit_dim: int, cnn_dim: int, out_dim: int, align_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(vit_dim, align_dim, 1)
        self.offset = nn.Conv2d(align_dim + cnn_dim, 2 * 3 * 3, 3, padding=1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.deform = DeformConv2d(align_dim, align_dim, 3, padding=1)
        self.fuse = nn.Sequential(nn.Conv2d(align_dim + cnn_dim, out_dim, 1), nn.GELU())

    def forward(self, vit_map: torch.Tensor, cnn_map: torch.Tensor) -> torch.Tensor:
        v = F.interpolate(self.proj(vit_map), size=cnn_map.shape[-2:], mode="bilinear", align_corners=False)
        offsets = self.offset(torch.cat([v, cnn_map], 1))
        # the parameters live in a torchvision DeformConv2d; the computation is the equivalent,
        # faster deform_conv3x3 (identical results, see its docstring)
        aligned = deform_conv3x3(v, offsets, self.deform.weight, self.deform.bias)
        return self.fuse(torch.cat([aligned, cnn_map], 1))


class WeightedPatchHead(nn.Module):
    """Per-patch outputs pooled with per-patch softmax weights (MANIQA-style)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.score = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.GELU(), nn.Conv2d(in_dim, out_dim, 1))
        self.weight = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), nn.GELU(), nn.Conv2d(in_dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.score(x).flatten(2)                              # (B, out, P)
        w = torch.softmax(self.weight(x).flatten(2), dim=-1)      # (B, 1, P)
        return (s * w).sum(-1)                                    # (B, out)


class MDIQA(nn.Module):
    """The MD-IQA scorer. ``forward(x)`` with x (B, 1, S, S) in [0, 1] returns raw outputs:
    logits (B, K, n_bins) for distribution heads, or (B, 1) scores for the regression head."""

    def __init__(self, config: MDIQAConfig | None = None):
        super().__init__()
        self.config = cfg = config or MDIQAConfig()
        if cfg.input_mode == "wide":
            self.in_chans = 3
        else:
            self.in_chans = 2 if cfg.highpass_gain > 0 else 1
        self.vit = None
        self.cnn = None
        if cfg.branches in ("dual", "vit"):
            kw = dict(cfg.vit_kwargs)
            kw.setdefault("img_size", cfg.input_size)
            self.vit = timm.create_model(cfg.vit_name, pretrained=False, num_classes=0, in_chans=self.in_chans, **kw)
            vit_dim = self.vit.embed_dim
        if cfg.branches in ("dual", "convnext"):
            self.cnn = timm.create_model(cfg.convnext_name, pretrained=False, features_only=True, in_chans=self.in_chans,
                                         out_indices=tuple(sorted(cfg.align_stages)), **cfg.convnext_kwargs)
            cnn_dims = self.cnn.feature_info.channels()
        stages = sorted(cfg.align_stages)
        if cfg.branches == "dual":
            self.align = nn.ModuleList(DeformAlign(vit_dim, c, cfg.fuse_dim, cfg.align_dim) for c in cnn_dims)
            fused_in = cfg.fuse_dim * len(stages)
        elif cfg.branches == "convnext":
            self.align = nn.ModuleList(nn.Sequential(nn.Conv2d(c, cfg.fuse_dim, 1), nn.GELU()) for c in cnn_dims)
            fused_in = cfg.fuse_dim * len(stages)
        else:
            self.align = nn.ModuleList([nn.Sequential(nn.Conv2d(vit_dim, cfg.fuse_dim, 1), nn.GELU())])
            fused_in = cfg.fuse_dim
        self.fuse = nn.Sequential(nn.Conv2d(fused_in, cfg.fuse_dim, 1), nn.GELU())
        self.n_heads = len(cfg.head_sigmas)
        out_dim = 1 if cfg.head == "regression" else self.n_heads * cfg.n_bins
        self.head = WeightedPatchHead(cfg.fuse_dim, out_dim)
        self.readout = DistributionReadout(cfg.head_sigmas, cfg.n_bins, cfg.score_range)

    @property
    def is_distribution(self) -> bool:
        return self.config.head != "regression"

    def input_channels(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed (not learned) input channels computed from the preprocessed slice x in [0, 1].

        "wide" mode (x = wide HU window): the soft-tissue view (``tissue_window_hu``), the wide view,
        and the high-pass residual clamp((HU - 3x3 local mean HU) / highpass_hu, -4, 4).
        "soft" mode (x = soft-tissue window): the image, plus (``highpass_gain`` > 0)
        clamp(gain * (x - 3x3 local mean), -4, 4).
        The high-pass residual (as the local normalisation of CNN-IQA) makes noise texture and
        streaks directly visible to the first layers."""
        cfg = self.config
        base = (x - 0.5) / 0.25
        if cfg.input_mode == "wide":
            lo, hi = cfg.window_hu
            hu = x * (hi - lo) + lo
            tlo, thi = cfg.tissue_window_hu
            tissue = ((hu - tlo) / (thi - tlo)).clamp(0.0, 1.0)
            hp = ((hu - _local_mean(hu)) / cfg.highpass_hu).clamp(-4.0, 4.0)
            return torch.cat([(tissue - 0.5) / 0.25, base, hp], 1)
        if self.in_chans == 1:
            return base
        hp = (cfg.highpass_gain * (x - _local_mean(x))).clamp(-4.0, 4.0)
        return torch.cat([base, hp], 1)

    def vit_map(self, x: torch.Tensor) -> torch.Tensor:
        """ViT tokens (prefix tokens dropped) reshaped to a (B, D, h, w) map."""
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]
        h, w = self.vit.patch_embed.grid_size
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The fused multi-scale feature map fed to the patch head."""
        x = self.input_channels(x)
        if self.config.branches == "vit":
            return self.fuse(self.align[0](self.vit_map(x)))
        cnn_maps = self.cnn(x)
        if self.config.branches == "dual":
            v = self.vit_map(x)
            maps = [m(v, c) for m, c in zip(self.align, cnn_maps)]
        else:
            maps = [m(c) for m, c in zip(self.align, cnn_maps)]
        grid = min((m.shape[-2], m.shape[-1]) for m in maps)
        maps = [m if m.shape[-2:] == grid else F.adaptive_avg_pool2d(m, grid) for m in maps]
        return self.fuse(torch.cat(maps, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(x))
        if self.is_distribution:
            return out.reshape(x.shape[0], self.n_heads, self.config.n_bins)
        return out

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(score, score_low, score_high), each (B,); the interval is the 5th-95th percentile
        of the predicted mixture, read at ``interval_temperature`` (regression heads give a
        zero-width interval). With ``test_time_views`` > 1 the views' outputs are averaged."""
        views = mirrored_views(x, self.config.test_time_views)
        out = self.forward(torch.cat(views)) if len(views) > 1 else self.forward(x)
        return self.readout_outputs(out.reshape(len(views), x.shape[0], *out.shape[1:]))

    def readout_outputs(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Turn raw outputs (B, ...) into (score, low, high) on CPU; outputs of several views of
        the same slices (V, B, ...) are averaged as distributions (regression: as scores)."""
        lo, hi = self.config.score_range
        views = out.float() if out.dim() == (4 if self.is_distribution else 3) else out.float().unsqueeze(0)
        if not self.is_distribution:
            s = views[..., 0].mean(0).cpu().clamp(lo, hi)
            return s, s.clone(), s.clone()
        probs = torch.softmax(views, dim=-1).mean(0)
        score = self.readout.score(probs).cpu().clamp(lo, hi)
        t = float(self.config.interval_temperature)
        pct = self.readout.percentiles(probs if t == 1.0 else torch.softmax(views / t, dim=-1).mean(0))
        return score, torch.minimum(pct[:, 0], score), torch.maximum(pct[:, 1], score)


def mirrored_views(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The first ``n`` of: x, left-right mirror, up-down mirror, both, and their transposes."""
    flips = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]
    return (flips + [v.transpose(-2, -1) for v in flips])[:n]


def build_model(config: MDIQAConfig | dict | None = None) -> MDIQA:
    """An MDIQA from a config object or dict (None -> default)."""
    if isinstance(config, dict):
        config = MDIQAConfig.from_dict(config)
    return MDIQA(config)
