"""Training data for the MD-IQA scorer: tif conventions, the LDCTIQAC2023 layout, unlabeled folders,
augmentation. The one preprocessing lives in ``qcnode.model.preprocess``.

Tif conventions (``TifConvention``): every tif is mapped to HU before the one preprocessing, so a
tif and the DICOM it came from reach the network identically. The LDCTIQAC2023 challenge
distributes [0, 1] tifs where [0, 1] is the HU window centre -300 / width 1400, i.e. [-1000, 400]
HU (``shared/LDCTIQAC.md``). The default, "auto", reads a tif whose finite values all lie in
[-0.05, 1.05] that way and anything else as HU (the simulator writes float32 HU). A folder may
declare another convention in ``convention.json`` (``{"convention": "hu"}``, ``"ldctiqac"`` or
``"window:LO,HI"``); commands take ``--convention`` too, and report the one used.

LDCTIQAC2023 layout: ``ROOT/image/*.tif`` and a JSON ``{file name: mean score}`` in ROOT
(``ROOT/<split>.json`` such as train.json/test.json, or the only ``*.json`` there). An optional
``ROOT/meta.csv`` (written by ``qcnode simulate``) adds per-image metadata (source_id, dose, views).
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from qcnode.model.preprocess import (AIR_HU, DEFAULT_INPUT_SIZE, DEFAULT_WINDOW_HU, LDCTIQAC_WINDOW_HU,  # noqa: F401
                                     preprocess)

NORMALISED_RANGE = (-0.05, 1.05)     # a tif inside this range is already normalised
TIF_SUFFIXES = (".tif", ".tiff")


CONVENTION_FILE = "convention.json"


@dataclass(frozen=True)
class TifConvention:
    """How a tif's values map to HU: "auto", "ldctiqac", "hu" or "window:LO,HI"."""
    name: str
    window_hu: tuple[float, float] | None = None  # [0, 1] -> [lo, hi] HU ("window", "ldctiqac")

    @classmethod
    def parse(cls, text: str) -> "TifConvention":
        key = str(text).strip().lower()
        if key in ("auto", "hu"):
            return cls(key)
        if key == "ldctiqac":
            return cls(key, LDCTIQAC_WINDOW_HU)
        if key.startswith("window:"):
            try:
                lo, hi = (float(v) for v in key[len("window:"):].split(","))
            except ValueError:
                lo = hi = float("nan")
            if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
                raise ValueError(f"tif convention {text!r}: expected window:LO,HI with LO < HI (HU)")
            return cls("window", (lo, hi))
        raise ValueError(f"unknown tif convention {text!r}; choose auto, ldctiqac, hu or window:LO,HI")

    def to_hu(self, img: np.ndarray) -> np.ndarray:
        """The tif's values in HU."""
        window = self.window_hu
        if self.name == "auto":
            window = LDCTIQAC_WINDOW_HU if looks_normalised(img) else None
        if window is None:
            return img
        lo, hi = window
        return (img * np.float32(hi - lo) + np.float32(lo)).astype(np.float32)

    def describe(self) -> str:
        if self.name == "auto":
            return ("auto: [0, 1] tifs as LDCTIQAC2023 (centre -300 / width 1400 = [-1000, 400] HU), "
                    "others as HU")
        if self.name == "hu":
            return "hu: tif values are HU"
        lo, hi = self.window_hu
        return f"{self.name}: [0, 1] = [{lo:g}, {hi:g}] HU"


def folder_convention(root: str | Path, override: str | None = None) -> TifConvention:
    """The tif convention of a folder: ``override``, else ROOT/convention.json, else "auto"."""
    if override:
        return TifConvention.parse(override)
    path = Path(root) / CONVENTION_FILE
    if not path.is_file():
        return TifConvention("auto")
    try:
        text = json.loads(path.read_text())["convention"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: expected {{\"convention\": \"auto|ldctiqac|hu|window:LO,HI\"}}: {exc}") from exc
    return TifConvention.parse(text)


def looks_normalised(img: np.ndarray) -> bool:
    """True when all finite values lie in [-0.05, 1.05] (an already normalised image)."""
    finite = img[np.isfinite(img)]
    return finite.size > 0 and float(finite.min()) >= NORMALISED_RANGE[0] and float(finite.max()) <= NORMALISED_RANGE[1]


def read_tif(path: str | Path) -> np.ndarray:
    """A single-image tif as a float32 2-D array (first page; a trailing channel axis of 1 is dropped)."""
    import tifffile

    arr = np.asarray(tifffile.imread(str(path)))
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D image, got shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


def read_tif_hu(path: str | Path, convention: TifConvention = TifConvention("auto")) -> np.ndarray:
    """A tif in HU under ``convention``."""
    return convention.to_hu(read_tif(path))


def preprocess_tif(path: str | Path, size: int = DEFAULT_INPUT_SIZE,
                   window: tuple[float, float] = DEFAULT_WINDOW_HU,
                   convention: TifConvention = TifConvention("auto")) -> torch.Tensor:
    """Read a tif, map it to HU under ``convention`` and preprocess it."""
    return preprocess(read_tif_hu(path, convention), size, window)


@dataclass
class LabeledSet:
    """A labeled folder in the LDCTIQAC2023 layout."""
    root: Path
    files: list[str]
    labels: np.ndarray                                  # (N,) float32
    meta: list[dict[str, str]] = field(default_factory=list)  # one row per file ({} without meta.csv)
    convention: TifConvention = TifConvention("auto")

    def __len__(self) -> int:
        return len(self.files)

    def paths(self) -> list[Path]:
        return [self.root / "image" / f for f in self.files]

    def groups(self) -> list[str]:
        """Anatomy group per image (meta source_id; the file name when there is no meta)."""
        return [m.get("source_id") or f for m, f in zip(self.meta, self.files)]


def find_label_json(root: Path) -> Path:
    """The label JSON of an LDCTIQAC-layout folder (``<name>.json``, else the only ``*.json``)."""
    own = root / f"{root.name}.json"
    if own.is_file():
        return own
    found = sorted(p for p in root.glob("*.json") if p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"{root}: no label JSON ({{file name: score}}) found")
    raise ValueError(f"{root}: several JSON files {[p.name for p in found]}; expected {root.name}.json")


def read_meta(root: Path) -> dict[str, dict[str, str]]:
    """ROOT/meta.csv as {file: row}; {} when absent."""
    p = root / "meta.csv"
    if not p.is_file():
        return {}
    with p.open(newline="") as fh:
        return {row["file"]: row for row in csv.DictReader(fh) if row.get("file")}


def load_labeled(root: str | Path, convention: str | None = None) -> LabeledSet:
    """Load an LDCTIQAC2023-layout folder: image/*.tif + {file: mean score} JSON (+ optional meta.csv);
    the tif convention is ``convention``, else the folder's convention.json, else "auto"."""
    root = Path(root)
    if not (root / "image").is_dir():
        raise FileNotFoundError(f"{root}: missing image/ folder (expected the LDCTIQAC2023 layout)")
    label_path = find_label_json(root)
    try:
        labels = json.loads(label_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{label_path}: invalid JSON: {exc}") from exc
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"{label_path}: expected a non-empty object {{file name: score}}")
    files = sorted(labels)
    missing = [f for f in files if not (root / "image" / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}/image: {len(missing)} labeled files missing, e.g. {missing[:3]}")
    try:
        values = np.asarray([float(labels[f]) for f in files], dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{label_path}: non-numeric score: {exc}") from exc
    meta = read_meta(root)
    return LabeledSet(root, files, values, [meta.get(f, {}) for f in files], folder_convention(root, convention))


def iter_unlabeled(root: str | Path, convention: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Slices of an unlabeled folder, recursively: tifs (``folder_convention``) and DICOM files
    (anything else that is not DICOM is ignored). Yields (id, HU image); localizers and unreadable
    files are skipped."""
    from qcnode.dicom.pixels import SkipSlice, UnreadableFile, load_slices

    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"unlabeled data not found: {root}")
    tif_convention = folder_convention(root if root.is_dir() else root.parent, convention)
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for p in paths:
        if p.suffix.lower() in TIF_SUFFIXES:
            yield str(p), read_tif_hu(p, tif_convention)
            continue
        if p.suffix.lower() in (".csv", ".json", ".txt", ".md"):
            continue
        try:
            slices = load_slices(p)
        except (SkipSlice, UnreadableFile):
            continue
        for s in slices:
            yield f"{p}#{s.frame}" if s.frame is not None else str(p), s.hu


def preprocess_many(images: Iterable[np.ndarray], size: int, window: tuple[float, float],
                    progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Stack preprocessed HU images into an (N, 1, size, size) float32 tensor (an in-memory cache)."""
    out = []
    for i, img in enumerate(images):
        out.append(preprocess(img, size, window))
        if progress:
            progress(i + 1)
    if not out:
        return torch.empty(0, 1, size, size)
    return torch.stack(out)


def cache_labeled(ds: LabeledSet, size: int, window: tuple[float, float],
                  progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Preprocess every image of a labeled set once: (N, 1, size, size)."""
    return preprocess_many((read_tif_hu(p, ds.convention) for p in ds.paths()), size, window, progress)


def augment(x: torch.Tensor, max_shift: int = 6, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random flips, rot90 and small shifted crops (replicate-padded) for a batch (B, 1, S, S).

    Nothing here resamples or filters, so the noise level and texture are unchanged.
    """
    g = generator
    b = x.shape[0]
    out = torch.empty_like(x)
    flips = torch.randint(0, 2, (b, 2), generator=g)
    rots = torch.randint(0, 4, (b,), generator=g)
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=g) if max_shift > 0 else torch.zeros(b, 2, dtype=torch.long)
    s = x.shape[-1]
    padded = F.pad(x, (max_shift,) * 4, mode="replicate") if max_shift > 0 else x
    for i in range(b):
        dy, dx = int(shifts[i, 0]) + max_shift, int(shifts[i, 1]) + max_shift
        img = padded[i, :, dy:dy + s, dx:dx + s]
        if flips[i, 0]:
            img = img.flip(-1)
        if flips[i, 1]:
            img = img.flip(-2)
        out[i] = torch.rot90(img, int(rots[i]), dims=(-2, -1))
    return out


def group_split(groups: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (train, validation) by group so no group is in both (``fraction`` of groups
    go to validation; at least one group when there are two or more)."""
    uniq = sorted(set(groups))
    rng = random.Random(seed)
    rng.shuffle(uniq)
    n_val = int(round(len(uniq) * fraction))
    if fraction > 0 and len(uniq) >= 2:
        n_val = max(1, min(n_val, len(uniq) - 1))
    val_groups = set(uniq[:n_val])
    tr = [i for i, g in enumerate(groups) if g not in val_groups]
    va = [i for i, g in enumerate(groups) if g in val_groups]
    return tr, va


def meta_value(row: dict[str, Any], key: str, default: float = float("nan")) -> float:
    """A numeric meta.csv field (NaN when missing or empty)."""
    try:
        return float(row.get(key, ""))
    except (TypeError, ValueError):
        return default
