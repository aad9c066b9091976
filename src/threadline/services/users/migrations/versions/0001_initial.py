"""users: accounts, follows and signing keys."""

import sqlalchemy as sa
from alembic import op

revision = "users_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the users tables."""
    op.create_table(
        "users",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("handle", sa.String(30), nullable=False, unique=True),
        sa.Column("display_name", sa.String(50), nullable=False),
        sa.Column("bio", sa.String(300), nullable=False),
        sa.Column("password_hash", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("followers_count", sa.Integer, nullable=False),
        sa.Column("following_count", sa.Integer, nullable=False),
    )
    op.create_table(
        "follows",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("follower_id", sa.String(36), nullable=False),
        sa.Column("followee_id", sa.String(36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("follower_id", "followee_id"),
    )
    op.create_index("follows_by_followee", "follows", ["followee_id", "id"])
    op.create_index("follows_by_follower", "follows", ["follower_id", "id"])
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(36), primary_key=True),
        sa.Column("private_key", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    """Drop the users tables."""
    op.drop_table("signing_keys")
    op.drop_table("follows")
    op.drop_table("users")
