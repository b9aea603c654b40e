"""job interruptions counted apart from attempts; failed series retried later

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00

``jobs.interruptions`` counts the times a job's lease expired while it ran (its process died):
they no longer use up ``worker.max_attempts``. A series whose job gave up gets ``status = 'failed'``,
``series.failures + 1`` and is queued again at ``series.retry_at`` (or by ``qcnode rescore``).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("interruptions", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("series") as batch_op:
        batch_op.add_column(sa.Column("failures", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True))
    # series whose job gave up before this revision: make them visible and retried like new ones
    op.execute("UPDATE series SET status = 'failed', failures = 1 WHERE status = 'stable' AND EXISTS "
               "(SELECT 1 FROM jobs WHERE jobs.series_id = series.id AND jobs.series_version = series.version "
               "AND jobs.status = 'failed')")


def downgrade() -> None:
    op.execute("UPDATE series SET status = 'stable' WHERE status = 'failed'")
    with op.batch_alter_table("series") as batch_op:
        batch_op.drop_column("retry_at")
        batch_op.drop_column("failures")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("interruptions")
