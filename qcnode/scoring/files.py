"""``qcnode score`` without the daemon: score every axial CT slice of DICOM files or folders.

Files are read and decoded like the worker does (``qcnode.dicom.pixels``); slices are grouped by
series with a summary each, skipped files carry a reason, and one bad file never ends the run.
"""
from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import Any, Callable


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _iter_files(paths: list[Path]) -> list[Path]:
    """The files given and those under the folders given (recursive, sorted)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        else:
            files.append(p)
    return files


def _series_summary(scores: list[float], n_skipped: int) -> dict[str, Any]:
    import numpy as np

    s = np.asarray(scores, dtype=float)
    out: dict[str, Any] = {"n_slices": int(s.size), "n_skipped": int(n_skipped)}
    if s.size:
        out.update({"mean": round(float(s.mean()), 4), "std": round(float(s.std()), 4),
                    "min": round(float(s.min()), 4), "p10": round(float(np.percentile(s, 10)), 4),
                    "median": round(float(np.median(s)), 4), "max": round(float(s.max()), 4)})
    return out


def score_paths(scorer: Any, paths: list[Path], batch_size: int = 16,
                progress: Callable[[str], None] = _log) -> dict[str, Any]:
    """Score DICOM files/folders with a ``Scorer``; returns the ``qcnode score`` JSON document."""
    from qcnode.dicom.pixels import SkipSlice, UnreadableFile, iter_slices, read_dataset

    files = _iter_files(paths)
    series: dict[str | None, dict[str, Any]] = {}
    pending: list[tuple[dict[str, Any], Any]] = []  # (slice record, hu)

    def entry(uid: str | None) -> dict[str, Any]:
        if uid not in series:
            series[uid] = {"series_instance_uid": uid, "slices": [], "skipped": []}
        return series[uid]

    def flush() -> None:
        if not pending:
            return
        results = scorer.score_hu([hu for _, hu in pending], batch_size=batch_size)
        for (rec, _), q in zip(pending, results):
            rec.update(score=round(q.score, 4), score_low=round(q.score_low, 4), score_high=round(q.score_high, 4))
        pending.clear()

    t0 = time.time()
    n_slices = 0
    for i, f in enumerate(files):
        uid = None
        try:
            ds = read_dataset(f)
            uid = str(ds.get("SeriesInstanceUID", "")) or None
            for s in iter_slices(ds, str(f)):
                rec = {"path": str(f), "sop_instance_uid": s.sop_instance_uid, "instance_number": s.instance_number}
                if s.frame is not None:
                    rec["frame"] = s.frame
                entry(s.series_instance_uid)["slices"].append(rec)
                pending.append((rec, s.hu))
                n_slices += 1
                if len(pending) >= batch_size:
                    flush()
        except SkipSlice as exc:
            entry(uid)["skipped"].append({"path": str(f), "reason": exc.reason})
        except UnreadableFile as exc:
            entry(uid)["skipped"].append({"path": str(f), "reason": f"unreadable: {exc}"})
        except Exception as exc:  # noqa: BLE001 - one bad file never ends the run
            entry(uid)["skipped"].append({"path": str(f), "reason": f"error: {type(exc).__name__}: {exc}"})
        if (i + 1) % 100 == 0:
            progress(f"score: {i + 1}/{len(files)} files, {n_slices} slices, {time.time() - t0:.1f} s")
    flush()
    out_series = []
    for uid, e in series.items():
        e["slices"] = [r for r in e["slices"] if "score" in r]
        e["slices"].sort(key=lambda r: (r["instance_number"] is None, r["instance_number"] or 0, r.get("frame") or 0,
                                        r["path"]))
        e["summary"] = _series_summary([r["score"] for r in e["slices"]], len(e["skipped"]))
        out_series.append(e)
    out_series.sort(key=lambda e: (e["series_instance_uid"] is None, e["series_instance_uid"] or ""))
    return {"model": scorer.info, "series": out_series,
            "totals": {"files": len(files), "slices": sum(len(e["slices"]) for e in out_series),
                       "skipped": sum(len(e["skipped"]) for e in out_series),
                       "seconds": round(time.time() - t0, 2)}}


def to_csv(doc: dict[str, Any]) -> str:
    """The slices of a ``score_paths`` document as CSV, one row per scored slice."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["series_instance_uid", "path", "sop_instance_uid", "instance_number", "frame",
                "score", "score_low", "score_high", "model_version"])
    version = doc["model"].get("version", "")
    for e in doc["series"]:
        for r in e["slices"]:
            w.writerow([e["series_instance_uid"], r["path"], r["sop_instance_uid"],
                        "" if r["instance_number"] is None else r["instance_number"], r.get("frame", ""),
                        r["score"], r["score_low"], r["score_high"], version])
    return buf.getvalue()
