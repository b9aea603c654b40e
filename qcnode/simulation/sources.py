"""The sources of a simulation: real normal-dose slices and procedural phantoms.

Real slices are found under folders (``find_real_slices``; localizers and non-DICOM skipped),
thinned per acquisition and split by patient; each is resampled to the output matrix
(``resample_square``: padded to square with air, 2x2 area average for 512 -> 256) and carries its
acquisition's own noise level (``series_noise_levels``). Phantoms come from ``phantoms.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qcnode.dicom.acquisition import anatomy, kernel_class, not_diagnostic_reason
from qcnode.simulation.phantoms import make_phantom



@dataclass
class SourceSpec:
    """One anatomy object to simulate: a real slice (path) or a phantom (seed)."""
    source_id: str
    kind: str  # "real" | "phantom"
    anatomy: str  # "head" | "body"
    series: str
    split: str
    path: str | None = None
    seed: int | None = None
    variants: list[tuple[float, int]] = field(default_factory=list)  # (dose_fraction, views)
    first_index: int = 0  # file number of the first variant in its split
    phantom: str = ""  # phantom kind for make_phantom ("head", "skull_air", ...); empty: the anatomy
    own_noise_hu: float | None = None  # a real slice's own noise (series_noise_levels); None: measure it
    routine_smooth: bool = False  # a routine diagnostic acquisition, smooth/standard kernel (readers' cap)


@dataclass
class SourceImage:
    """A source slice resampled to the output matrix; ``own_noise_hu`` is a real slice's measured
    noise (global noise level at the output matrix), None for phantoms or when undefined."""
    hu: np.ndarray
    pixel_spacing_mm: float
    region: str = ""
    own_noise_hu: float | None = None


def resample_square(hu: np.ndarray, spacing_mm: float | None, size: int) -> tuple[np.ndarray, float]:
    """Pad to square with air and resample to ``size`` (2x2 area average for 512 -> 256)."""
    img = np.asarray(hu, dtype=np.float32)
    img = np.maximum(img, -1000.0)
    h, w = img.shape
    if h != w:
        n = max(h, w)
        img = np.pad(img, [((n - h) // 2, n - h - (n - h) // 2), ((n - w) // 2, n - w - (n - w) // 2)],
                     constant_values=-1000.0)
    n = img.shape[0]
    spacing = float(spacing_mm) if spacing_mm else 500.0 / n
    if n == size:
        return img, spacing
    if n % size == 0:
        k = n // size
        out = img.reshape(size, k, size, k).mean(axis=(1, 3))
    else:
        from skimage.transform import resize
        out = resize(img, (size, size), order=1, anti_aliasing=n > size, preserve_range=True)
    return out.astype(np.float32), spacing * n / size


def load_source(spec: SourceSpec, size: int) -> SourceImage:
    """The HU image of a source, resampled to ``size``."""
    if spec.kind == "phantom":
        ph = make_phantom(spec.phantom or spec.anatomy, int(spec.seed), size)
        return SourceImage(ph.hu, ph.pixel_spacing_mm, ph.region)
    from qcnode.dicom.pixels import load_slices
    from qcnode.dicom.physics import global_noise_level
    sl = load_slices(spec.path)[0]
    spacing = sl.pixel_spacing_mm[0] if sl.pixel_spacing_mm else None
    hu, px = resample_square(sl.hu, spacing, size)
    return SourceImage(hu, px, "real", spec.own_noise_hu or global_noise_level(hu, px))


def series_noise_levels(sources: Sequence[tuple[str, str, str]], size: int,
                        min_series: int = 3) -> dict[str, float]:
    """Own noise (HU at ``size``) per real source id: the median global noise level of its series.

    ``sources``: (source id, series key, path), the key naming one acquisition (patient and series).

    One slice's noise level can be far off where little homogeneous soft tissue is left (a chest
    slice through the heart and thin chest wall reads 2-4x its series' level); the noise of one
    acquisition varies little along it, so a series of ``min_series`` slices or more gives each of
    its slices the series median. Shorter series keep their own measurement."""
    from qcnode.dicom.pixels import load_slices
    from qcnode.dicom.physics import global_noise_level
    by_series: dict[str, list[tuple[str, float | None]]] = {}
    for sid, series, path in sources:
        sl = load_slices(path)[0]
        hu, px = resample_square(sl.hu, sl.pixel_spacing_mm[0] if sl.pixel_spacing_mm else None, size)
        by_series.setdefault(series, []).append((sid, global_noise_level(hu, px)))
    out: dict[str, float] = {}
    for members in by_series.values():
        levels = [v for _, v in members if v]
        median = float(np.median(levels)) if len(levels) >= min_series else None
        for sid, own in members:
            if median or own:
                out[sid] = median or own
    return out


# Real CT slices bundled with pydicom (on every machine): (series, file). Two are 512x512 heads from
# other scanners (JPEG 2000; 693_J2KI is lossy), which give the training more than one real head.
PYDICOM_REAL_SLICES = (("pydicom_ct_small", "CT_small.dcm"),
                       ("pydicom_head_j2k_a", "J2K_pixelrep_mismatch.dcm"),
                       ("pydicom_head_j2k_b", "693_J2KI.dcm"))


def _scorable_dataset(path: Path) -> Any:
    """The header of a scorable CT slice at ``path``; None for anything else (unreadable, localizer...)."""
    from qcnode.dicom.pixels import UnreadableFile, read_dataset, skip_reason
    try:
        ds = read_dataset(path)
    except UnreadableFile:
        return None
    return None if skip_reason(ds) else ds


def default_real_sources(shared_ct: Path | None) -> list[tuple[str, str, str, str]]:
    """(source_id, series, anatomy, path) of the default real slices (localizers skipped)."""
    out: list[tuple[str, str, str, str]] = []
    files: list[tuple[str, Path]] = []
    if shared_ct is not None and shared_ct.is_dir():
        for series_dir in sorted(p for p in shared_ct.iterdir() if p.is_dir()):
            files += [(series_dir.name, f) for f in sorted(series_dir.glob("*.dcm"))]
    from pydicom.data import get_testdata_file
    for series, name in PYDICOM_REAL_SLICES:
        try:
            found = get_testdata_file(name, download=False)
        except Exception:  # noqa: BLE001 - pydicom test data is optional
            found = None
        if found:
            files.append((series, Path(str(found))))
    for series, f in files:
        if _scorable_dataset(f) is None:
            continue
        out.append((f"real:{series}/{f.stem}", series, "head" if "head" in series else "body", str(f)))
    return out


@dataclass(frozen=True)
class RealSlice:
    """A scorable real slice found under a source folder."""
    source_id: str
    series: str
    anatomy: str
    path: str
    patient: str  # PatientID (the split is by patient; never logged)
    kernel: str
    series_uid: str = ""  # SeriesInstanceUID: one acquisition (a folder may hold several)
    not_diagnostic: str = ""  # header words that make it other than a routine diagnostic scan ("PET", ...)

    @property
    def acquisition(self) -> str:
        """Key of the acquisition (patient and series) the slice belongs to."""
        return f"{self.patient}/{self.series_uid or self.series}"

    def as_source(self) -> tuple[str, str, str, str]:
        return self.source_id, self.series, self.anatomy, self.path

    def in_any_folder(self, folders: set[str]) -> bool:
        """Whether the slice lies in one of ``folders`` (names or relative paths: "lung_pet_ct_dx/series2")."""
        parent = "/" + Path(self.path).parent.as_posix().strip("/") + "/"
        return any(f"/{f.strip('/')}/" in parent for f in folders if f.strip("/"))

    def routine(self, not_routine_folders: set[str]) -> bool:
        """A routine diagnostic scan: no not-diagnostic header words, not in a folder listed as not routine."""
        return not self.not_diagnostic and not self.in_any_folder(not_routine_folders)


def find_real_slices(dirs: Sequence[Path]) -> list[RealSlice]:
    """Every scorable slice under user-given folders or files (localizers, non-DICOM skipped)."""
    out = []
    for d in dirs:
        d = Path(d)
        paths = [d] if d.is_file() else sorted(p for p in d.rglob("*") if p.is_file())
        for f in paths:
            if f.suffix.lower() in (".json", ".md", ".txt", ".csv"):
                continue
            ds = _scorable_dataset(f)
            if ds is None:
                continue
            # the folder below the given one ("lung_pet_ct_dx/series1"), or the folder's own name
            series = f.parent.relative_to(d).as_posix() if d.is_dir() and f.parent != d else f.parent.name
            out.append(RealSlice(f"real:{series}/{f.stem}", series, anatomy(ds, str(f)), str(f),
                                 str(ds.get("PatientID", "")) or series, str(ds.get("ConvolutionKernel", "")),
                                 str(ds.get("SeriesInstanceUID", "")), not_diagnostic_reason(ds)))
    return out


def routine_smooth_ids(slices: Sequence[RealSlice], not_routine_folders: set[str]) -> set[str]:
    """Source ids of the slices read as routine diagnostic CT (``qcnode.simulation.readers``): a smooth or
    standard kernel, and routine (``RealSlice.routine``)."""
    return {r.source_id for r in slices if kernel_class(r.kernel) == "smooth" and r.routine(not_routine_folders)}


def thin_series(slices: Sequence[RealSlice], max_per_series: int) -> list[RealSlice]:
    """At most ``max_per_series`` slices of each acquisition, evenly spaced (0: keep all); slices
    stay grouped by patient and folder, in the order found."""
    if max_per_series <= 0:
        return list(slices)
    by_folder: dict[tuple[str, str], list[RealSlice]] = {}
    for r in slices:
        by_folder.setdefault((r.patient, r.series), []).append(r)
    out = []
    for group in by_folder.values():
        by_acquisition: dict[str, list[RealSlice]] = {}
        for r in group:
            by_acquisition.setdefault(r.acquisition, []).append(r)
        kept = set()
        for members in by_acquisition.values():
            idx = np.unique(np.round(np.linspace(0, len(members) - 1, min(len(members), max_per_series))).astype(int))
            kept.update(members[i].source_id for i in idx)
        out += [r for r in group if r.source_id in kept]
    return out


def split_by_patient(slices: Sequence[RealSlice], validation_patients: set[str]) -> tuple[list[RealSlice],
                                                                                        list[RealSlice]]:
    """(training, validation) slices: a patient's slices all go to one side."""
    train = [r for r in slices if r.patient not in validation_patients]
    val = [r for r in slices if r.patient in validation_patients]
    return train, val
