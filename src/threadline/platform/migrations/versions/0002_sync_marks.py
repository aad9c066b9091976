"""Chassis table that a sync writes to: a commit that waits for the disk needs a change to commit."""

import sqlalchemy as sa
from alembic import op

revision = "platform_0002"
down_revision = "platform_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the sync_marks table (one row, counting the syncs)."""
    op.create_table(
        "sync_marks",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("syncs", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    """Drop the sync_marks table."""
    op.drop_table("sync_marks")
