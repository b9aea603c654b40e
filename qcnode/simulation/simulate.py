"""Low-dose CT simulation with a synthetic reader model (``qcnode simulate``).

Pipeline per source slice (a real normal-dose slice or a procedural phantom, see phantoms.py):

1. Resample to the output matrix (default 256x256). A 512x512 slice is area-averaged 2x2
   (other sizes: linear resampling with anti-aliasing); the pixel size scales accordingly.
   Non-square images are padded with air. HU below -1000 (outside the scan circle) become air.
2. Attenuation ``mu = mu_water (1 + HU/1000)`` (mu_water = 0.0192/mm, ~70 keV effective),
   forward-projected once at the full view count (720 parallel-beam views over 180 degrees,
   ``ct_projector.forward_project``), giving line integrals ``p``.
3. Dose fraction ``f`` (per-view tube current relative to full dose): detector counts
   ``N ~ Poisson(I0 f exp(-p)) + Normal(0, sigma_e^2)`` (electronic-noise floor), clipped at 1
   count, ``p_f = -ln(N / (I0 f))``. I0 is per anatomy (head protocols use more mAs).
4. View reduction: V evenly spread views of the 720 are kept (default 720/256/128/64). The tube
   current per view is unchanged, so fewer views also means less dose (``relative_dose = f V / 720``)
   and streaks.
5. FBP (Shepp-Logan filter) back to ``mu`` and HU. Phantoms (noiseless) are this image. A real
   slice keeps its own pixels and gets only the artifacts: the streaks (noiseless FBP at V views
   minus at full views) and the extra noise, the simulated noise image scaled so that the total is
   ``own x sqrt(720 / (f V))`` (``real_noise_scale``; own noise: ``series_noise_levels``).

Synthetic reader model (labels are synthetic; this is the whole definition):

- Two physical measures per image, both in HU, against noiseless references from the same
  projector. ``noise_hu``: the standard deviation of (image - noiseless image at the same views)
  over soft tissue (local mean -20..150 HU inside the patient; the whole patient if that is too
  small: then -300..300 HU, then the whole patient outline, e.g. the air inside a tissue-free
  skull phantom, where the noise is just as visible); for real slices the slice's own noise
  (its acquisition's global noise level) is added in quadrature. ``streak_index``: the RMS over the patient of
  (noiseless image at V views - noiseless image at 720 views), i.e. the deterministic,
  directional view-aliasing residual after removing the random noise.
- R = 5 readers, each with a noise tolerance ``t_n`` (HU) and a noise step ``g_n`` (the noise
  ratio that costs one score step: perception of noise is roughly logarithmic, Weber-like), a
  streak tolerance ``t_s`` and step ``g_s``, a bias and a per-image jitter (sd, score steps);
  see ``READERS`` (fitted by scripts/calibrate_readers.py). Head images are judged on ``noise_hu x 1.6`` (brain grey/white contrast is
  a few HU, so the same noise is more disturbing than in the abdomen).
  Excess ``e_n = ln(max(noise, t_n) / t_n) / ln(g_n)``, ``e_s = ln(max(streak, t_s) / t_s) / ln(g_s)``;
  reader score = clip(round(4 + bias - sqrt(e_n^2 + e_s^2) + jitter), 0, 4), an integer like a
  radiologist's 0-4 grade.
- Label = mean over the 5 readers, rounded to 0.2 and clipped to [0, 4] (LDCTIQAC2023 style).
  The expected label is monotone (non-increasing) as dose or views fall, because both measures
  grow and the score is a non-increasing function of both.

Output (LDCTIQAC2023 layout): OUT/{train,val,test}/image/NNNN.tif (float32 HU) + OUT/train/train.json /
OUT/test/test.json ({file name: label}) + meta.csv; OUT/unlabeled/image/*.tif + meta.csv (no labels);
OUT/simulation.json records every parameter. Splits are by anatomy object: no real slice or
phantom seed appears in two splits, and clinical slices are split by patient.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage

from qcnode.simulation import ct_projector
from qcnode.simulation.phantoms import make_phantom
from qcnode.dicom.physics import patient_mask

MU_WATER_PER_MM = 0.0192
FULL_VIEWS = 720
FBP_FILTER = "shepp-logan"
I0_BY_ANATOMY = {"head": 2.0e6, "body": 6.0e5}  # unattenuated counts per detector bin and view at f = 1
ELECTRONIC_NOISE_COUNTS = 10.0
HEAD_NOISE_WEIGHT = 1.6
SPLIT_CODES = {"train": 1, "test": 2, "unlabeled": 3, "val": 4}
# Head phantom number k (per split) is a tissue-free head phantom when k % 8 is a key: 25 % of the heads.
SKULL_PHANTOM_CYCLE = {2: "skull_air", 6: "skull_water"}
READER_COLUMNS = [f"reader_{i}" for i in range(1, 6)]


@dataclass(frozen=True)
class Reader:
    """One simulated radiologist (see the module docstring)."""
    noise_tolerance_hu: float  # noise below this is not seen
    noise_step: float  # noise ratio that costs one score step (Weber-like)
    streak_tolerance_hu: float
    streak_step: float
    bias: float  # leniency, score steps
    jitter: float  # per-image inconsistency, sd in score steps


READERS: tuple[Reader, ...] = (  # fitted to the LDCTIQAC2023 scale by scripts/calibrate_readers.py
    Reader(6.87, 1.913, 7.09, 2.131, 0.0, 0.35),
    Reader(6.01, 1.822, 5.67, 2.037, -0.2, 0.30),
    Reader(8.15, 2.005, 8.86, 2.320, 0.2, 0.40),
    Reader(6.44, 2.096, 6.38, 2.131, 0.1, 0.30),
    Reader(7.30, 1.731, 7.80, 1.943, -0.1, 0.45),
)


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


@dataclass
class SourceImage:
    """A source slice resampled to the output matrix; ``own_noise_hu`` is a real slice's measured
    noise (global noise level at the output matrix), None for phantoms or when undefined."""
    hu: np.ndarray
    pixel_spacing_mm: float
    region: str = ""
    own_noise_hu: float | None = None


# ----------------------------------------------------------------------------------------- sources

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


def default_real_sources(shared_ct: Path | None) -> list[tuple[str, str, str, str]]:
    """(source_id, series, anatomy, path) of the default real slices (localizers skipped)."""
    from qcnode.dicom.pixels import UnreadableFile, read_dataset, skip_reason
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
        try:
            ds = read_dataset(f)
        except UnreadableFile:
            continue
        if skip_reason(ds):
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

    @property
    def acquisition(self) -> str:
        """Key of the acquisition (patient and series) the slice belongs to."""
        return f"{self.patient}/{self.series_uid or self.series}"

    def as_source(self) -> tuple[str, str, str, str]:
        return self.source_id, self.series, self.anatomy, self.path


def find_real_slices(dirs: Sequence[Path]) -> list[RealSlice]:
    """Every scorable slice under user-given folders or files (localizers, non-DICOM skipped)."""
    from qcnode.dicom.pixels import UnreadableFile, read_dataset, skip_reason
    out = []
    for d in dirs:
        d = Path(d)
        paths = [d] if d.is_file() else sorted(p for p in d.rglob("*") if p.is_file())
        for f in paths:
            if f.suffix.lower() in (".json", ".md", ".txt", ".csv"):
                continue
            try:
                ds = read_dataset(f)
            except UnreadableFile:
                continue
            if skip_reason(ds):
                continue
            text = " ".join(str(ds.get(k, "")) for k in ("BodyPartExamined", "ProtocolName", "SeriesDescription"))
            anatomy = "head" if any(w in text.upper() for w in ("HEAD", "BRAIN", "SKULL")) or "head" in str(f).lower() \
                else "body"
            # the folder below the given one ("lung_pet_ct_dx/series1"), or the folder's own name
            series = f.parent.relative_to(d).as_posix() if d.is_dir() and f.parent != d else f.parent.name
            out.append(RealSlice(f"real:{series}/{f.stem}", series, anatomy, str(f),
                                 str(ds.get("PatientID", "")) or series, str(ds.get("ConvolutionKernel", "")),
                                 str(ds.get("SeriesInstanceUID", ""))))
    return out


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


# ------------------------------------------------------------------------------------------ physics

def line_integrals(images_hu: np.ndarray, spacings_mm: Sequence[float], views: int = FULL_VIEWS) -> torch.Tensor:
    """Noiseless sinograms (B, views, D) of attenuation line integrals (dimensionless)."""
    mu = np.maximum(MU_WATER_PER_MM * (1.0 + np.asarray(images_hu, dtype=np.float32) / 1000.0), 0.0)
    mu *= np.asarray(spacings_mm, dtype=np.float32)[:, None, None]  # per-pixel attenuation
    return ct_projector.forward_project(mu, ct_projector.default_angles(views))


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
                   full_views: int = FULL_VIEWS) -> torch.Tensor:
    """FBP of (B, full_views, D) line integrals using ``views`` of the views, in HU (B, size, size)."""
    idx = view_indices(views, full_views)
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


def _reader_judgement(r: Reader, noise_hu: float, streak_index: float, anatomy: str) -> float:
    """A reader's score before the per-image jitter and the rounding (see the module docstring)."""
    seen_noise = noise_hu * (HEAD_NOISE_WEIGHT if anatomy == "head" else 1.0)
    en = math.log(max(seen_noise, r.noise_tolerance_hu) / r.noise_tolerance_hu) / math.log(r.noise_step)
    es = math.log(max(streak_index, r.streak_tolerance_hu) / r.streak_tolerance_hu) / math.log(r.streak_step)
    return 4.0 + r.bias - math.hypot(en, es)


def reader_scores(noise_hu: float, streak_index: float, anatomy: str, rng: np.random.Generator,
                  readers: Sequence[Reader] = READERS) -> list[int]:
    """Integer 0-4 scores of the simulated readers for one image (see the module docstring)."""
    scores = []
    for r in readers:
        q = _reader_judgement(r, noise_hu, streak_index, anatomy) + r.jitter * float(rng.standard_normal())
        scores.append(int(min(4, max(0, round(q)))))
    return scores


def expected_reader_mean(noise_hu: float, streak_index: float, anatomy: str,
                         readers: Sequence[Reader] = READERS) -> float:
    """The expected mean reader score of an image (exact over the readers' jitter, before the label's
    rounding to 0.2): what an oracle that knows the image's true noise and streak measures would
    predict. ``qcnode evaluate`` reports its agreement with the labels as the labels' ceiling."""
    total = 0.0
    for r in readers:
        q = _reader_judgement(r, noise_hu, streak_index, anatomy)
        # P(round(q + jitter Z) >= k) for k = 1..4 (the normal survival function, via erfc);
        # clipping to [0, 4] folds the tails into 0 and 4
        total += sum(0.5 * math.erfc((k - 0.5 - q) / (r.jitter * math.sqrt(2.0))) if r.jitter > 0
                     else float(q >= k - 0.5) for k in range(1, 5))
    return total / len(readers)


def mean_label(scores: Sequence[int]) -> float:
    """Mean reader score rounded to 0.2 and clipped to [0, 4]."""
    return float(min(4.0, max(0.0, round(float(np.mean(scores)) * 5.0) / 5.0)))


# --------------------------------------------------------------------------------------- simulation

def simulate_sources(specs: Sequence[SourceSpec], size: int) -> list[tuple[SourceSpec, int, np.ndarray, dict]]:
    """Simulate every variant of a batch of sources.

    Returns (spec, variant number, float32 HU image, meta row) for each variant. Sources are
    forward-projected together (one sinogram each at FULL_VIEWS); all dose/view variants of a
    source derive from its sinogram.
    """
    images = [load_source(s, size) for s in specs]
    p_all = line_integrals(np.stack([im.hu for im in images]), [im.pixel_spacing_mm for im in images])
    out = []
    for b, (spec, im) in enumerate(zip(specs, images)):
        out += _simulate_one(spec, im, p_all[b:b + 1], size)
    return out


def _source_seeds(split: str, kind: str, source_id: str, seed: int | None) -> np.random.SeedSequence:
    """The seeds of one object's noise and reader jitter (str hash() is salted: ids hashed by hand)."""
    entropy = [int(seed)] if kind == "phantom" else [ord(c) for c in source_id]
    return np.random.SeedSequence([SPLIT_CODES[split], *entropy])


def _label_row(row: dict[str, Any], rng: np.random.Generator) -> None:
    """Add the readers' scores and the label to a meta row (noise_hu, streak_index, anatomy)."""
    scores = reader_scores(float(row["noise_hu"]), float(row["streak_index"]), row["anatomy"], rng)
    row["label"] = mean_label(scores)
    row.update({c: sc for c, sc in zip(READER_COLUMNS, scores)})


def relabel(out_dir: Path) -> dict[str, int]:
    """Re-derive every label of a simulated folder from its meta.csv with the current READERS.

    Gives the labels ``run`` would write today (same per-object reader jitter), without simulating
    again: the images and physical measures do not depend on the reader model."""
    counts = {}
    for split in SPLIT_CODES:
        meta_path = Path(out_dir) / split / "meta.csv"
        if split == "unlabeled" or not meta_path.is_file():
            continue
        with meta_path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        rngs: dict[str, np.random.Generator] = {}
        for row in rows:  # file order is variant order within each object
            if row["source_id"] not in rngs:
                seeds = _source_seeds(split, row["source_kind"], row["source_id"],
                                      int(row["seed"]) if row["seed"] else None)
                rngs[row["source_id"]] = np.random.default_rng(seeds.spawn(1)[0])
            _label_row(row, rngs[row["source_id"]])
        _write_split(Path(out_dir), split, rows)
        counts[split] = len(rows)
    return counts


def _write_split(out_dir: Path, split: str, rows: list[dict]) -> None:
    """meta.csv and (labeled splits) the {file: label} JSON of one split."""
    with open(out_dir / split / "meta.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=META_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in META_COLUMNS})
    if split != "unlabeled":
        labels = {r["file"]: float(r["label"]) for r in rows}
        (out_dir / split / f"{split}.json").write_text(json.dumps(labels, indent=1) + "\n")


def _simulate_one(spec: SourceSpec, im: SourceImage, p: torch.Tensor,
                  size: int) -> list[tuple[SourceSpec, int, np.ndarray, dict]]:
    seed_seq = _source_seeds(spec.split, spec.kind, spec.source_id, spec.seed)
    gen = torch.Generator().manual_seed(int(seed_seq.generate_state(1)[0]))
    rng = np.random.default_rng(seed_seq.spawn(1)[0])
    i0 = I0_BY_ANATOMY[spec.anatomy]
    real = spec.kind == "real"
    doses = sorted({d for d, _ in spec.variants}, reverse=True)
    noisy = {d: noisy_line_integrals(p, i0, d, gen) for d in doses}
    view_set = sorted({v for _, v in spec.variants}, reverse=True)
    if FULL_VIEWS in view_set:  # the noiseless full-view image comes with that view count's batch
        ref_full = None
    else:
        ref_full = reconstruct_hu(p, FULL_VIEWS, size, im.pixel_spacing_mm)[0].numpy()
        body = patient_mask(ref_full)
        tissue = soft_tissue_mask(ref_full, body)
    recon: dict[tuple[float, int], np.ndarray] = {}
    measures: dict[tuple[float, int], tuple[float, float, float]] = {}
    for v in view_set:
        ds = [d for d in doses if (d, v) in spec.variants]
        hu = reconstruct_hu(torch.cat([p] + [noisy[d] for d in ds]), v, size, im.pixel_spacing_mm).numpy()
        ref_v = hu[0]
        if ref_full is None:
            ref_full = ref_v
            body = patient_mask(ref_full)
            tissue = soft_tissue_mask(ref_full, body)
        streak = float(np.sqrt(np.mean((ref_v[body] - ref_full[body]) ** 2))) if body.any() else 0.0
        for j, d in enumerate(ds):
            noise_part = hu[1 + j] - ref_v
            simulated = float(np.std(noise_part[tissue]))
            if not real:
                recon[(d, v)] = hu[1 + j]
                measures[(d, v)] = (simulated, streak, 0.0)
                continue
            # a real slice keeps its own pixels and noise; only the extra noise of dose d at v views and
            # the streaks are added (see real_noise_scale)
            own = im.own_noise_hu or simulated * math.sqrt(d * v / FULL_VIEWS)
            scale = real_noise_scale(own, simulated, d, v)
            recon[(d, v)] = im.hu + (ref_v - ref_full) + noise_part * scale
            measures[(d, v)] = (math.hypot(simulated * scale, own), streak, own)
    rows = []
    for n, (d, v) in enumerate(spec.variants):
        noise_hu, streak, own_noise = measures[(d, v)]
        row: dict[str, Any] = {
            "split": spec.split, "source_id": spec.source_id, "series": spec.series, "source_kind": spec.kind,
            "anatomy": spec.anatomy, "region": im.region, "dose_fraction": round(float(d), 4), "views": int(v),
            "relative_dose": round(float(d) * v / FULL_VIEWS, 4), "noise_hu": round(noise_hu, 3),
            "streak_index": round(streak, 3), "own_noise_hu": round(own_noise, 3),
            "pixel_spacing_mm": round(im.pixel_spacing_mm, 4),
            "seed": "" if spec.seed is None else int(spec.seed),
        }
        if spec.split != "unlabeled":
            _label_row(row, rng)
        rows.append((spec, n, recon[(d, v)].astype(np.float32), row))
    return rows


def real_noise_scale(own_noise_hu: float, simulated_noise_hu: float, dose: float, views: int) -> float:
    """Factor for a simulated noise image (dose ``dose``, ``views`` views) added to a real slice.

    The slice already carries its own noise (``own_noise_hu``, measured; whatever kernel, slice
    thickness and mAs made it). Quantum noise variance scales as 1 / (dose x views), so the slice at
    (dose, views) has ``own^2 FULL_VIEWS / (dose views)``; the extra variance is scaled from the
    simulated noise image, which keeps the simulated texture and streak-correlated noise."""
    extra = own_noise_hu * math.sqrt(max(0.0, FULL_VIEWS / (dose * views) - 1.0))
    return extra / simulated_noise_hu if simulated_noise_hu > 0 else 0.0


def _worker_init() -> None:
    torch.set_num_threads(1)


def _run_batch(specs: list[SourceSpec], size: int, out_dir: str, width: int) -> list[dict]:
    import tifffile
    rows = []
    for spec, n, img, row in simulate_sources(specs, size):
        name = f"{spec.first_index + n:0{width}d}.tif"
        tifffile.imwrite(os.path.join(out_dir, spec.split, "image", name), img)
        rows.append({"file": name, **row})
    return rows


# ------------------------------------------------------------------------------------------- planning

def plan(*, doses: Sequence[float], views: Sequence[int], train_phantoms: int, test_phantoms: int,
         unlabeled_phantoms: int, unlabeled_variants: int = 3, seed: int = 0,
         real_train: Iterable[tuple[str, str, str, str]] = (), real_test: Iterable[tuple[str, str, str, str]] = (),
         real_val: Iterable[tuple[str, str, str, str]] = (),
         own_noise: dict[str, float] | None = None) -> dict[str, list[SourceSpec]]:
    """The sources of each split with their variants and file numbers (deterministic for a seed).

    Phantom seeds are drawn from one SeedSequence stream per split, so train, test and unlabeled
    phantoms never share a seed. Phantoms alternate head/body; among the head phantoms every
    fourth is a tissue-free head phantom object (SKULL_PHANTOM_CYCLE: "skull_air", then
    "skull_water", alternating), so every split with enough phantoms holds some of each.
    """
    doses = sorted({float(d) for d in doses}, reverse=True)
    views = sorted({int(v) for v in views}, reverse=True)
    if not doses or any(not (0 < d <= 1) for d in doses):
        raise ValueError(f"dose fractions must be in (0, 1], got {doses}")
    if not views or any(not (0 < v <= FULL_VIEWS) for v in views):
        raise ValueError(f"views must be in 1..{FULL_VIEWS}, got {views}")
    grid = [(d, v) for v in views for d in doses]
    splits: dict[str, list[SourceSpec]] = {"train": [], "val": [], "test": [], "unlabeled": []}
    for split, real in (("train", real_train), ("val", real_val), ("test", real_test)):
        for sid, series, anatomy, path in real:
            splits[split].append(SourceSpec(sid, "real", anatomy, series, split, path=path, variants=list(grid),
                                            own_noise_hu=(own_noise or {}).get(sid)))
    counts = {"train": train_phantoms, "test": test_phantoms, "unlabeled": unlabeled_phantoms}
    used_seeds: set[int] = set()
    for split, count in counts.items():
        seeds = np.random.SeedSequence([seed, SPLIT_CODES[split]]).generate_state(count, dtype=np.uint32)
        var_rng = np.random.default_rng([seed, SPLIT_CODES[split], 7])
        for i, s in enumerate(seeds):
            s = int(s)
            while s in used_seeds:  # vanishingly rare; keeps objects disjoint across splits regardless
                s = (s + 1) % (2 ** 32)
            used_seeds.add(s)
            anatomy = "head" if i % 2 == 0 else "body"
            kind = SKULL_PHANTOM_CYCLE.get((i // 2) % 8, "head") if anatomy == "head" else "body"
            if split == "unlabeled":
                lo = math.log(min(doses))
                variants = [(round(float(math.exp(var_rng.uniform(lo, 0.0))), 4), int(var_rng.choice(views)))
                            for _ in range(unlabeled_variants)]
                variants = list(dict.fromkeys(variants))
            else:
                variants = list(grid)
            splits[split].append(SourceSpec(f"phantom:{kind}:{s}", "phantom", anatomy, f"phantom_{kind}", split,
                                            seed=s, variants=variants, phantom=kind))
    for specs in splits.values():
        index = 0
        for spec in specs:
            spec.first_index = index
            index += len(spec.variants)
    return splits


META_COLUMNS = ["file", "split", "source_id", "series", "source_kind", "anatomy", "region", "dose_fraction",
                "views", "relative_dose", "noise_hu", "streak_index", "own_noise_hu", "label", *READER_COLUMNS,
                "pixel_spacing_mm", "seed"]


def run(out_dir: Path, splits: dict[str, list[SourceSpec]], size: int = 256, workers: int = 1,
        batch: int = 4, progress: Callable[[str], None] | None = None, params: dict | None = None) -> dict[str, int]:
    """Simulate every split into ``out_dir`` (LDCTIQAC2023 layout); returns images per split."""
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out_dir = Path(out_dir)
    for split, specs in splits.items():
        if specs:
            (out_dir / split / "image").mkdir(parents=True, exist_ok=True)
    total_images = sum(len(s.variants) for specs in splits.values() for s in specs)
    total_sources = sum(len(specs) for specs in splits.values())
    widths = {split: max(4, len(str(max(1, sum(len(s.variants) for s in specs)) - 1)))
              for split, specs in splits.items()}
    jobs = []
    for split, specs in splits.items():
        for i in range(0, len(specs), batch):
            jobs.append(specs[i:i + batch])
    rows: dict[str, list[dict]] = {split: [] for split in splits}
    start = time.monotonic()
    done_sources = done_images = 0

    def record(result: list[dict], n_sources: int) -> None:
        nonlocal done_sources, done_images
        for r in result:
            rows[r["split"]].append(r)
        done_sources += n_sources
        done_images += len(result)
        elapsed = time.monotonic() - start
        eta = elapsed / done_images * (total_images - done_images) if done_images else float("nan")
        say(f"simulate: {done_sources}/{total_sources} sources, {done_images}/{total_images} images, "
            f"{elapsed:.0f} s elapsed, ETA {eta:.0f} s")

    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for job in jobs:
                record(_run_batch(job, size, str(out_dir), widths[job[0].split]), len(job))
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
            futures = {pool.submit(_run_batch, job, size, str(out_dir), widths[job[0].split]): len(job)
                       for job in jobs}
            for fut in as_completed(futures):
                record(fut.result(), futures[fut])
    counts = {}
    for split, split_rows in rows.items():
        if not splits[split]:
            continue
        split_rows.sort(key=lambda r: r["file"])
        _write_split(out_dir, split, split_rows)
        counts[split] = len(split_rows)
    record_params = {
        "full_views": FULL_VIEWS, "fbp_filter": FBP_FILTER, "mu_water_per_mm": MU_WATER_PER_MM,
        "i0_by_anatomy": I0_BY_ANATOMY, "electronic_noise_counts": ELECTRONIC_NOISE_COUNTS,
        "head_noise_weight": HEAD_NOISE_WEIGHT, "readers": [asdict(r) for r in READERS], "size": size,
        "images": counts, "seconds": round(time.monotonic() - start, 1), **(params or {}),
    }
    (out_dir / "simulation.json").write_text(json.dumps(record_params, indent=1) + "\n")
    return counts
