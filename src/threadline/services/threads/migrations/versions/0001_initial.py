"""threads: the reply trees (post ids, parents, roots; tombstones for deleted posts)."""

import sqlalchemy as sa
from alembic import op

revision = "threads_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the thread_nodes table, indexed by conversation."""
    op.create_table(
        "thread_nodes",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("parent_id", sa.String(36), nullable=True),
        sa.Column("root_id", sa.String(36), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("thread_nodes_by_root", "thread_nodes", ["root_id", "id"])


def downgrade() -> None:
    """Drop the threads tables."""
    op.drop_table("thread_nodes")
