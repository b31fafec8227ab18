"""trained model tombstones: a deleted model keeps its row, so versions only go up

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trained_models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deleted_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trained_models", schema=None) as batch_op:
        batch_op.drop_column("deleted_at")
