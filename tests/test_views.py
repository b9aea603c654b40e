"""The SQL views (migration 0002) on SQLite and PostgreSQL, and the README example queries."""
from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from qcnode.db.engine import make_engine, session_factory, upgrade
from qcnode.db.models import Base
from audit_helpers import seed_series

# The README's example queries (per dialect where date functions differ).
WORST_PROTOCOLS_THIS_MONTH = {
    "sqlite": "date('now', 'start of month')",
    "postgresql": "CAST(date_trunc('month', current_date) AS date)",
}
WORST_PROTOCOLS_SQL = """
SELECT protocol, scanner, COUNT(*) AS n_series, AVG(mean_score) AS avg_score,
       SUM(CASE WHEN verdict = 'FAIL' THEN 1 ELSE 0 END) AS n_fail
FROM v_series_qa
WHERE qa_date >= {month_start}
GROUP BY protocol, scanner
ORDER BY avg_score ASC
"""
SCANNER_NOISE_TREND_SQL = """
SELECT qa_date, protocol, n_series, avg_noise_hu, avg_ctdivol_mgy
FROM v_protocol_daily
WHERE scanner LIKE '%CT4'
ORDER BY qa_date, protocol
"""
FAILED_NOT_RESCANNED_SQL = """
SELECT f.qa_date, f.protocol, f.scanner, f.series_instance_uid, f.mean_score
FROM v_series_qa f
WHERE f.verdict = 'FAIL'
  AND NOT EXISTS (
      SELECT 1 FROM v_series_qa r
      WHERE r.protocol = f.protocol
        AND (r.study_instance_uid = f.study_instance_uid OR r.patient_key = f.patient_key)
        AND r.series_instance_uid <> f.series_instance_uid
        AND r.verdict <> 'FAIL'
        AND r.scored_at > f.scored_at)
ORDER BY f.qa_date
"""

V_SERIES_QA_COLUMNS = {
    "series_result_id", "series_id", "series_instance_uid", "study_instance_uid", "patient_key", "study_date",
    "scored_date", "qa_date", "protocol", "series_description", "body_part", "manufacturer", "model_name",
    "station_name", "device_serial", "scanner", "version", "model_version", "n_slices", "n_skipped",
    "mean_score", "min_score", "p10_score", "fraction_below", "verdict", "noise_hu", "ctdivol_mgy", "dw_cm",
    "ssde_mgy", "dlp_mgycm", "scored_at"}


@pytest.fixture
def seeded_views(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    factory = session_factory(engine)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    today = now.date()
    uids = {}
    with factory() as session, session.begin():
        # patient A: head series re-scored (v1 FAIL -> v2 PASS); chest FAIL, never re-scanned
        a = seed_series(session, protocol="HEAD ROUTINE", scored_at=now - dt.timedelta(hours=3), score=3.1,
                        versions=[(1.2, "FAIL")], noise=4.0, ctdivol=50.0, patient_key="pk-A", study_date=today)
        uids["head_a"] = a.series_instance_uid
        b = seed_series(session, protocol="CHEST LOW DOSE", scored_at=now - dt.timedelta(hours=2), score=1.0,
                        verdict="FAIL", noise=20.0, ctdivol=4.0, study=a.study)
        uids["chest_a"] = b.series_instance_uid
        # patient B: chest FAIL, then re-scanned in the same study and passed
        c = seed_series(session, protocol="CHEST LOW DOSE", scored_at=now - dt.timedelta(hours=3), score=1.1,
                        verdict="FAIL", noise=18.0, ctdivol=4.0, patient_key="pk-B", study_date=today)
        seed_series(session, protocol="CHEST LOW DOSE", scored_at=now - dt.timedelta(hours=1), score=2.9,
                    verdict="PASS", noise=12.0, ctdivol=6.0, study=c.study)
        # no protocol name, no station, on another scanner; study date unknown -> scored date
        seed_series(session, protocol=None, station=None, manufacturer="GE MEDICAL SYSTEMS",
                    model_name="HiSpeed Dual", scored_at=now - dt.timedelta(hours=1), score=2.5, verdict="WARN",
                    noise=None, ctdivol=None, ssde=None, patient_key=None, study_date=None)
    yield engine, uids, today
    engine.dispose()


def test_orm_matches_migrations(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert {"v_series_qa", "v_protocol_daily"} <= set(sa.inspect(conn).get_view_names())
    engine.dispose()


def test_v_series_qa_latest_version_and_no_patient_name(seeded_views):
    engine, uids, today = seeded_views
    with engine.connect() as conn:
        result = conn.execute(sa.text("SELECT * FROM v_series_qa ORDER BY series_result_id"))
        columns = set(result.keys())
        rows = [r._mapping for r in result]
        for view in ("v_series_qa", "v_protocol_daily"):
            cols = {c["name"] for c in sa.inspect(conn).get_columns(view)}
            assert not [c for c in cols if "patient" in c and c != "patient_key"]
    assert columns == V_SERIES_QA_COLUMNS
    assert len(rows) == 5  # one per series, the re-scored one only in its latest version
    head = next(r for r in rows if r["series_instance_uid"] == uids["head_a"])
    assert (head["version"], head["verdict"], head["mean_score"]) == (2, "PASS", 3.1)
    assert head["patient_key"] == "pk-A" and head["model_version"] == "mdiqa-test-1"
    assert head["scanner"] == "Philips Ingenuity CT CT4" and head["protocol"] == "HEAD ROUTINE"
    assert str(head["qa_date"])[:10] == today.isoformat()
    unnamed = next(r for r in rows if r["manufacturer"] == "GE MEDICAL SYSTEMS")
    assert unnamed["protocol"] == "(unnamed)" and unnamed["scanner"] == "GE MEDICAL SYSTEMS HiSpeed Dual"
    assert unnamed["study_date"] is None and str(unnamed["qa_date"])[:10] == str(unnamed["scored_date"])[:10]


def test_v_protocol_daily(seeded_views):
    engine, _uids, today = seeded_views
    with engine.connect() as conn:
        rows = {(r.protocol, r.scanner): r for r in conn.execute(sa.text("SELECT * FROM v_protocol_daily"))}
    chest = rows[("CHEST LOW DOSE", "Philips Ingenuity CT CT4")]
    assert chest.n_series == 3 and chest.n_fail == 2
    assert float(chest.fail_fraction) == pytest.approx(2 / 3)
    assert chest.avg_noise_hu == pytest.approx((20 + 18 + 12) / 3)
    assert chest.max_ctdivol_mgy == pytest.approx(6.0)
    head = rows[("HEAD ROUTINE", "Philips Ingenuity CT CT4")]
    assert head.n_series == 1 and head.n_fail == 0  # the FAIL of version 1 is superseded
    assert rows[("(unnamed)", "GE MEDICAL SYSTEMS HiSpeed Dual")].n_warn == 1


def test_readme_example_queries(seeded_views):
    engine, uids, _today = seeded_views
    month_start = WORST_PROTOCOLS_THIS_MONTH[engine.dialect.name]
    with engine.connect() as conn:
        worst = conn.execute(sa.text(WORST_PROTOCOLS_SQL.format(month_start=month_start))).all()
        trend = conn.execute(sa.text(SCANNER_NOISE_TREND_SQL)).all()
        failed = conn.execute(sa.text(FAILED_NOT_RESCANNED_SQL)).all()
    assert worst[0].protocol == "CHEST LOW DOSE" and worst[0].n_fail == 2 and len(worst) == 3
    assert {r.protocol for r in trend} == {"HEAD ROUTINE", "CHEST LOW DOSE"}
    assert [r.series_instance_uid for r in failed] == [uids["chest_a"]]
