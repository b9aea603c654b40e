"""audit tables and the SQL views v_series_qa, v_protocol_daily

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 17:00:00

The views are the SQL surface users query (see README, "SQL views"). They use the latest
scoring round (highest version) of every series, never expose a patient name, and expose
the patient only as ``studies.patient_key`` (pseudonymised unless the config says otherwise).
Date expressions differ between SQLite and PostgreSQL, so the view SQL is emitted per dialect.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _date_of(column: str, dialect: str) -> str:
    """SQL for the calendar date (UTC) of a timestamp column."""
    if dialect == "sqlite":
        return f"date({column})"  # stored as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC)
    return f"CAST(({column} AT TIME ZONE 'UTC') AS DATE)"


def _v_series_qa(dialect: str) -> str:
    scored_date = _date_of("r.created_at", dialect)
    return f"""
CREATE VIEW v_series_qa AS
SELECT
    r.id AS series_result_id,
    s.id AS series_id,
    s.series_instance_uid,
    st.study_instance_uid,
    st.patient_key,
    st.study_date,
    {scored_date} AS scored_date,
    COALESCE(st.study_date, {scored_date}) AS qa_date,
    COALESCE(NULLIF(TRIM(s.protocol_name), ''), '(unnamed)') AS protocol,
    s.series_description,
    s.body_part,
    s.manufacturer,
    s.model_name,
    s.station_name,
    s.device_serial,
    COALESCE(NULLIF(TRIM(COALESCE(s.manufacturer, '') || ' ' || COALESCE(s.model_name, '') || ' '
                         || COALESCE(s.station_name, '')), ''), '(unknown)') AS scanner,
    r.version,
    r.model_version,
    r.n_slices,
    r.n_skipped,
    r.mean_score,
    r.min_score,
    r.p10_score,
    r.fraction_below,
    r.verdict,
    r.noise_hu,
    r.ctdivol_mgy,
    r.dw_cm,
    r.ssde_mgy,
    r.dlp_mgycm,
    r.created_at AS scored_at
FROM series_results r
JOIN series s ON s.id = r.series_id
JOIN studies st ON st.id = s.study_id
WHERE r.version = (SELECT MAX(r2.version) FROM series_results r2 WHERE r2.series_id = r.series_id)
"""


V_PROTOCOL_DAILY = """
CREATE VIEW v_protocol_daily AS
SELECT
    qa_date,
    protocol,
    scanner,
    COUNT(*) AS n_series,
    AVG(mean_score) AS avg_score,
    MIN(min_score) AS min_score,
    AVG(noise_hu) AS avg_noise_hu,
    AVG(ctdivol_mgy) AS avg_ctdivol_mgy,
    MAX(ctdivol_mgy) AS max_ctdivol_mgy,
    AVG(ssde_mgy) AS avg_ssde_mgy,
    SUM(CASE WHEN verdict = 'FAIL' THEN 1 ELSE 0 END) AS n_fail,
    SUM(CASE WHEN verdict = 'WARN' THEN 1 ELSE 0 END) AS n_warn,
    1.0 * SUM(CASE WHEN verdict = 'FAIL' THEN 1 ELSE 0 END) / COUNT(*) AS fail_fraction
FROM v_series_qa
GROUP BY qa_date, protocol, scanner
"""


def upgrade() -> None:
    op.create_table(
        "audit_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("since", sa.Date(), nullable=False),
        sa.Column("until", sa.Date(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("n_series", sa.Integer(), nullable=False),
        sa.Column("n_groups", sa.Integer(), nullable=False),
        sa.Column("n_flags", sa.Integer(), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("report_path", sa.String(length=512), nullable=True),
        sa.Column("csv_path", sa.String(length=512), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_runs_until"), ["until"], unique=False)

    op.create_table(
        "audit_protocol_stats",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("protocol", sa.String(length=128), nullable=False),
        sa.Column("scanner", sa.String(length=256), nullable=False),
        sa.Column("n_series", sa.Integer(), nullable=False),
        sa.Column("n_fail", sa.Integer(), nullable=False),
        sa.Column("fail_fraction", sa.Float(), nullable=False),
        *[sa.Column(f"{m}_{s}", sa.Float(), nullable=True)
          for m in ("score", "noise", "ctdivol", "ssde") for s in ("median", "q1", "q3")],
        sa.Column("baseline_n", sa.Integer(), nullable=False),
        sa.Column("baseline_score_median", sa.Float(), nullable=True),
        sa.Column("baseline_noise_median", sa.Float(), nullable=True),
        sa.Column("reference_ctdivol_mgy", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["audit_runs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_protocol_stats", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_protocol_stats_run_id"), ["run_id"], unique=False)

    op.create_table(
        "audit_flags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("protocol", sa.String(length=128), nullable=False),
        sa.Column("scanner", sa.String(length=256), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("reference", sa.Float(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["audit_runs.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_flags", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_flags_run_id"), ["run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_flags_kind"), ["kind"], unique=False)

    dialect = op.get_bind().dialect.name
    op.execute(_v_series_qa(dialect))
    op.execute(V_PROTOCOL_DAILY)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS v_protocol_daily")
    op.execute("DROP VIEW IF EXISTS v_series_qa")
    with op.batch_alter_table("audit_flags", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_flags_kind"))
        batch_op.drop_index(batch_op.f("ix_audit_flags_run_id"))
    op.drop_table("audit_flags")
    with op.batch_alter_table("audit_protocol_stats", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_protocol_stats_run_id"))
    op.drop_table("audit_protocol_stats")
    with op.batch_alter_table("audit_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_runs_until"))
    op.drop_table("audit_runs")
