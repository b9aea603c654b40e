"""Audit flags: CTDIvol above the protocol's reference level, and noise/score drift from the
protocol's own trailing baseline.

Rules (per protocol x scanner group of the audited range):
- ``ctdivol_above_reference``: median CTDIvol > the reference level of the protocol
  (``[[audit.reference_levels]]``, protocol name matched case-insensitively, surrounding
  spaces ignored), else ``audit.default_reference_ctdivol_mgy`` when > 0; no level = no flag.
- ``noise_drift``: |median noise - baseline median noise| > noise_drift_fraction x baseline.
- ``score_drift``: |median score - baseline median score| > score_drift (score units).
The baseline is the same group's series in the ``baseline_days`` before the range; drift is
judged only when the baseline has at least ``baseline_min_series`` series.
"""
from __future__ import annotations

from dataclasses import dataclass

from qcnode.audit.stats import GroupStats
from qcnode.config import AuditConfig

CTDIVOL_ABOVE_REFERENCE = "ctdivol_above_reference"
NOISE_DRIFT = "noise_drift"
SCORE_DRIFT = "score_drift"


@dataclass(frozen=True)
class Flag:
    protocol: str
    scanner: str
    kind: str
    value: float | None
    reference: float | None
    message: str


def reference_level(audit: AuditConfig, protocol: str) -> float | None:
    """The CTDIvol reference level (mGy) for ``protocol``, or None when none is configured."""
    wanted = protocol.strip().casefold()
    for level in audit.reference_levels:
        if level.protocol.strip().casefold() == wanted and level.ctdivol_mgy > 0:
            return float(level.ctdivol_mgy)
    return float(audit.default_reference_ctdivol_mgy) if audit.default_reference_ctdivol_mgy > 0 else None


def reference_flags(stats: list[GroupStats], audit: AuditConfig) -> list[Flag]:
    """Groups whose median CTDIvol exceeds their reference level."""
    flags = []
    for g in stats:
        ref = reference_level(audit, g.protocol)
        med = g.metrics["ctdivol"].median
        if ref is not None and med is not None and med > ref:
            flags.append(Flag(g.protocol, g.scanner, CTDIVOL_ABOVE_REFERENCE, med, ref,
                              f"median CTDIvol {med:.1f} mGy exceeds the reference level {ref:.1f} mGy "
                              f"({med / ref:.2f}x) over {g.n_series} series"))
    return flags


def drift_flags(stats: list[GroupStats], baseline: dict[tuple[str, str], GroupStats],
                audit: AuditConfig) -> list[Flag]:
    """Groups whose median noise or score moved from their own trailing baseline."""
    flags = []
    for g in stats:
        base = baseline.get(g.key)
        if base is None or base.n_series < audit.baseline_min_series:
            continue
        noise, base_noise = g.metrics["noise"].median, base.metrics["noise"].median
        if noise is not None and base_noise is not None and base_noise > 0:
            change = (noise - base_noise) / base_noise
            if abs(change) > audit.noise_drift_fraction:
                flags.append(Flag(g.protocol, g.scanner, NOISE_DRIFT, noise, base_noise,
                                  f"median noise {noise:.1f} HU vs baseline {base_noise:.1f} HU "
                                  f"({change:+.0%}; limit {audit.noise_drift_fraction:.0%}, "
                                  f"baseline {base.n_series} series over {audit.baseline_days} days)"))
        score, base_score = g.metrics["score"].median, base.metrics["score"].median
        if score is not None and base_score is not None and abs(score - base_score) > audit.score_drift:
            flags.append(Flag(g.protocol, g.scanner, SCORE_DRIFT, score, base_score,
                              f"median score {score:.2f} vs baseline {base_score:.2f} "
                              f"({score - base_score:+.2f}; limit {audit.score_drift:.2f})"))
    return flags
