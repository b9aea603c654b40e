"""Low-dose CT training data with synthetic reader labels (``qcnode simulate``).

``plan`` lists the sources of each split (real slices, seeded phantoms) with their dose/view
variants; ``run`` simulates them (``simulate_sources``: one sinogram per source, every variant
degraded from it, ``qcnode.simulation.degrade``), labels them (``qcnode.simulation.readers``) and
writes the LDCTIQAC2023 layout: OUT/{train,val,test}/image/NNNN.tif (float32 HU), OUT/<split>.json
({file name: label}) and meta.csv per split; OUT/unlabeled/ without labels; OUT/simulation.json
records every parameter. Splits are by anatomy object: no real slice or phantom seed appears in
two splits, and clinical slices are split by patient.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from qcnode.dicom.physics import patient_mask
from qcnode.simulation.degrade import (DEFAULT_GEOMETRY, ELECTRONIC_NOISE_COUNTS, FBP_FILTER, FULL_VIEWS,
                                       I0_BY_ANATOMY,
                                       MU_WATER_PER_MM, line_integrals, noisy_line_integrals, real_noise_scale,
                                       reconstruct_hu, soft_tissue_mask)
from qcnode.simulation.readers import (HEAD_NOISE_WEIGHT, READER_COLUMNS, READERS, ROUTINE_OWN_NOISE_CAP_HU,
                                      mean_label, reader_scores, routine_own_noise)
from qcnode.simulation.sources import SourceImage, SourceSpec, load_source

SPLIT_CODES = {"train": 1, "test": 2, "unlabeled": 3, "val": 4}
# Head phantom number k (per split) is a tissue-free head phantom when k % 8 is a key: 25 % of the heads.
SKULL_PHANTOM_CYCLE = {2: "skull_air", 6: "skull_water"}
Variant = tuple[float, int]  # (dose fraction, views)


# --------------------------------------------------------------------------------------- simulation

def simulate_sources(specs: Sequence[SourceSpec], size: int, geometry: str = DEFAULT_GEOMETRY
                     ) -> list[tuple[SourceSpec, int, np.ndarray, dict]]:
    """Simulate every variant of a batch of sources.

    Returns (spec, variant number, float32 HU image, meta row) for each variant. Each source is
    forward-projected once at FULL_VIEWS (``geometry``: "fan" or "parallel"); all dose/view
    variants of a source derive from its sinogram.
    """
    out = []
    for spec in specs:
        im = load_source(spec, size)
        p = line_integrals(im.hu, im.pixel_spacing_mm, geometry)
        out += _simulate_one(spec, im, p, size, geometry)
    return out


def _source_seeds(split: str, kind: str, source_id: str, seed: int | None) -> np.random.SeedSequence:
    """The seeds of one object's noise and reader jitter (str hash() is salted: ids hashed by hand)."""
    entropy = [int(seed)] if kind == "phantom" else [ord(c) for c in source_id]
    return np.random.SeedSequence([SPLIT_CODES[split], *entropy])


def _label_row(row: dict[str, Any], rng: np.random.Generator) -> None:
    """Add the readers' scores and the label to a meta row (noise_hu, streak_index, anatomy)."""
    scores = reader_scores(float(row["noise_hu"]), float(row["streak_index"]), row["anatomy"], rng,
                           routine_own_noise_hu=routine_own_noise(row))
    row["label"] = mean_label(scores)
    row.update({c: sc for c, sc in zip(READER_COLUMNS, scores)})


def relabel(out_dir: Path, routine_smooth: set[str] | None = None) -> dict[str, int]:
    """Re-derive every label of a simulated folder from its meta.csv with the current READERS.

    Gives the labels ``run`` would write today (same per-object reader jitter), without simulating
    again: the images and physical measures do not depend on the reader model. ``routine_smooth``
    (source ids, ``sources.routine_smooth_ids``) rewrites the meta column of that name first; the
    count of source slices it marks is then returned as ``routine_smooth_slices``."""
    counts = {}
    marked: set[str] = set()
    for split in SPLIT_CODES:
        meta_path = Path(out_dir) / split / "meta.csv"
        if split == "unlabeled" or not meta_path.is_file():
            continue
        with meta_path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        rngs: dict[str, np.random.Generator] = {}
        for row in rows:  # file order is variant order within each object
            if routine_smooth is not None:
                row["routine_smooth"] = int(row["source_id"] in routine_smooth)
                if row["routine_smooth"]:
                    marked.add(row["source_id"])
            if row["source_id"] not in rngs:
                seeds = _source_seeds(split, row["source_kind"], row["source_id"],
                                      int(row["seed"]) if row["seed"] else None)
                rngs[row["source_id"]] = np.random.default_rng(seeds.spawn(1)[0])
            _label_row(row, rngs[row["source_id"]])
        _write_split(Path(out_dir), split, rows)
        counts[split] = len(rows)
    if routine_smooth is not None:
        counts["routine_smooth_slices"] = len(marked)
    record = Path(out_dir) / "simulation.json"
    if record.is_file():  # the record names the readers that made the labels
        params = json.loads(record.read_text())
        params["readers"] = [asdict(r) for r in READERS]
        params["routine_own_noise_cap_hu"] = ROUTINE_OWN_NOISE_CAP_HU
        if routine_smooth is not None:
            params["relabelled_routine_smooth"] = counts["routine_smooth_slices"]
        record.write_text(json.dumps(params, indent=1) + "\n")
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
                  size: int, geometry: str) -> list[tuple[SourceSpec, int, np.ndarray, dict]]:
    """Every variant of one source from its sinogram ``p``: (spec, variant number, image, meta row)."""
    seed_seq = _source_seeds(spec.split, spec.kind, spec.source_id, spec.seed)
    gen = torch.Generator().manual_seed(int(seed_seq.generate_state(1)[0]))
    rng = np.random.default_rng(seed_seq.spawn(1)[0])
    recon, measures = _degrade_variants(spec, im, p, size, gen, geometry)
    rows = []
    for n, (d, v) in enumerate(spec.variants):
        row = _meta_row(spec, im, d, v, *measures[(d, v)])
        if spec.split != "unlabeled":
            _label_row(row, rng)
        rows.append((spec, n, recon[(d, v)].astype(np.float32), row))
    return rows


def _degrade_variants(spec: SourceSpec, im: SourceImage, p: torch.Tensor, size: int, gen: torch.Generator,
                      geometry: str) -> tuple[dict[Variant, np.ndarray], dict[Variant, tuple[float, float, float]]]:
    """The HU image and (noise_hu, streak_index, own noise) of every (dose, views) variant; the
    noisy sinograms are drawn from ``gen`` per dose, highest first."""
    i0 = I0_BY_ANATOMY[spec.anatomy]
    real = spec.kind == "real"
    doses = sorted({d for d, _ in spec.variants}, reverse=True)
    noisy = {d: noisy_line_integrals(p, i0, d, gen) for d in doses}
    view_set = sorted({v for _, v in spec.variants}, reverse=True)
    if FULL_VIEWS in view_set:  # the noiseless full-view image comes with that view count's batch
        ref_full = None
    else:
        ref_full = reconstruct_hu(p, FULL_VIEWS, size, im.pixel_spacing_mm, geometry)[0].numpy()
        body = patient_mask(ref_full)
        tissue = soft_tissue_mask(ref_full, body)
    recon: dict[Variant, np.ndarray] = {}
    measures: dict[Variant, tuple[float, float, float]] = {}
    for v in view_set:
        ds = [d for d in doses if (d, v) in spec.variants]
        hu = reconstruct_hu(torch.cat([p] + [noisy[d] for d in ds]), v, size, im.pixel_spacing_mm,
                            geometry).numpy()
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
    return recon, measures


def _meta_row(spec: SourceSpec, im: SourceImage, d: float, v: int, noise_hu: float, streak: float,
              own_noise: float) -> dict[str, Any]:
    """The meta.csv row of one variant, before its labels."""
    return {
        "split": spec.split, "source_id": spec.source_id, "series": spec.series, "source_kind": spec.kind,
        "anatomy": spec.anatomy, "region": im.region, "dose_fraction": round(float(d), 4), "views": int(v),
        "relative_dose": round(float(d) * v / FULL_VIEWS, 4), "noise_hu": round(noise_hu, 3),
        "streak_index": round(streak, 3), "own_noise_hu": round(own_noise, 3),
        "routine_smooth": int(spec.routine_smooth),
        "pixel_spacing_mm": round(im.pixel_spacing_mm, 4),
        "seed": "" if spec.seed is None else int(spec.seed),
    }


def _worker_init() -> None:
    torch.set_num_threads(1)


def _run_batch(specs: list[SourceSpec], size: int, out_dir: str, width: int, geometry: str) -> list[dict]:
    import tifffile
    rows = []
    for spec, n, img, row in simulate_sources(specs, size, geometry):
        name = f"{spec.first_index + n:0{width}d}.tif"
        tifffile.imwrite(os.path.join(out_dir, spec.split, "image", name), img)
        rows.append({"file": name, **row})
    return rows


# ------------------------------------------------------------------------------------------- planning

def plan(*, doses: Sequence[float], views: Sequence[int], train_phantoms: int, test_phantoms: int,
         unlabeled_phantoms: int, unlabeled_variants: int = 3, seed: int = 0,
         real_train: Iterable[tuple[str, str, str, str]] = (), real_test: Iterable[tuple[str, str, str, str]] = (),
         real_val: Iterable[tuple[str, str, str, str]] = (),
         own_noise: dict[str, float] | None = None,
         routine_smooth: set[str] | None = None) -> dict[str, list[SourceSpec]]:
    """The sources of each split with their variants and file numbers (deterministic for a seed).

    Phantom seeds are drawn from one SeedSequence stream per split, so train, test and unlabeled
    phantoms never share a seed. Phantoms alternate head/body; among the head phantoms every
    fourth is a tissue-free head phantom object (SKULL_PHANTOM_CYCLE: "skull_air", then
    "skull_water", alternating), so every split with enough phantoms holds some of each.
    ``routine_smooth``: ids of the real slices the readers read as routine (``sources.routine_smooth_ids``).
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
                                            own_noise_hu=(own_noise or {}).get(sid),
                                            routine_smooth=sid in (routine_smooth or set())))
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
                "views", "relative_dose", "noise_hu", "streak_index", "own_noise_hu", "routine_smooth", "label",
                *READER_COLUMNS, "pixel_spacing_mm", "seed"]


def run(out_dir: Path, splits: dict[str, list[SourceSpec]], size: int = 256, workers: int = 1,
        batch: int = 4, progress: Callable[[str], None] | None = None, params: dict | None = None,
        geometry: str = DEFAULT_GEOMETRY) -> dict[str, int]:
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
                record(_run_batch(job, size, str(out_dir), widths[job[0].split], geometry), len(job))
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
            futures = {pool.submit(_run_batch, job, size, str(out_dir), widths[job[0].split], geometry): len(job)
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
        "geometry": geometry, "full_views": FULL_VIEWS, "fbp_filter": FBP_FILTER, "mu_water_per_mm": MU_WATER_PER_MM,
        "i0_by_anatomy": I0_BY_ANATOMY, "electronic_noise_counts": ELECTRONIC_NOISE_COUNTS,
        "head_noise_weight": HEAD_NOISE_WEIGHT, "readers": [asdict(r) for r in READERS],
        "routine_own_noise_cap_hu": ROUTINE_OWN_NOISE_CAP_HU, "size": size,
        "images": counts, "seconds": round(time.monotonic() - start, 1), **(params or {}),
    }
    (out_dir / "simulation.json").write_text(json.dumps(record_params, indent=1) + "\n")
    return counts
