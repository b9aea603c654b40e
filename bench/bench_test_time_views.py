"""Test-time views (``test_time_views``) of one checkpoint on a simulated split: per view count, the
fraction of dose steps in order (real source slices), PLCC+SROCC+KROCC, interval coverage, mean
absolute error and the scoring time. Prints numbers only.

    .venv/bin/python bench/bench_test_time_views.py --data /work/data/rc5/test [--model M] [--views 1 2 4]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="a `qcnode simulate` split (image/, labels, meta.csv)")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped model)")
    ap.add_argument("--views", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import numpy as np

    from qcnode.model.scorer import Scorer
    from qcnode.training.data import cache_labeled, load_labeled
    from qcnode.training.metrics import all_metrics
    from qcnode.training.realval import dose_order

    scorer = Scorer.load(args.model, threads=args.threads)
    ds = load_labeled(args.data)
    x = cache_labeled(ds, scorer.config.input_size, scorer.config.window_hu)
    print(f"{scorer.version} on {args.data} ({len(ds)} images)")
    for views in args.views:
        scorer.model.config.test_time_views = views
        t0 = time.perf_counter()
        q = scorer.score_tensors(x, batch_size=32)
        seconds = time.perf_counter() - t0
        pred = np.asarray([r.score for r in q])
        m = all_metrics(pred, ds.labels, [r.score_low for r in q], [r.score_high for r in q])
        order = dose_order(args.data, dict(zip(ds.files, pred.tolist())))
        print(f"  {views} view(s): dose steps in order {order['fraction_steps_in_order']:.4f}, "
              f"full above quarter {order['full_above_quarter_dose']:.4f}, sum {m['overall']:.4f}, "
              f"coverage {m['coverage']:.3f}, MAE {np.mean(np.abs(pred - ds.labels)):.3f}, "
              f"{len(ds) / seconds:.1f} images/s (network only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
