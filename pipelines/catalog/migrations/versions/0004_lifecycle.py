"""data lifecycle: actions, notices, delivery failures, legal holds, terminations, deletion audit

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UTC = pipelines.catalog.types.UTCDateTime


def upgrade() -> None:
    op.create_table(
        "lifecycle_actions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("effective_at", UTC(timezone=True), nullable=False),
        sa.Column("as_of", UTC(timezone=True), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("recorded_at", UTC(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("account_id", "action", "subject", name="uq_lifecycle_actions_once"),
    )
    op.create_index("ix_lifecycle_actions_account_id", "lifecycle_actions", ["account_id"])
    op.create_table(
        "lifecycle_notices",
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("sent_at", UTC(timezone=True), nullable=False),
        sa.Column("message_id", sa.String(length=255), nullable=False),
        sa.Column("recipient", sa.String(length=320), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("recorded_at", UTC(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index("ix_lifecycle_notices_account_id", "lifecycle_notices", ["account_id"])
    op.create_table(
        "lifecycle_delivery_failures",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("attempted_at", UTC(timezone=True), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("recorded_at", UTC(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_lifecycle_delivery_failures_key", "lifecycle_delivery_failures", ["key"])
    op.create_index("ix_lifecycle_delivery_failures_account_id", "lifecycle_delivery_failures", ["account_id"])
    op.create_table(
        "lifecycle_holds",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("placed_at", UTC(timezone=True), nullable=False),
        sa.Column("released_at", UTC(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_lifecycle_holds_account_id", "lifecycle_holds", ["account_id"])
    op.create_table(
        "lifecycle_terminations",
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("effective_at", UTC(timezone=True), nullable=False),
        sa.Column("requested_at", UTC(timezone=True), nullable=False),
        sa.Column("locked_at", UTC(timezone=True), nullable=True),
        sa.Column("announced_at", UTC(timezone=True), nullable=True),
        sa.Column("deletion_due_at", UTC(timezone=True), nullable=True),
        sa.Column("deleted_at", UTC(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("account_id"),
    )
    op.create_table(
        "lifecycle_deletions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("as_of", UTC(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("object_count", sa.Integer(), nullable=False),
        sa.Column("version_count", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("objects", sa.JSON(), nullable=False),
        sa.Column("local_paths", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", UTC(timezone=True), nullable=False),
        sa.Column("finished_at", UTC(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_lifecycle_deletions_account_id", "lifecycle_deletions", ["account_id"])


def downgrade() -> None:
    op.drop_index("ix_lifecycle_deletions_account_id", table_name="lifecycle_deletions")
    op.drop_table("lifecycle_deletions")
    op.drop_table("lifecycle_terminations")
    op.drop_index("ix_lifecycle_holds_account_id", table_name="lifecycle_holds")
    op.drop_table("lifecycle_holds")
    op.drop_index("ix_lifecycle_delivery_failures_account_id", table_name="lifecycle_delivery_failures")
    op.drop_index("ix_lifecycle_delivery_failures_key", table_name="lifecycle_delivery_failures")
    op.drop_table("lifecycle_delivery_failures")
    op.drop_index("ix_lifecycle_notices_account_id", table_name="lifecycle_notices")
    op.drop_table("lifecycle_notices")
    op.drop_index("ix_lifecycle_actions_account_id", table_name="lifecycle_actions")
    op.drop_table("lifecycle_actions")
