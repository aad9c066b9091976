"""payments: accounts, prices, subscriptions, tips, the ledger, idempotency records, sandbox charges."""

import sqlalchemy as sa
from alembic import op

revision = "payments_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the payments tables."""
    op.create_table(
        "accounts",
        sa.Column("user_id", sa.String(36), primary_key=True),
        sa.Column("handle", sa.String(64), nullable=False),
    )
    op.create_table(
        "prices",
        sa.Column("user_id", sa.String(36), primary_key=True),
        sa.Column("price_cents", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("subscriber_id", sa.String(36), nullable=False),
        sa.Column("subscriber_handle", sa.String(64), nullable=False),
        sa.Column("creator_id", sa.String(36), nullable=False),
        sa.Column("creator_handle", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("price_cents", sa.Integer, nullable=False),
        sa.Column("current_period_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("canceled_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("subscriptions_by_subscriber", "subscriptions", ["subscriber_id", "id"])
    op.create_index("subscriptions_entitlement", "subscriptions", ["subscriber_id", "creator_id", "status"])
    op.create_index(
        "subscriptions_one_active",
        "subscriptions",
        ["subscriber_id", "creator_id"],
        unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_table(
        "tips",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("from_id", sa.String(36), nullable=False),
        sa.Column("from_handle", sa.String(64), nullable=False),
        sa.Column("to_id", sa.String(36), nullable=False),
        sa.Column("to_handle", sa.String(64), nullable=False),
        sa.Column("amount_cents", sa.Integer, nullable=False),
        sa.Column("charge_id", sa.String(36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "ledger_transactions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("reference_id", sa.String(36), nullable=False),
        sa.Column("charge_id", sa.String(36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("transaction_id", sa.String(36), sa.ForeignKey("ledger_transactions.id"), nullable=False),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("amount_cents", sa.Integer, nullable=False),
    )
    op.create_index("ledger_entries_by_account", "ledger_entries", ["account", "amount_cents"])
    op.create_table(
        "idempotency_records",
        sa.Column("caller_id", sa.String(36), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(100), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("claim_token", sa.String(36), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("amount_cents", sa.Integer, nullable=False),
        sa.Column("outcome", sa.JSON, nullable=True),
    )
    op.create_index(
        "idempotency_records_by_subject", "idempotency_records", ["caller_id", "subject", "state"]
    )
    op.create_table(
        "sandbox_charges",
        sa.Column("idempotency_key", sa.String(300), primary_key=True),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("payment_method", sa.String(64), nullable=False),
        sa.Column("amount_cents", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    """Drop the payments tables."""
    op.drop_table("sandbox_charges")
    op.drop_table("idempotency_records")
    op.drop_table("ledger_entries")
    op.drop_table("ledger_transactions")
    op.drop_table("tips")
    op.drop_table("subscriptions")
    op.drop_table("prices")
    op.drop_table("accounts")
