"""PNG thumbnails of spooled CT slices in a soft-tissue window (W400 / L40), rendered on request
and only while the instance is still in the spool (nothing is cached on disk)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

WINDOW_WIDTH = 400.0
WINDOW_LEVEL = 40.0
MAX_SIDE = 256


def window_to_uint8(hu: np.ndarray, width: float = WINDOW_WIDTH, level: float = WINDOW_LEVEL) -> np.ndarray:
    """HU -> 0..255 grey levels: level - width/2 is black, level + width/2 white."""
    lo = level - width / 2.0
    scaled = (hu.astype(np.float32) - lo) * (255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def render_png(path: Path, max_side: int = MAX_SIDE) -> bytes:
    """The first slice of a spooled DICOM file as a windowed PNG at most ``max_side`` pixels wide.
    Raises FileNotFoundError when the file has left the spool, ValueError when it has no CT slice."""
    from PIL import Image

    from qcnode.dicom.pixels import SkipSlice, UnreadableFile, iter_slices, read_dataset
    if not path.is_file():
        raise FileNotFoundError(str(path))
    try:
        ct = next(iter_slices(read_dataset(path), str(path)))
    except (SkipSlice, UnreadableFile, StopIteration) as exc:
        raise ValueError(f"no CT slice to render: {exc}") from None
    img = Image.fromarray(window_to_uint8(ct.hu), mode="L")
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
