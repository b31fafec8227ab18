"""jobs.metered_at: the nightly sweep meters every finished job without it, however old (it looked
90 days back for a job without a usage event); jobs.working_objects_held_at: a job closed under
legal hold has its working objects removed after the release. Both behind partial indexes.

Revision ID: 0021
Revises: 0020
"""

import sqlalchemy as sa
from alembic import op

import pipelines.catalog.types

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("metered_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("working_objects_held_at", pipelines.catalog.types.UTCDateTime(timezone=True), nullable=True)
        )
    # A job with its usage event was metered when the event was recorded; those without one stay
    # unmarked and are metered by the next nightly sweep, whenever they finished.
    op.execute(
        sa.text(
            "UPDATE jobs SET metered_at = (SELECT recorded_at FROM usage_events"
            " WHERE usage_events.event_id = jobs.job_id || :suffix)"
        ).bindparams(suffix=":classification")
    )
    # Jobs the sweep closed under a legal hold before this revision said so only in their error
    # (stale-job sweep's wording): marked, so the first sweep after the release removes their objects.
    op.execute(
        sa.text(
            "UPDATE jobs SET working_objects_held_at = finished_at"
            " WHERE state IN ('failed', 'aborted') AND error LIKE :kept"
        ).bindparams(kept="%its working objects are kept: the account is on legal hold%")
    )
    unmetered = sa.text("metered_at IS NULL")
    held = sa.text("working_objects_held_at IS NOT NULL")
    op.create_index(
        "ix_jobs_unmetered", "jobs", ["finished_at"], unique=False, sqlite_where=unmetered, postgresql_where=unmetered
    )
    op.create_index(
        "ix_jobs_working_objects_held",
        "jobs",
        ["working_objects_held_at"],
        unique=False,
        sqlite_where=held,
        postgresql_where=held,
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_working_objects_held", table_name="jobs")
    op.drop_index("ix_jobs_unmetered", table_name="jobs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("working_objects_held_at")
        batch_op.drop_column("metered_at")
