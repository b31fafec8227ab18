"""trained models

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 00:50:51.221587
"""

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trained_models",
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("account_id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=1024), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("evaluation", sa.JSON(), nullable=False),
        sa.Column("training_files", sa.JSON(), nullable=False),
        sa.Column("created_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.account_id"],
        ),
        sa.PrimaryKeyConstraint("model_id"),
        sa.UniqueConstraint("account_id", "version", name="uq_trained_models_account_version"),
    )
    with op.batch_alter_table("trained_models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_trained_models_account_id"), ["account_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("trained_models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_trained_models_account_id"))

    op.drop_table("trained_models")
