"""posts: posts, likes and author snapshots."""

import sqlalchemy as sa
from alembic import op

revision = "posts_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the posts tables."""
    op.create_table(
        "posts",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("author_id", sa.String(36), nullable=False),
        sa.Column("text", sa.String(500), nullable=False),
        sa.Column("reply_to", sa.String(36), nullable=True),
        sa.Column("root_id", sa.String(36), nullable=False),
        sa.Column("audience", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("like_count", sa.Integer, nullable=False),
        sa.Column("reply_count", sa.Integer, nullable=False),
    )
    op.create_index("posts_by_author", "posts", ["author_id", "id"])
    op.create_table(
        "likes",
        sa.Column("post_id", sa.String(36), primary_key=True),
        sa.Column("user_id", sa.String(36), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("likes_by_user", "likes", ["user_id", "post_id"])
    op.create_table(
        "authors",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("handle", sa.String(30), nullable=False),
        sa.Column("display_name", sa.String(50), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    """Drop the posts tables."""
    op.drop_table("authors")
    op.drop_table("likes")
    op.drop_table("posts")
