"""Audit report: one self-contained HTML file (matplotlib PNGs embedded as base64) plus CSV.

Plots: quality score vs SSDE (one colour per protocol x scanner) over the audited range,
and per-group trends of the daily median score, noise and CTDIvol over baseline + range.
"""
from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
from pathlib import Path

from qcnode.audit.flags import Flag
from qcnode.audit.stats import METRICS, GroupStats, SeriesRow, daily_medians, group_rows

MAX_TREND_GROUPS = 12  # the most frequent groups get a trend line; the CSV has all
STAT_COLUMNS = ["protocol", "scanner", "n_series", "n_fail", "fail_fraction"] + [
    f"{m}_{s}" for m in METRICS for s in ("median", "q1", "q3")] + [
    "baseline_n", "baseline_score_median", "baseline_noise_median", "reference_ctdivol_mgy"]
FLAG_COLUMNS = ["protocol", "scanner", "kind", "value", "reference", "message"]


def stat_record(g: GroupStats, baseline: GroupStats | None, reference: float | None) -> dict:
    """One flat row (CSV / audit_protocol_stats) for a group."""
    rec = {"protocol": g.protocol, "scanner": g.scanner, "n_series": g.n_series, "n_fail": g.n_fail,
           "fail_fraction": g.fail_fraction}
    for m in METRICS:
        q = g.metrics[m]
        rec.update({f"{m}_median": q.median, f"{m}_q1": q.q1, f"{m}_q3": q.q3})
    rec["baseline_n"] = baseline.n_series if baseline else 0
    rec["baseline_score_median"] = baseline.metrics["score"].median if baseline else None
    rec["baseline_noise_median"] = baseline.metrics["noise"].median if baseline else None
    rec["reference_ctdivol_mgy"] = reference
    return rec


def write_csv(path: Path, records: list[dict], columns: list[str]) -> Path:
    """Write ``records`` as CSV (floats with 4 decimals, None as empty)."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for rec in records:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v))
                             for k, v in ((c, rec.get(c)) for c in columns)})
    return path


def _png(fig) -> str:  # noqa: ANN001
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _label(key: tuple[str, str]) -> str:
    return f"{key[0]} @ {key[1]}"


def scatter_png(rows: list[SeriesRow]) -> str:
    """Base64 PNG: series mean quality score vs SSDE, one colour per protocol x scanner."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for key, members in group_rows(rows).items():
        pts = [(r.ssde, r.score) for r in members if r.ssde is not None and r.score is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=14, alpha=0.75, label=_label(key)[:60])
    ax.set_xlabel("SSDE (mGy)")
    ax.set_ylabel("series mean quality score (0-4)")
    ax.set_title("Quality vs size-specific dose")
    ax.set_ylim(0, 4)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no series with both SSDE and score", ha="center", transform=ax.transAxes)
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def trend_png(rows: list[SeriesRow], since: dt.date) -> str:
    """Base64 PNG: daily median score, noise and CTDIvol per group; the audited range shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = {k: len(v) for k, v in group_rows(rows).items()}
    keep = sorted(counts, key=lambda k: -counts[k])[:MAX_TREND_GROUPS]
    daily = daily_medians(rows)
    fig, axes = plt.subplots(3, 1, figsize=(8.5, 8), sharex=True)
    titles = {"score": "median quality score", "noise": "median noise (HU)", "ctdivol": "median CTDIvol (mGy)"}
    for ax, metric in zip(axes, ("score", "noise", "ctdivol")):
        for key in keep:
            pts = [(day, vals[metric]) for day, vals in daily.get(key, []) if vals[metric] is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=3, lw=1, label=_label(key)[:60])
        ax.axvspan(since, max((r.scored_date for r in rows), default=since) + dt.timedelta(days=1),
                   color="orange", alpha=0.08)
        ax.set_ylabel(titles[metric], fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_title("Per-protocol trends (shaded: audited range)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=6, loc="best")
    fig.autofmt_xdate()
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return html.escape(str(v))


def write_html(path: Path, *, since: dt.date, until: dt.date, run_id: int, records: list[dict],
               flags: list[Flag], rows: list[SeriesRow], trend_rows: list[SeriesRow],
               message: str | None = None) -> Path:
    """Write the self-contained HTML report (a 'no data' page when ``rows`` is empty)."""
    esc = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>qcnode audit {since} to {until}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #bbb;padding:3px 6px;text-align:right}th{background:#eee}"
             "td.t{text-align:left}.flag{color:#a00}</style></head><body>",
             f"<h1>Dose-protocol audit {since} &ndash; {until}</h1>",
             f"<p>Run {run_id}; generated {esc(dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}; "
             f"{len(rows)} scored series in {len(records)} protocol x scanner groups; {len(flags)} flags.</p>"]
    if message:
        parts.append(f"<p><b>{esc(message)}</b></p>")
    if rows:
        parts.append("<h2>Flags</h2>")
        if flags:
            parts.append("<ul>" + "".join(
                f"<li class='flag'><b>{esc(f.kind)}</b> {esc(f.protocol)} @ {esc(f.scanner)}: {esc(f.message)}</li>"
                for f in flags) + "</ul>")
        else:
            parts.append("<p>No protocol flagged.</p>")
        parts.append("<h2>Per protocol x scanner</h2><table><tr>" +
                     "".join(f"<th>{esc(c)}</th>" for c in STAT_COLUMNS) + "</tr>")
        for rec in records:
            parts.append("<tr>" + "".join(
                f"<td class='t'>{_fmt(rec[c])}</td>" if c in ("protocol", "scanner") else f"<td>{_fmt(rec[c])}</td>"
                for c in STAT_COLUMNS) + "</tr>")
        parts.append("</table>")
        parts.append("<h2>Quality vs SSDE</h2>"
                     f"<img alt='quality vs SSDE' src='data:image/png;base64,{scatter_png(rows)}'>")
        parts.append("<h2>Trends</h2>"
                     f"<img alt='per-protocol trends' src='data:image/png;base64,{trend_png(trend_rows, since)}'>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
