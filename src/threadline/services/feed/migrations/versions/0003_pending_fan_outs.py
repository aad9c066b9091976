"""feed: posts waiting to be fanned out, read with the timelines until they are.

A post's fan-out wrote one entry into each follower's timeline in the transaction that recorded
the post: a page of every follower's timeline, all over the file, written for each post. Posts
now wait in this small table, which feed reads merge into every timeline (a follower's feed
finds its followees' waiting posts through the index by author), and are fanned out in batches,
each batch writing each timeline's newest page once for all the batch's posts to that timeline.
"""

import sqlalchemy as sa
from alembic import op

revision = "feed_0003"
down_revision = "feed_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the table of posts waiting for their fan-out."""
    op.create_table(
        "pending_fan_outs",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("post_id", sa.String(36), nullable=False),
        sa.Column("author_id", sa.String(36), nullable=False),
    )
    op.create_index("pending_fan_outs_by_author", "pending_fan_outs", ["author_id", "post_id"])


def downgrade() -> None:
    """Drop it (posts still waiting are lost from timelines)."""
    op.drop_table("pending_fan_outs")
