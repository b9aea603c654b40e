"""Dose-protocol audit over a seeded database: flags, stored rows, HTML report, CSV, CLI, scheduler."""
from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import re

import numpy as np
import pytest
import sqlalchemy as sa

from qcnode.cli import audit as audit_commands
from qcnode.audit.flags import CTDIVOL_ABOVE_REFERENCE, NOISE_DRIFT, SCORE_DRIFT
from qcnode.audit.run import NIGHTLY_JOB_ID, nightly_window, run_audit, schedule
from qcnode.config import Config, ReferenceLevel
from qcnode.db.audit_models import AuditFlag, AuditProtocolStat, AuditRun
from qcnode.db.engine import make_engine, session_factory, upgrade
from audit_helpers import seed_series

UNTIL = dt.date(2026, 3, 31)
SINCE = dt.date(2026, 3, 25)


def _at(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(12, 0), tzinfo=dt.timezone.utc)


def _cfg(tmp_path) -> Config:
    cfg = Config(base_dir=tmp_path)
    cfg.audit.reference_levels = [ReferenceLevel("head routine", 75.0), ReferenceLevel("CHEST LOW DOSE", 10.0),
                                  ReferenceLevel("ABDOMEN", 15.0)]
    return cfg


# protocol, scanner station, (baseline ctdivol, noise, score), (window ctdivol, noise, score)
GROUPS = [
    ("HEAD ROUTINE", "CT4", (50.0, 4.0, 3.2), (100.0, 4.0, 3.2)),   # CTDIvol doubled -> above 75 mGy
    ("HEAD ROUTINE", "CT7", (50.0, 4.0, 3.1), (50.0, 4.1, 3.1)),    # same protocol, other scanner: stable
    ("CHEST LOW DOSE", "CT4", (5.0, 10.0, 2.8), (5.0, 15.0, 2.7)),  # noise +50% -> drift
    ("ABDOMEN", "CT7", (12.0, 9.0, 3.0), (12.2, 9.2, 3.0)),         # stable
]


def _seed(factory) -> None:
    rng = np.random.default_rng(7)
    with factory() as session, session.begin():
        for protocol, station, base, window in GROUPS:
            for days_back in range(1, 29, 2):  # baseline: 14 series in the 30 days before SINCE
                ct, noise, score = base
                day = SINCE - dt.timedelta(days=days_back)
                seed_series(session, protocol=protocol, station=station, scored_at=_at(day),
                            score=score + rng.normal(0, 0.05), noise=noise * (1 + rng.normal(0, 0.02)),
                            ctdivol=ct * (1 + rng.normal(0, 0.02)), ssde=ct * 1.2)
            for i in range(6):  # audited range
                ct, noise, score = window
                day = SINCE + dt.timedelta(days=i)
                verdict = "FAIL" if (protocol == "CHEST LOW DOSE" and i < 2) else "PASS"
                seed_series(session, protocol=protocol, station=station, scored_at=_at(day),
                            score=score + rng.normal(0, 0.05), verdict=verdict,
                            noise=noise * (1 + rng.normal(0, 0.02)), ctdivol=ct * (1 + rng.normal(0, 0.02)),
                            ssde=ct * 1.2 * (1 + rng.normal(0, 0.05)))
        # outside every window: must not count
        seed_series(session, protocol="ABDOMEN", station="CT7", scored_at=_at(UNTIL + dt.timedelta(days=3)),
                    score=0.5, verdict="FAIL", ctdivol=500.0)


@pytest.fixture
def seeded(db_url, tmp_path):
    upgrade(db_url)
    engine = make_engine(db_url)
    factory = session_factory(engine)
    _seed(factory)
    yield factory
    engine.dispose()


def test_audit_flags_doubled_ctdivol_and_noise_drift_only(seeded, tmp_path):
    cfg = _cfg(tmp_path)
    result = run_audit(cfg, seeded, since=SINCE, until=UNTIL, out_dir=tmp_path / "out")
    assert result.status == "ok"
    assert result.n_series == 24
    flagged = {(f.protocol, f.scanner.split()[-1], f.kind) for f in result.flags}
    assert flagged == {("HEAD ROUTINE", "CT4", CTDIVOL_ABOVE_REFERENCE), ("CHEST LOW DOSE", "CT4", NOISE_DRIFT)}

    by_key = {(g.protocol, g.scanner.split()[-1]): g for g in result.stats}
    assert set(by_key) == {("HEAD ROUTINE", "CT4"), ("HEAD ROUTINE", "CT7"), ("CHEST LOW DOSE", "CT4"),
                           ("ABDOMEN", "CT7")}
    head = by_key[("HEAD ROUTINE", "CT4")]
    assert head.n_series == 6 and head.metrics["ctdivol"].median == pytest.approx(100.0, rel=0.05)
    assert head.metrics["ctdivol"].q1 <= head.metrics["ctdivol"].median <= head.metrics["ctdivol"].q3
    chest = by_key[("CHEST LOW DOSE", "CT4")]
    assert chest.fail_fraction == pytest.approx(2 / 6)
    assert chest.metrics["noise"].median == pytest.approx(15.0, rel=0.05)

    with seeded() as session:
        run = session.get(AuditRun, result.run_id)
        assert (run.status, run.n_series, run.n_groups, run.n_flags) == ("ok", 24, 4, 2)
        stats = session.scalars(sa.select(AuditProtocolStat).where(AuditProtocolStat.run_id == run.id)).all()
        assert len(stats) == 4
        chest_row = next(s for s in stats if s.protocol == "CHEST LOW DOSE")
        assert chest_row.baseline_n == 14
        assert chest_row.baseline_noise_median == pytest.approx(10.0, rel=0.05)
        assert chest_row.reference_ctdivol_mgy == 10.0
        kinds = session.scalars(sa.select(AuditFlag.kind).where(AuditFlag.run_id == run.id)).all()
        assert sorted(kinds) == sorted([CTDIVOL_ABOVE_REFERENCE, NOISE_DRIFT])

    # report with the two plots embedded as real PNGs, CSV with one row per group
    html = result.report_path.read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(images) == 2
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    assert "Quality vs SSDE" in html and "trends" in html.lower() and "HEAD ROUTINE" in html
    with result.csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {"ctdivol_median", "ssde_q3", "fail_fraction"} <= set(rows[0])
    with result.flags_csv_path.open() as fh:
        assert len(list(csv.DictReader(fh))) == 2


def test_score_drift_and_thresholds_from_config(seeded, tmp_path):
    cfg = _cfg(tmp_path)
    cfg.audit.noise_drift_fraction = 0.6   # the +50 % noise is now within limits
    cfg.audit.score_drift = 0.05           # ... but a tight score limit catches the chest score drop (-0.1)
    cfg.audit.reference_levels = []        # no reference -> no CTDIvol flag
    result = run_audit(cfg, seeded, since=SINCE, until=UNTIL, out_dir=tmp_path / "out")
    kinds = {(f.protocol, f.kind) for f in result.flags}
    assert ("CHEST LOW DOSE", SCORE_DRIFT) in kinds
    assert all(k != NOISE_DRIFT and k != CTDIVOL_ABOVE_REFERENCE for _, k in kinds)


def test_no_new_data_run_says_so(seeded, tmp_path):
    cfg = _cfg(tmp_path)
    empty_day = dt.date(2025, 1, 1)
    result = run_audit(cfg, seeded, since=empty_day, until=empty_day, out_dir=tmp_path / "out")
    assert result.status == "no_data" and result.n_series == 0 and not result.flags
    assert "no new data" in result.message
    assert "no new data" in result.report_path.read_text()
    with seeded() as session:
        run = session.get(AuditRun, result.run_id)
        assert run.status == "no_data" and "no new data" in run.message


def test_nightly_window_and_schedule(tmp_path):
    from apscheduler.schedulers.background import BackgroundScheduler

    url = f"sqlite:///{tmp_path / 'n.db'}"
    upgrade(url)
    engine = make_engine(url)
    factory = session_factory(engine)
    cfg = _cfg(tmp_path)
    today = dt.date(2026, 4, 10)
    with factory() as session:
        assert nightly_window(session, today) == (dt.date(2026, 4, 9), dt.date(2026, 4, 9))
    with factory() as session, session.begin():
        session.add(AuditRun(trigger="nightly", since=dt.date(2026, 4, 5), until=dt.date(2026, 4, 6), status="ok"))
    with factory() as session:
        assert nightly_window(session, today) == (dt.date(2026, 4, 7), dt.date(2026, 4, 9))
        assert nightly_window(session, dt.date(2026, 4, 7)) is None

    scheduler = BackgroundScheduler(timezone="UTC")
    cfg.audit.time_of_day = "03:45"
    job = schedule(cfg, scheduler, factory)
    assert job.id == NIGHTLY_JOB_ID
    fields = {f.name: str(f) for f in job.trigger.fields}
    assert (fields["hour"], fields["minute"]) == ("3", "45")
    cfg.audit.enabled = False
    assert schedule(cfg, BackgroundScheduler(timezone="UTC"), factory) is None
    engine.dispose()


def test_audit_command(tmp_path, capsys):
    db = tmp_path / "cli.db"
    cfg_file = tmp_path / "qcnode.toml"
    cfg_file.write_text(f'[storage]\ndatabase_url = "sqlite:///{db}"\n'
                        '[audit]\nout_dir = "reports"\n'
                        '[[audit.reference_levels]]\nprotocol = "HEAD ROUTINE"\nctdivol_mgy = 75.0\n')
    upgrade(f"sqlite:///{db}")
    engine = make_engine(f"sqlite:///{db}")
    _seed(session_factory(engine))
    engine.dispose()
    parser = argparse.ArgumentParser()
    audit_commands.register(parser.add_subparsers())
    args = parser.parse_args(["audit", "--config", str(cfg_file), "--since", str(SINCE), "--until", str(UNTIL)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "[audit] reading series" in out
    assert re.search(r"audit run \d+ 2026-03-25\.\.2026-03-31: ok; 24 series, 4 groups, 2 flags", out)
    assert "ctdivol_above_reference: 1" in out and "noise_drift: 1" in out
    report = next((tmp_path / "reports").glob("audit-*/report.html"))
    assert str(report) in out
    bad = parser.parse_args(["audit", "--config", str(cfg_file), "--since", "2026-04-02", "--until", "2026-04-01"])
    assert bad.func(bad) == 2
