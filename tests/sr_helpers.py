"""Inputs for ``qcnode.report.sr.build_series_sr`` made from real CT headers, and the validators
(dciodvfy, PixelMed) every SR and KOS the tests write goes through (tests only)."""
from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from qcnode.scoring.types import ModelIdentity, SeriesPhysics, SeriesSummary, SliceResult

MODEL_INFO = {"name": "mdiqa-test", "version": "0.1.0"}  # as read_series_sr returns it
MODEL = ModelIdentity(**MODEL_INFO)
WHEN = dt.datetime(2024, 5, 1, 12, 30, 15, tzinfo=dt.timezone.utc)


def read_headers(folder: Path, limit: int | None = None) -> list[Dataset]:
    """Pixel-free headers of the .dcm files in ``folder`` (sorted by name)."""
    files = sorted(folder.glob("*.dcm"))[:limit]
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def slice_scores(headers: list[Dataset]) -> list[SliceResult]:
    """Distinct, checkable scores per slice: score = 1 + 0.1*i, interval [score-0.3, score+0.45]."""
    out = []
    for i, h in enumerate(headers):
        score = round(1.0 + 0.1 * i, 4)
        out.append(SliceResult(sop_instance_uid=str(h.SOPInstanceUID), score=score,
                               score_low=round(score - 0.3, 4), score_high=round(score + 0.45, 4)))
    return out


PHYSICS = {"noise_hu": 6.25, "dw_cm": 17.5, "ssde_mgy": 61.2, "ctdivol_mgy": 50.4}


def summary_for(slices: list[SliceResult], verdict: str = "WARN", n_skipped: int = 1,
                physics: bool = True) -> SeriesSummary:
    """A series summary as the worker builds it (with the series physics unless ``physics`` is off)."""
    scores = sorted(s.score for s in slices)
    return SeriesSummary(mean_score=round(sum(scores) / len(scores), 4), min_score=scores[0],
                         p10_score=scores[max(0, int(0.1 * len(scores)) - 1)],
                         fraction_below=round(sum(s < 2.0 for s in scores) / len(scores), 4),
                         verdict=verdict, n_slices=len(scores), n_skipped=n_skipped,
                         physics=SeriesPhysics(**PHYSICS) if physics else SeriesPhysics())


DCIODVFY = "/usr/bin/dciodvfy"
PIXELMED_JAR = "/usr/share/java/pixelmed.jar"
# PixelMed's XSLT rules exceed the JDK's default XPath limits (Debian's DicomSRValidator script fails)
PIXELMED_JAVA_OPTS = ("-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
                      "-Djdk.xml.xpathTotalOpLimit=0")
VALIDATION_RUNS: list[tuple[str, int, int]] = []  # (file name, errors, warnings) of every dciodvfy run


def dciodvfy(path: Path) -> list[str]:
    """Run dciodvfy (dicom3tools) on ``path``, assert it reports no error; return its warnings.

    Skips the test when dicom3tools is not installed (``scripts/setup.sh --test`` installs it)."""
    if not Path(DCIODVFY).exists():
        pytest.skip("dicom3tools (dciodvfy) not installed")
    res = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    lines = (res.stdout + res.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    VALIDATION_RUNS.append((Path(path).name, len(errors), len(warnings)))
    assert not errors, "dciodvfy errors:\n" + "\n".join(errors)
    return warnings


def pixelmed_sr_validator(path: Path) -> list[str]:
    """Run PixelMed's DicomSRValidator (Debian pixelmed-apps) on ``path``, assert no error; return
    its warnings. Skips when Java or the jar is missing."""
    java = shutil.which("java")
    if java is None or not Path(PIXELMED_JAR).exists():
        pytest.skip("PixelMed (pixelmed-apps) or java not installed")
    res = subprocess.run([java, *PIXELMED_JAVA_OPTS, "-cp", PIXELMED_JAR,
                          "com.pixelmed.validate.DicomSRValidator", str(path)],
                         capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert "IOD validation complete" in out, out[-2000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("Error")]
    assert not errors, "PixelMed errors:\n" + "\n".join(errors[:20])
    return [ln for ln in out.splitlines() if ln.startswith("Warning")]


def write_validated(ds: Dataset, path: Path) -> Path:
    """Write an SR or KOS as qcnode stores it and check it with dciodvfy (0 errors)."""
    from qcnode.report.sr import write_sr
    write_sr(ds, path)
    dciodvfy(path)
    return path
