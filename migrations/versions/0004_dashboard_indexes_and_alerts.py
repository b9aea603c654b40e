"""dashboard: indexes for its queries, alert acknowledgements and alert webhooks

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 08:00:00

``series(protocol_name)`` and ``series(manufacturer, model_name, station_name)`` serve the series
list's protocol and scanner filters; ``instances(kernel, series_id)`` serves the series list's kernel filter (one probe per series) and
the list of kernels (a loose index scan instead of reading every instance);
``series_results(verdict, created_at)`` the alert list (FAIL verdicts, newest first).
``alert_acks`` stores who acknowledged an alert (a FAIL verdict or an audit flag, named by
kind + id), when and why; ``alert_webhooks`` is the outbox of the optional webhook POSTs.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch_op:
        batch_op.create_index("ix_series_protocol_name", ["protocol_name"], unique=False)
        batch_op.create_index("ix_series_scanner", ["manufacturer", "model_name", "station_name"], unique=False)
    with op.batch_alter_table("instances") as batch_op:
        batch_op.create_index("ix_instances_kernel_series", ["kernel", "series_id"], unique=False)
    with op.batch_alter_table("series_results") as batch_op:
        batch_op.create_index("ix_series_results_verdict_created", ["verdict", "created_at"], unique=False)
    op.create_table(
        "alert_acks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("ref_id", sa.Integer(), nullable=False),
        sa.Column("acknowledged_by", sa.String(length=128), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "ref_id", name="uq_alert_ack"),
    )
    op.create_table(
        "alert_webhooks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("ref_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "ref_id", name="uq_alert_webhook"),
    )
    with op.batch_alter_table("alert_webhooks") as batch_op:
        batch_op.create_index("ix_alert_webhooks_status_next", ["status", "next_attempt_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("alert_webhooks") as batch_op:
        batch_op.drop_index("ix_alert_webhooks_status_next")
    op.drop_table("alert_webhooks")
    op.drop_table("alert_acks")
    with op.batch_alter_table("series_results") as batch_op:
        batch_op.drop_index("ix_series_results_verdict_created")
    with op.batch_alter_table("instances") as batch_op:
        batch_op.drop_index("ix_instances_kernel_series")
    with op.batch_alter_table("series") as batch_op:
        batch_op.drop_index("ix_series_scanner")
        batch_op.drop_index("ix_series_protocol_name")
