"""feed: its copy of the follow graph, copies of posts, tombstones and home timelines."""

import sqlalchemy as sa
from alembic import op

revision = "feed_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the feed tables."""
    op.create_table(
        "follows",
        sa.Column("follower_id", sa.String(36), primary_key=True),
        sa.Column("followee_id", sa.String(36), primary_key=True),
        sa.Column("following", sa.Boolean, nullable=False),
        sa.Column("version", sa.String(36), nullable=False),
    )
    op.create_index("follows_by_followee", "follows", ["followee_id", "following"])
    op.create_table(
        "post_copies",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("author_id", sa.String(36), nullable=False),
        sa.Column("author_handle", sa.String(30), nullable=False),
        sa.Column("author_display_name", sa.String(50), nullable=False),
        sa.Column("text", sa.String(500), nullable=True),
        sa.Column("reply_to", sa.String(36), nullable=True),
        sa.Column("root_id", sa.String(36), nullable=False),
        sa.Column("audience", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "deleted_posts",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "timeline_entries",
        sa.Column("owner_id", sa.String(36), primary_key=True),
        sa.Column("post_id", sa.String(36), primary_key=True),
        sa.Column("author_id", sa.String(36), nullable=False),
    )
    op.create_index("timeline_entries_by_author", "timeline_entries", ["owner_id", "author_id"])
    op.create_index("timeline_entries_by_post", "timeline_entries", ["post_id"])


def downgrade() -> None:
    """Drop the feed tables."""
    op.drop_table("timeline_entries")
    op.drop_table("deleted_posts")
    op.drop_table("post_copies")
    op.drop_table("follows")
