"""One colour per protocol across every chart: a stable hash of the name picks from a palette,
so a protocol keeps its colour across pages, filters, processes and restarts."""
from __future__ import annotations

import hashlib

# 20 distinguishable colours (Plotly's D3 + Dark24 picks), none close to the verdict red
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#2e91e5", "#e15f99", "#1ca71c", "#fb0d0d", "#da16ff", "#b68100", "#750d86",
           "#eb663b", "#511cfb", "#00a08b", "#fc0080")


def protocol_colour(protocol: str) -> str:
    """The colour of ``protocol`` (case-insensitive, surrounding spaces ignored)."""
    digest = hashlib.sha1(protocol.strip().lower().encode()).digest()
    return PALETTE[int.from_bytes(digest[:4], "big") % len(PALETTE)]
