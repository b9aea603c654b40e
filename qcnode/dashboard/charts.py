"""Plotly figures (as plain JSON dicts) of the dashboard's charts, built on the server from the
query results; the page draws them with the Plotly.js of the installed ``plotly`` wheel."""
from __future__ import annotations

from typing import Any

from qcnode.dashboard.palette import protocol_colour

METRIC_TITLES = {"score": "quality score (0-4)", "noise": "noise (HU)", "ctdivol": "CTDIvol (mGy)",
                 "ssde": "SSDE (mGy)"}
VERDICT_COLOURS = {"PASS": "#2ca02c", "WARN": "#ff9f1c", "FAIL": "#d62728"}


def _layout(title: str, x: str, y: str, **extra: Any) -> dict[str, Any]:
    return {"title": {"text": title, "font": {"size": 14}}, "xaxis": {"title": {"text": x}, "automargin": True},
            "yaxis": {"title": {"text": y}, "automargin": True}, "margin": {"l": 60, "r": 20, "t": 40, "b": 50},
            "height": 340, "legend": {"orientation": "h", "y": -0.25}, **extra}


def strip_chart(slices: list[dict[str, Any]], protocol: str, x_title: str) -> dict[str, Any]:
    """Per-slice score along the slice position with its 5-95 % band."""
    x = [s["position"] for s in slices]
    colour = protocol_colour(protocol)
    return {"data": [
        {"type": "scatter", "mode": "lines", "x": x, "y": [s["score_high"] for s in slices], "name": "95th percentile",
         "line": {"width": 0, "color": colour}, "hoverinfo": "skip", "showlegend": False},
        {"type": "scatter", "mode": "lines", "x": x, "y": [s["score_low"] for s in slices], "name": "5-95 % interval",
         "fill": "tonexty", "fillcolor": "rgba(120,120,120,0.25)", "line": {"width": 0, "color": colour}},
        {"type": "scatter", "mode": "lines+markers", "x": x, "y": [s["score"] for s in slices], "name": "score",
         "line": {"color": colour}, "marker": {"size": 5},
         "customdata": [s["instance_number"] for s in slices],
         "hovertemplate": "position %{x}<br>score %{y:.2f}<br>instance %{customdata}<extra></extra>"},
    ], "layout": _layout("Score per slice (5-95 % band)", x_title, "score", yaxis={"range": [0, 4],
                                                                                  "title": {"text": "score"}})}


def box_chart(groups: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Box plot (precomputed quartiles and fences) of ``metric`` per protocol x scanner: one trace per
    protocol in its colour, scanners along x."""
    by_protocol: dict[str, list[dict[str, Any]]] = {}
    for g in groups:
        if g["box"].get(metric):
            by_protocol.setdefault(g["protocol"], []).append(g)
    data = []
    for protocol, members in by_protocol.items():
        stats = [g["box"][metric] for g in members]
        data.append({"type": "box", "name": protocol, "x": [g["scanner"] for g in members],
                     **{k: [s[k] for s in stats] for k in ("q1", "median", "q3", "lowerfence", "upperfence")},
                     "marker": {"color": protocol_colour(protocol)}, "line": {"color": protocol_colour(protocol)},
                     "customdata": [s["n"] for s in stats], "hovertemplate": "%{x}<br>n=%{customdata}<extra>"
                     + protocol.replace("<", "&lt;") + "</extra>"})
    return {"data": data, "layout": _layout(f"{METRIC_TITLES[metric]} per protocol x scanner", "scanner",
                                            METRIC_TITLES[metric], boxmode="group")}


def trend_chart(trends: list[dict[str, Any]], metric: str, since: str, until: str) -> dict[str, Any]:
    """Daily medians of ``metric`` per protocol x scanner, each with the latest audit's baseline
    band (the range the drift flag allows) as a shaded area in the protocol's colour."""
    data = []
    for t in trends:
        days = [d for d in t["days"] if d.get(metric) is not None]
        if not days:
            continue
        colour = protocol_colour(t["protocol"])
        label = f"{t['protocol']} | {t['scanner']}"
        band = (t.get("baseline") or {}).get(metric)
        x = [d["date"] for d in days]
        if band:
            ends = [since, until]
            data.append({"type": "scatter", "mode": "lines", "x": ends, "y": [band["high"]] * 2, "showlegend": False,
                         "line": {"width": 0, "color": colour}, "hoverinfo": "skip", "name": label + " baseline high"})
            data.append({"type": "scatter", "mode": "lines", "x": ends, "y": [band["low"]] * 2, "fill": "tonexty",
                         "fillcolor": _rgba(colour, 0.15), "line": {"width": 1, "dash": "dot", "color": colour},
                         "name": label + " baseline band", "hoverinfo": "skip", "legendgroup": label})
        data.append({"type": "scatter", "mode": "lines+markers", "x": x, "y": [d[metric] for d in days],
                     "name": label, "legendgroup": label, "line": {"color": colour}})
    layout = _layout(f"Daily median {METRIC_TITLES[metric]} vs audit baseline", "date", METRIC_TITLES[metric])
    layout["xaxis"].update(type="date", range=[since, until], tickformat="%Y-%m-%d")
    return {"data": data, "layout": layout}


def scatter_chart(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Score vs SSDE, one trace per protocol; each point's customdata is its series id (a click opens it)."""
    by_protocol: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_protocol.setdefault(p["protocol"], []).append(p)
    data = [{"type": "scatter", "mode": "markers", "name": protocol, "x": [p["ssde_mgy"] for p in pts],
             "y": [p["score"] for p in pts], "customdata": [p["series_id"] for p in pts],
             "text": [p["scanner"] for p in pts], "marker": {"color": protocol_colour(protocol), "size": 6,
                                                             "opacity": 0.75},
             "hovertemplate": "SSDE %{x:.1f} mGy<br>score %{y:.2f}<br>%{text}<br>series %{customdata}<extra>"
             + protocol.replace("<", "&lt;") + "</extra>"}
            for protocol, pts in sorted(by_protocol.items())]
    return {"data": data, "layout": _layout("Score vs SSDE (click a point to open its series)", "SSDE (mGy)",
                                            "score", yaxis={"range": [0, 4], "title": {"text": "score"}})}


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"
