"""Load an MD-IQA checkpoint and score HU slices: the API the daemon, ``qcnode score`` and the
evaluation use.

Checkpoint format (a plain dict, ``torch.save``; loaded with ``weights_only=True``)::

    {"format": "qcnode-mdiqa", "format_version": 1, "config": MDIQAConfig.to_dict(),
     "state_dict": {...}, "meta": {...training summary...}}
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from qcnode.model.preprocess import preprocess
from qcnode.model.network import MDIQA, MDIQAConfig

CHECKPOINT_FORMAT = "qcnode-mdiqa"
CHECKPOINT_VERSION = 1
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT = PROJECT_ROOT / "models" / "mdiqa-default.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not an MD-IQA checkpoint (the message names the file)."""


@dataclass
class SliceQuality:
    """Score of one slice on [0, 4] with its 5-95 % interval."""
    score: float
    score_low: float
    score_high: float


def save_checkpoint(model: MDIQA, config: MDIQAConfig | dict, path: str | Path,
                    extra: dict[str, Any] | None = None) -> None:
    """Write a deployable checkpoint (config + weights + metadata) atomically."""
    cfg = config.to_dict() if isinstance(config, MDIQAConfig) else dict(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "config": cfg,
            "state_dict": state, "meta": dict(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def write_untrained_checkpoint(path: str | Path, config: MDIQAConfig | dict | None = None, seed: int = 0) -> Path:
    """A randomly initialised (seeded) checkpoint, for tests of code that loads weights."""
    if isinstance(config, dict):
        config = MDIQAConfig.from_dict(config)
    config = config or MDIQAConfig()
    torch.manual_seed(seed)
    model = MDIQA(config)
    save_checkpoint(model, config, path, {"untrained": True, "seed": seed})
    return Path(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and validate a checkpoint dict; raises CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot read model checkpoint {path}: {type(exc).__name__}: {first}") from exc
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a qcnode MD-IQA checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    if int(blob.get("format_version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {blob.get('format_version')} is newer than "
                              f"this qcnode supports ({CHECKPOINT_VERSION})")
    return blob


def model_from_checkpoint(blob: dict[str, Any], path: str | Path = "<memory>") -> tuple[MDIQA, MDIQAConfig]:
    """Rebuild the network from a checkpoint dict (CheckpointError on mismatch)."""
    try:
        config = MDIQAConfig.from_dict(blob["config"])
        model = MDIQA(config)
        model.load_state_dict(blob["state_dict"])
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: checkpoint does not match the MD-IQA network: "
                              f"{type(exc).__name__}: {exc}") from exc
    return model.eval(), config


INFERENCE_KEYS = ("test_time_views", "interval_temperature")  # config fields that do not touch the weights


def derive_checkpoint(source: str | Path, out: str | Path, changes: dict[str, Any]) -> Path:
    """Copy a checkpoint with inference-only config fields changed (``INFERENCE_KEYS``); the copy's
    metadata names its source (version and sha256) and the changes. ValueError for other keys."""
    bad = sorted(set(changes) - set(INFERENCE_KEYS))
    if bad:
        raise ValueError(f"only inference settings can change without training ({', '.join(INFERENCE_KEYS)}); "
                         f"got {', '.join(bad)}")
    source = Path(source)
    blob = read_checkpoint(source)
    model, config = model_from_checkpoint(blob, source)
    cfg = config.to_dict()
    cfg.update(changes)
    config = MDIQAConfig.from_dict(cfg)  # validates the new values
    digest = file_hash(source)
    meta = dict(blob.get("meta") or {})
    # the training record stays the source's (its validation numbers are of the source's settings)
    meta["derived_from"] = {"version": checkpoint_version(source, digest), "sha256": digest, "set": dict(changes),
                            **({"source_derived_from": meta["derived_from"]} if "derived_from" in meta else {})}
    save_checkpoint(model, config, out, meta)
    return Path(out)


def checkpoint_version(path: str | Path, digest: str) -> str:
    """The version string of a checkpoint file: its name without .pt and the first 8 hex of its sha256."""
    name = Path(path).name
    return f"{name[:-3] if name.endswith('.pt') else Path(name).stem}-{digest[:8]}"


def file_hash(path: str | Path) -> str:
    """sha256 of a file (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Scorer:
    """A loaded MD-IQA model: ``score_hu`` turns HU slices into SliceQuality values."""

    def __init__(self, model: MDIQA, config: MDIQAConfig, version: str, info: dict[str, Any],
                 device: str = "cpu"):
        self.model = model.to(device).eval()
        self.config = config
        self.version = version
        self.info = info
        self.device = torch.device(device)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "cpu", threads: int = 0) -> "Scorer":
        """Load a checkpoint (default: models/mdiqa-default.pt); raises CheckpointError naming the file."""
        path = Path(path) if path is not None else DEFAULT_CHECKPOINT
        if threads and threads > 0:
            torch.set_num_threads(int(threads))
        blob = read_checkpoint(path)
        model, config = model_from_checkpoint(blob, path)
        digest = file_hash(path)
        version = checkpoint_version(path, digest)
        name = version.rsplit("-", 1)[0]
        meta = blob.get("meta") or {}
        training = {k: v for k, v in meta.items() if k != "history"}  # per-epoch history stays in the file
        info = {"name": name, "version": version, "file": str(path), "sha256": digest,
                "config": config.to_dict(), "training": training}
        try:
            return cls(model, config, version, info, device)
        except Exception as exc:  # noqa: BLE001 - e.g. an unavailable CUDA device
            raise CheckpointError(f"{path}: cannot place the model on device {device!r}: {exc}") from exc

    def preprocess(self, hu: np.ndarray) -> torch.Tensor:
        """This model's preprocessing of one HU slice -> (1, S, S)."""
        return preprocess(hu, self.config.input_size, self.config.window_hu)

    def score_tensors(self, x: torch.Tensor, batch_size: int = 16) -> list[SliceQuality]:
        """Score preprocessed inputs (N, 1, S, S)."""
        out: list[SliceQuality] = []
        with torch.inference_mode():
            for i in range(0, x.shape[0], max(1, int(batch_size))):
                s, lo, hi = self.model.predict(x[i:i + batch_size].to(self.device))
                out.extend(SliceQuality(float(a), float(b), float(c))
                           for a, b, c in zip(s.tolist(), lo.tolist(), hi.tolist()))
        return out

    def score_hu(self, slices: Sequence[np.ndarray], batch_size: int = 16,
                 between_batches: Callable[[], Any] | None = None) -> list[SliceQuality]:
        """Score 2-D HU slices (any size; resampled to the model input); one result per slice.
        ``between_batches`` is called after each batch (the worker's pacing)."""
        out: list[SliceQuality] = []
        step = max(1, int(batch_size))
        for i in range(0, len(slices), step):
            x = torch.stack([self.preprocess(h) for h in slices[i:i + step]])
            out.extend(self.score_tensors(x, step))
            if between_batches is not None:
                between_batches()
        return out
