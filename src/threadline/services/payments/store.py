"""The payments service's tables and queries; migrations live beside it in `migrations/`."""

from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from threadline.platform.db import (
    Command,
    Connection,
    Database,
    Migrations,
    PagedQuery,
    Query,
    SqlStore,
    Transaction,
    UtcDateTime,
    insert_ignoring_conflicts,
)
from threadline.platform.pagination import PageRequest
from threadline.services.payments.api import SERVICE
from threadline.services.payments.processor import Charge
from threadline.services.payments.service import (
    IdempotencyRecord,
    LedgerTransaction,
    Outcome,
    SubscriptionRecord,
    TipRecord,
)

__all__ = ["MIGRATIONS", "SqlChargeStore", "SqlPaymentStore"]

MIGRATIONS = Migrations(Path(__file__).parent / "migrations")

metadata = sa.MetaData()

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("user_id", sa.String(36), primary_key=True),
    sa.Column("handle", sa.String(64), nullable=False),
)

prices = sa.Table(
    "prices",
    metadata,
    sa.Column("user_id", sa.String(36), primary_key=True),
    sa.Column("price_cents", sa.Integer, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)

subscriptions = sa.Table(
    "subscriptions",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("subscriber_id", sa.String(36), nullable=False),
    sa.Column("subscriber_handle", sa.String(64), nullable=False),
    sa.Column("creator_id", sa.String(36), nullable=False),
    sa.Column("creator_handle", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("price_cents", sa.Integer, nullable=False),
    sa.Column("current_period_end", UtcDateTime, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("canceled_at", UtcDateTime, nullable=True),
)

_SUBSCRIPTIONS_OF = PagedQuery(
    sa.select(subscriptions).where(subscriptions.c.subscriber_id == sa.bindparam("subscriber_id")),
    subscriptions.c.id,
)
_SUBSCRIPTION = Query(sa.select(subscriptions).where(subscriptions.c.id == sa.bindparam("subscription_id")))
_ACTIVE_SUBSCRIPTION = Query(
    sa.select(subscriptions).where(
        subscriptions.c.subscriber_id == sa.bindparam("subscriber_id"),
        subscriptions.c.creator_id == sa.bindparam("creator_id"),
        subscriptions.c.status == "active",
    )
)
_ENTITLED_CREATORS = Query(
    sa.select(subscriptions.c.creator_id).where(
        subscriptions.c.subscriber_id == sa.bindparam("subscriber_id"),
        subscriptions.c.creator_id.in_(sa.bindparam("creator_ids", expanding=True)),
        subscriptions.c.status == "active",
    )
)

tips = sa.Table(
    "tips",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("from_id", sa.String(36), nullable=False),
    sa.Column("from_handle", sa.String(64), nullable=False),
    sa.Column("to_id", sa.String(36), nullable=False),
    sa.Column("to_handle", sa.String(64), nullable=False),
    sa.Column("amount_cents", sa.Integer, nullable=False),
    sa.Column("charge_id", sa.String(36), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
)

ledger_transactions = sa.Table(
    "ledger_transactions",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("reference_id", sa.String(36), nullable=False),
    sa.Column("charge_id", sa.String(36), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
)

ledger_entries = sa.Table(
    "ledger_entries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("transaction_id", sa.String(36), sa.ForeignKey("ledger_transactions.id"), nullable=False),
    sa.Column("account", sa.String(64), nullable=False),
    sa.Column("amount_cents", sa.Integer, nullable=False),
)

idempotency_records = sa.Table(
    "idempotency_records",
    metadata,
    sa.Column("caller_id", sa.String(36), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("operation", sa.String(32), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(100), nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("claim_token", sa.String(36), nullable=False),
    sa.Column("claimed_at", UtcDateTime, nullable=False),
    sa.Column("amount_cents", sa.Integer, nullable=False),
    sa.Column("outcome", sa.JSON, nullable=True),
)

sandbox_charges = sa.Table(
    "sandbox_charges",
    metadata,
    sa.Column("idempotency_key", sa.String(300), primary_key=True),
    sa.Column("id", sa.String(36), nullable=False, unique=True),
    sa.Column("payment_method", sa.String(64), nullable=False),
    sa.Column("amount_cents", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
)


# Every statement is built once; a request binds its values (see `Query` and `Command`).
_LOCK_ACCOUNT = Query(
    sa.select(accounts.c.user_id).where(accounts.c.user_id == sa.bindparam("user_id")).with_for_update()
)
_PRICE = Query(sa.select(prices.c.price_cents).where(prices.c.user_id == sa.bindparam("user_id")))
_NEW_PRICE = Command(
    prices.update()
    .where(prices.c.user_id == sa.bindparam("creator_id"))
    .values(
        price_cents=sa.bindparam("new_price_cents"),
        updated_at=sa.bindparam("new_updated_at", type_=UtcDateTime),
    )
)
_INSERT_SUBSCRIPTION = Command(subscriptions.insert())
_UPDATE_SUBSCRIPTION = Command(
    subscriptions.update()
    .where(subscriptions.c.id == sa.bindparam("subscription_id"))
    .values(
        status=sa.bindparam("new_status"),
        current_period_end=sa.bindparam("new_period_end", type_=UtcDateTime),
        canceled_at=sa.bindparam("new_canceled_at", type_=UtcDateTime),
    )
)
_INSERT_TIP = Command(tips.insert())
_INSERT_LEDGER_TRANSACTION = Command(ledger_transactions.insert())
_INSERT_LEDGER_ENTRY = Command(ledger_entries.insert())
_AMOUNT = ledger_entries.c.amount_cents
_ACCOUNT_TOTALS = Query(
    sa.select(
        sa.func.coalesce(sa.func.sum(sa.case((_AMOUNT > 0, _AMOUNT), else_=0)), 0).label("earned"),
        sa.func.coalesce(sa.func.sum(sa.case((_AMOUNT < 0, -_AMOUNT), else_=0)), 0).label("spent"),
    ).where(ledger_entries.c.account == sa.bindparam("account"))
)
_IDEMPOTENCY_RECORD = Query(
    sa.select(idempotency_records).where(
        idempotency_records.c.caller_id == sa.bindparam("caller_id"),
        idempotency_records.c.key == sa.bindparam("key"),
    )
)
_SUBJECT_IN_FLIGHT = Query(
    sa.select(sa.literal(1).label("found")).where(
        idempotency_records.c.caller_id == sa.bindparam("caller_id"),
        idempotency_records.c.subject == sa.bindparam("subject"),
        idempotency_records.c.state == "pending",
        idempotency_records.c.claimed_at >= sa.bindparam("claimed_since", type_=UtcDateTime),
    )
)
# A pending claim: its caller, key and the token of whoever holds it.
# (Parameter names of an UPDATE may not be column names.)
_PENDING_CLAIM = (
    idempotency_records.c.caller_id == sa.bindparam("claim_caller"),
    idempotency_records.c.key == sa.bindparam("claim_key"),
    idempotency_records.c.state == "pending",
    idempotency_records.c.claim_token == sa.bindparam("holder_token"),
)
_TAKE_OVER_CLAIM = Command(
    idempotency_records.update()
    .where(*_PENDING_CLAIM)
    .values(
        claim_token=sa.bindparam("new_token"), claimed_at=sa.bindparam("new_claimed_at", type_=UtcDateTime)
    )
)
_COMPLETE_CLAIM = Command(
    idempotency_records.update()
    .where(*_PENDING_CLAIM)
    .values(state="done", outcome=sa.bindparam("new_outcome", type_=sa.JSON))
)
_RELEASE_CLAIM = Command(idempotency_records.delete().where(*_PENDING_CLAIM))
_CHARGE = Query(
    sa.select(sandbox_charges).where(sandbox_charges.c.idempotency_key == sa.bindparam("idempotency_key"))
)


def _pending_claim(caller_id: str, key: str, token: str) -> dict[str, str]:
    return {"claim_caller": caller_id, "claim_key": key, "holder_token": token}


def _subscription(row: Any) -> SubscriptionRecord:
    return SubscriptionRecord.model_validate(row._asdict())


def _idempotency_record(row: Any) -> IdempotencyRecord:
    values = row._asdict()
    outcome = values.pop("outcome")
    return IdempotencyRecord(**values, outcome=None if outcome is None else Outcome.model_validate(outcome))


class SqlPaymentTransaction(Transaction):
    """The payments queries on one connection."""

    async def open_account(self, user_id: str, handle: str) -> bool:
        """Open a user's ledger account; False if it was open."""
        return await insert_ignoring_conflicts(self.conn, accounts, {"user_id": user_id, "handle": handle})

    async def lock_account(self, user_id: str, handle: str) -> None:
        """Open the account if needed and lock its row (a no-op lock on SQLite, whose writes queue)."""
        await self.open_account(user_id, handle)
        await self.conn.fetch(_LOCK_ACCOUNT, {"user_id": user_id})

    async def price(self, user_id: str) -> int:
        """A creator's price; 0 when none was set."""
        rows = await self.conn.fetch(_PRICE, {"user_id": user_id})
        return int(rows[0].price_cents) if rows else 0

    async def set_price(self, user_id: str, price_cents: int, at: datetime) -> None:
        """Insert or replace a creator's price."""
        values = {"user_id": user_id, "price_cents": price_cents, "updated_at": at}
        if not await insert_ignoring_conflicts(self.conn, prices, values):
            await self.conn.run(
                _NEW_PRICE, {"creator_id": user_id, "new_price_cents": price_cents, "new_updated_at": at}
            )

    async def subscription(self, subscription_id: str) -> SubscriptionRecord | None:
        """One subscription, in any state."""
        rows = await self.conn.fetch(_SUBSCRIPTION, {"subscription_id": subscription_id})
        return _subscription(rows[0]) if rows else None

    async def active_subscription(self, subscriber_id: str, creator_id: str) -> SubscriptionRecord | None:
        """The active subscription of a subscriber to a creator."""
        rows = await self.conn.fetch(
            _ACTIVE_SUBSCRIPTION, {"subscriber_id": subscriber_id, "creator_id": creator_id}
        )
        return _subscription(rows[0]) if rows else None

    async def insert_subscription(self, subscription: SubscriptionRecord) -> None:
        """Store a new subscription; a second active one for the same pair violates a unique index."""
        await self.conn.run(_INSERT_SUBSCRIPTION, subscription.model_dump())

    async def update_subscription(self, subscription: SubscriptionRecord) -> None:
        """Store a subscription's status, period end and cancel time."""
        await self.conn.run(
            _UPDATE_SUBSCRIPTION,
            {
                "subscription_id": subscription.id,
                "new_status": subscription.status,
                "new_period_end": subscription.current_period_end,
                "new_canceled_at": subscription.canceled_at,
            },
        )

    async def subscriptions_of(
        self, subscriber_id: str, page: PageRequest
    ) -> tuple[list[SubscriptionRecord], str | None]:
        """A page of a subscriber's subscriptions, newest first."""
        rows, cursor = await _SUBSCRIPTIONS_OF.page(self.conn, page, subscriber_id=subscriber_id)
        return [_subscription(row) for row in rows], cursor

    async def entitled_creators(self, subscriber_id: str, creator_ids: list[str]) -> set[str]:
        """One lookup on the (subscriber_id, creator_id, status) index."""
        rows = await self.conn.fetch(
            _ENTITLED_CREATORS, {"subscriber_id": subscriber_id, "creator_ids": creator_ids}
        )
        return {str(row.creator_id) for row in rows}

    async def insert_tip(self, tip: TipRecord) -> None:
        """Store a tip."""
        await self.conn.run(_INSERT_TIP, tip.model_dump())

    async def record_ledger(self, transaction: LedgerTransaction) -> None:
        """Store a ledger transaction and its entries."""
        await self.conn.run(_INSERT_LEDGER_TRANSACTION, transaction.model_dump(exclude={"entries"}))
        await self.conn.run_many(
            _INSERT_LEDGER_ENTRY,
            [
                {"transaction_id": transaction.id, "account": e.account, "amount_cents": e.amount_cents}
                for e in transaction.entries
            ],
        )

    async def account_totals(self, account: str) -> tuple[int, int]:
        """Earned and spent cents of an account, from the (account, amount_cents) index alone."""
        [totals] = await self.conn.fetch(_ACCOUNT_TOTALS, {"account": account})
        return int(totals.earned), int(totals.spent)

    async def idempotency_record(self, caller_id: str, key: str) -> IdempotencyRecord | None:
        """A caller's record of a key."""
        rows = await self.conn.fetch(_IDEMPOTENCY_RECORD, {"caller_id": caller_id, "key": key})
        return _idempotency_record(rows[0]) if rows else None

    async def insert_idempotency_record(self, record: IdempotencyRecord) -> bool:
        """Store a new record unless the caller has one for the key."""
        values = record.model_dump(exclude={"outcome"})
        values["outcome"] = None if record.outcome is None else record.outcome.model_dump(mode="json")
        return await insert_ignoring_conflicts(self.conn, idempotency_records, values)

    async def subject_in_flight(self, caller_id: str, subject: str, claimed_since: datetime) -> bool:
        """Whether a fresh pending claim of the caller is about `subject`."""
        rows = await self.conn.fetch(
            _SUBJECT_IN_FLIGHT, {"caller_id": caller_id, "subject": subject, "claimed_since": claimed_since}
        )
        return bool(rows)

    async def take_over_claim(
        self, caller_id: str, key: str, stale_token: str, token: str, at: datetime
    ) -> bool:
        """Move a pending claim to a new token."""
        claim = _pending_claim(caller_id, key, stale_token)
        return await self.conn.run(_TAKE_OVER_CLAIM, {**claim, "new_token": token, "new_claimed_at": at}) == 1

    async def complete_claim(self, caller_id: str, key: str, token: str, outcome: Outcome) -> bool:
        """Record the outcome of a pending claim."""
        claim = _pending_claim(caller_id, key, token)
        return (
            await self.conn.run(_COMPLETE_CLAIM, {**claim, "new_outcome": outcome.model_dump(mode="json")})
            == 1
        )

    async def release_claim(self, caller_id: str, key: str, token: str) -> None:
        """Delete a pending claim."""
        await self.conn.run(_RELEASE_CLAIM, _pending_claim(caller_id, key, token))


class SqlPaymentStore(SqlStore[SqlPaymentTransaction]):
    """The payments store on its own database."""

    def __init__(self, db: Database) -> None:
        super().__init__(db, SqlPaymentTransaction, SERVICE)


class SqlChargeStore:
    """The sandbox processor's charges, in their own table of the payments database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def find(self, idempotency_key: str) -> Charge | None:
        """The charge made with this key."""
        async with self._db.read() as conn:
            return await self._find(conn, idempotency_key)

    async def save(self, charge: Charge) -> Charge:
        """Keep the first charge made with a key; answer the one kept."""
        async with self._db.write() as conn:
            if await insert_ignoring_conflicts(conn, sandbox_charges, charge.model_dump()):
                return charge
            kept = await self._find(conn, charge.idempotency_key)
        if kept is None:
            raise RuntimeError(f"charge {charge.idempotency_key!r} clashed with a row that is gone")
        return kept

    @staticmethod
    async def _find(conn: Connection, idempotency_key: str) -> Charge | None:
        rows = await conn.fetch(_CHARGE, {"idempotency_key": idempotency_key})
        return Charge.model_validate(rows[0]._asdict()) if rows else None
