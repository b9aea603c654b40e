"""Benchmark: slices/s of ``qcnode score`` on 512x512 CT DICOM (decode + HU + preprocessing + model),
and peak memory. Prints numbers; never gates on wall-clock.

    .venv/bin/python bench/bench_score.py [--model models/mdiqa-default.pt] [--n 224] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_CT = ROOT.parent / "shared" / "data" / "ct"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--n", type=int, default=224, help="number of DICOM files (copies of the shared 512x512 slices)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the best and the median are printed")
    args = ap.parse_args()

    import numpy as np
    import torch

    from qcnode.scoring.files import score_paths
    from qcnode.model.scorer import Scorer

    torch.set_num_threads(args.threads)
    sources = sorted(p for p in SHARED_CT.rglob("*.dcm") if "localizer" not in p.name)
    rss0 = peak_rss_mb()
    scorer = Scorer.load(args.model, threads=args.threads)
    print(f"model {scorer.version}: input {scorer.config.input_size}px, "
          f"{sum(p.numel() for p in scorer.model.parameters()) / 1e6:.2f} M parameters, "
          f"torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.n):
            shutil.copy(sources[i % len(sources)], Path(tmp) / f"{i:05d}.dcm")
        score_paths(scorer, [Path(tmp)], batch_size=args.batch_size, progress=lambda m: None)  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            doc = score_paths(scorer, [Path(tmp)], batch_size=args.batch_size, progress=lambda m: None)
            times.append(time.perf_counter() - t)
        n = doc["totals"]["slices"]
    # model-only throughput on preprocessed tensors, for reference
    x = torch.rand(args.batch_size * 8, 1, scorer.config.input_size, scorer.config.input_size)
    scorer.score_tensors(x[: args.batch_size], args.batch_size)
    t = time.perf_counter()
    scorer.score_tensors(x, args.batch_size)
    model_only = x.shape[0] / (time.perf_counter() - t)
    best, med = min(times), float(np.median(times))
    print(f"end-to-end (read + decode + HU + preprocess + model), {n} slices of 512x512, batch {args.batch_size}:")
    print(f"  best   {n / best:.1f} slices/s  ({best * 1000 / n:.1f} ms/slice)")
    print(f"  median {n / med:.1f} slices/s")
    print(f"model only: {model_only:.1f} slices/s")
    print(f"peak RSS: {peak_rss_mb():.0f} MB (before loading the model: {rss0:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
