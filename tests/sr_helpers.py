"""Inputs for ``qcnode.dicom.sr.build_series_sr`` made from real CT headers (tests only)."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

MODEL_INFO = {"name": "mdiqa-test", "version": "0.1.0"}
WHEN = dt.datetime(2024, 5, 1, 12, 30, 15, tzinfo=dt.timezone.utc)


def read_headers(folder: Path, limit: int | None = None) -> list[Dataset]:
    """Pixel-free headers of the .dcm files in ``folder`` (sorted by name)."""
    files = sorted(folder.glob("*.dcm"))[:limit]
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def slice_scores(headers: list[Dataset]) -> list[dict]:
    """Distinct, checkable scores per slice: score = 1 + 0.1*i, interval [score-0.3, score+0.45]."""
    out = []
    for i, h in enumerate(headers):
        score = round(1.0 + 0.1 * i, 4)
        out.append({"sop_instance_uid": str(h.SOPInstanceUID), "score": score,
                    "score_low": round(score - 0.3, 4), "score_high": round(score + 0.45, 4)})
    return out


def summary_for(slices: list[dict], verdict: str = "WARN", n_skipped: int = 1) -> dict:
    scores = sorted(s["score"] for s in slices)
    return {"mean_score": round(sum(scores) / len(scores), 4), "min_score": scores[0],
            "p10_score": scores[max(0, int(0.1 * len(scores)) - 1)],
            "fraction_below": round(sum(s < 2.0 for s in scores) / len(scores), 4),
            "verdict": verdict, "n_slices": len(scores), "n_skipped": n_skipped}
