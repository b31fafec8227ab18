"""accounts files jobs usage

Revision ID: 0001
Revises:
Create Date: 2026-11-21 23:56:14.948667
"""

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("country", sa.String(length=2), nullable=False),
        sa.Column("plan", sa.String(length=32), nullable=False),
        sa.Column("billing_cycle", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.Date(), nullable=False),
        sa.Column("tax_rate", pipelines.catalog.types.ExactDecimal(length=40), nullable=False),
        sa.Column("tax_exempt", sa.Boolean(), nullable=False),
        sa.Column("last_login_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("account_id"),
    )
    op.create_table(
        "usage_events",
        sa.Column("event_id", sa.String(length=128), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("occurred_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("points", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("classifier", sa.String(length=128), nullable=True),
        sa.Column("classifier_version", sa.String(length=32), nullable=True),
        sa.Column("filename", sa.String(length=255), nullable=True),
        sa.Column("job_id", sa.String(length=128), nullable=True),
        sa.Column("recorded_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
    )
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_usage_events_account_id"), ["account_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_usage_events_occurred_at"), ["occurred_at"], unique=False)

    op.create_table(
        "files",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=1024), nullable=False),
        sa.Column("original_name", sa.String(length=255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("point_count", sa.BigInteger(), nullable=True),
        sa.Column("min_x", sa.Float(), nullable=True),
        sa.Column("min_y", sa.Float(), nullable=True),
        sa.Column("min_z", sa.Float(), nullable=True),
        sa.Column("max_x", sa.Float(), nullable=True),
        sa.Column("max_y", sa.Float(), nullable=True),
        sa.Column("max_z", sa.Float(), nullable=True),
        sa.Column("crs", sa.Text(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("report_key", sa.String(length=1024), nullable=True),
        sa.Column("created_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.account_id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("account_id", "sha256", name="uq_files_account_sha256"),
        sa.UniqueConstraint("key"),
    )
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_files_account_id"), ["account_id"], unique=False)

    op.create_table(
        "jobs",
        sa.Column("job_id", sa.String(length=128), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("file_id", sa.Integer(), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("classifier", sa.String(length=128), nullable=False),
        sa.Column("classifier_version", sa.String(length=32), nullable=True),
        sa.Column("classifier_params", sa.JSON(), nullable=True),
        sa.Column("points_processed", sa.BigInteger(), nullable=False),
        sa.Column("classified_key", sa.String(length=1024), nullable=True),
        sa.Column("export_prefix", sa.String(length=1024), nullable=True),
        sa.Column("report_key", sa.String(length=1024), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.account_id"],
        ),
        sa.ForeignKeyConstraint(
            ["file_id"],
            ["files.id"],
        ),
        sa.PrimaryKeyConstraint("job_id"),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_account_id"), ["account_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_account_id"))

    op.drop_table("jobs")
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_files_account_id"))

    op.drop_table("files")
    with op.batch_alter_table("usage_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_usage_events_occurred_at"))
        batch_op.drop_index(batch_op.f("ix_usage_events_account_id"))

    op.drop_table("usage_events")
    op.drop_table("accounts")
