"""An in-memory `PaymentStore` with the semantics of `SqlPaymentStore`, the sandbox's `ChargeStore`,
and a processor wrapper that records calls and can stall, fail or crash on cue."""

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

from tests.fakes.store import FakeState, FakeStore, FakeTransaction
from threadline.platform.pagination import PageRequest
from threadline.services.payments.api import SERVICE
from threadline.services.payments.processor import Charge, PaymentProcessor
from threadline.services.payments.service import (
    IdempotencyRecord,
    LedgerTransaction,
    Outcome,
    SubscriptionRecord,
    TipRecord,
)

__all__ = [
    "FakeChargeStore",
    "FakePaymentStore",
    "FakePaymentTransaction",
    "PaymentState",
    "ProcessCrash",
    "RecordingProcessor",
]


@dataclass
class PaymentState(FakeState):
    """The payments service's tables (the sandbox's charges live in FakeChargeStore)."""

    accounts: dict[str, str] = field(default_factory=dict)
    prices: dict[str, int] = field(default_factory=dict)
    subscriptions: dict[str, SubscriptionRecord] = field(default_factory=dict)
    tips: dict[str, TipRecord] = field(default_factory=dict)
    ledger: list[LedgerTransaction] = field(default_factory=list)
    idempotency: dict[tuple[str, str], IdempotencyRecord] = field(default_factory=dict)


class FakePaymentTransaction(FakeTransaction[PaymentState]):
    """The payments queries over one in-memory transaction."""

    def __init__(self, state: PaymentState, writable: bool) -> None:
        super().__init__(state, SERVICE, writable=writable)

    async def open_account(self, user_id: str, handle: str) -> bool:
        """Open an account unless it is open."""
        if user_id in self._read().accounts:
            return False
        self._write().accounts[user_id] = handle
        return True

    async def lock_account(self, user_id: str, handle: str) -> None:
        """Open the account if needed; the store's write lock already serializes writers."""
        self._write()
        await self.open_account(user_id, handle)

    async def price(self, user_id: str) -> int:
        """A creator's price; 0 when none was set."""
        return self._read().prices.get(user_id, 0)

    async def set_price(self, user_id: str, price_cents: int, at: datetime) -> None:
        """Insert or replace a creator's price."""
        self._write().prices[user_id] = price_cents

    async def subscription(self, subscription_id: str) -> SubscriptionRecord | None:
        """One subscription, in any state."""
        found = self._read().subscriptions.get(subscription_id)
        return None if found is None else found.model_copy()

    async def active_subscription(self, subscriber_id: str, creator_id: str) -> SubscriptionRecord | None:
        """The active subscription of a subscriber to a creator."""
        found = next(
            (
                s
                for s in self._read().subscriptions.values()
                if (s.subscriber_id, s.creator_id, s.status) == (subscriber_id, creator_id, "active")
            ),
            None,
        )
        return None if found is None else found.model_copy()

    async def insert_subscription(self, subscription: SubscriptionRecord) -> None:
        """Store a new subscription; a second active one for the same pair raises, as the unique index."""
        if subscription.status == "active" and await self.active_subscription(
            subscription.subscriber_id, subscription.creator_id
        ):
            raise KeyError("a second active subscription for the same subscriber and creator")
        subscriptions = self._write().subscriptions
        if subscription.id in subscriptions:
            raise KeyError(f"duplicate subscription id {subscription.id!r}")
        subscriptions[subscription.id] = subscription.model_copy()

    async def update_subscription(self, subscription: SubscriptionRecord) -> None:
        """Store a subscription's status, period end and cancel time."""
        subscriptions = self._write().subscriptions
        stored = subscriptions.get(subscription.id)
        if stored is not None:
            subscriptions[subscription.id] = stored.model_copy(
                update={
                    "status": subscription.status,
                    "current_period_end": subscription.current_period_end,
                    "canceled_at": subscription.canceled_at,
                }
            )

    async def subscriptions_of(
        self, subscriber_id: str, page: PageRequest
    ) -> tuple[list[SubscriptionRecord], str | None]:
        """A page of a subscriber's subscriptions, newest first by id."""
        rows = sorted(
            (
                s.model_copy()
                for s in self._read().subscriptions.values()
                if s.subscriber_id == subscriber_id and (page.cursor is None or s.id < page.cursor)
            ),
            key=lambda s: s.id,
            reverse=True,
        )[: page.limit + 1]
        kept = rows[: page.limit]
        return kept, kept[-1].id if len(rows) > page.limit else None

    async def entitled_creators(self, subscriber_id: str, creator_ids: list[str]) -> set[str]:
        """Which of `creator_ids` the subscriber has an active subscription to."""
        wanted = set(creator_ids)
        return {
            s.creator_id
            for s in self._read().subscriptions.values()
            if s.subscriber_id == subscriber_id and s.status == "active" and s.creator_id in wanted
        }

    async def insert_tip(self, tip: TipRecord) -> None:
        """Store a tip."""
        tips = self._write().tips
        if tip.id in tips:
            raise KeyError(f"duplicate tip id {tip.id!r}")
        tips[tip.id] = tip.model_copy()

    async def record_ledger(self, transaction: LedgerTransaction) -> None:
        """Store a ledger transaction."""
        self._write().ledger.append(transaction.model_copy(deep=True))

    async def account_totals(self, account: str) -> tuple[int, int]:
        """Earned and spent cents of an account, summed from its entries."""
        amounts = [e.amount_cents for t in self._read().ledger for e in t.entries if e.account == account]
        return sum(a for a in amounts if a > 0), -sum(a for a in amounts if a < 0)

    async def idempotency_record(self, caller_id: str, key: str) -> IdempotencyRecord | None:
        """A caller's record of a key."""
        found = self._read().idempotency.get((caller_id, key))
        return None if found is None else found.model_copy(deep=True)

    async def insert_idempotency_record(self, record: IdempotencyRecord) -> bool:
        """Store a new record unless the caller has one for the key."""
        if (record.caller_id, record.key) in self._read().idempotency:
            return False
        self._write().idempotency[record.caller_id, record.key] = record.model_copy(deep=True)
        return True

    async def subject_in_flight(self, caller_id: str, subject: str, claimed_since: datetime) -> bool:
        """Whether a fresh pending claim of the caller is about `subject`."""
        return any(
            r.caller_id == caller_id
            and r.subject == subject
            and r.state == "pending"
            and r.claimed_at >= claimed_since
            for r in self._read().idempotency.values()
        )

    async def take_over_claim(
        self, caller_id: str, key: str, stale_token: str, token: str, at: datetime
    ) -> bool:
        """Move a pending claim to a new token."""
        record = self._pending(caller_id, key, stale_token)
        if record is None:
            return False
        self._write().idempotency[caller_id, key] = record.model_copy(
            update={"claim_token": token, "claimed_at": at}
        )
        return True

    async def complete_claim(self, caller_id: str, key: str, token: str, outcome: Outcome) -> bool:
        """Record the outcome of a pending claim."""
        record = self._pending(caller_id, key, token)
        if record is None:
            return False
        self._write().idempotency[caller_id, key] = record.model_copy(
            update={"state": "done", "outcome": outcome.model_copy(deep=True)}
        )
        return True

    async def release_claim(self, caller_id: str, key: str, token: str) -> None:
        """Delete a pending claim."""
        if self._pending(caller_id, key, token) is not None:
            del self._write().idempotency[caller_id, key]

    def _pending(self, caller_id: str, key: str, token: str) -> IdempotencyRecord | None:
        record = self._read().idempotency.get((caller_id, key))
        if record is None or record.state != "pending" or record.claim_token != token:
            return None
        return record


class FakePaymentStore(FakeStore[PaymentState, FakePaymentTransaction]):
    """The payments store in memory."""

    def __init__(self) -> None:
        super().__init__(PaymentState(), FakePaymentTransaction)

    def ledger_sum(self) -> int:
        """The sum of every committed ledger entry (zero in a consistent ledger)."""
        return sum(e.amount_cents for t in self.state.ledger for e in t.entries)


class FakeChargeStore:
    """The sandbox processor's charges in memory, first write per key wins."""

    def __init__(self) -> None:
        self.charges: dict[str, Charge] = {}

    async def find(self, idempotency_key: str) -> Charge | None:
        """The charge made with this key."""
        return self.charges.get(idempotency_key)

    async def save(self, charge: Charge) -> Charge:
        """Keep the first charge made with a key; answer the one kept."""
        return self.charges.setdefault(charge.idempotency_key, charge)


class ProcessCrash(BaseException):
    """Stands for the process dying: no `except Exception` handler sees it, so nothing cleans up."""


@dataclass
class RecordingProcessor:
    """Wraps a processor: records every call, and on cue stalls until `gate` opens, raises
    `fail_with` instead of charging, or crashes before or after the charge."""

    inner: PaymentProcessor
    calls: list[tuple[str, str, int]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    fail_with: Exception | None = None
    crash: str | None = None

    async def charge(self, idempotency_key: str, payment_method: str, amount_cents: int) -> Charge:
        """Record the call, then behave as cued."""
        self.calls.append((idempotency_key, payment_method, amount_cents))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        if self.crash == "before":
            raise ProcessCrash
        charge = await self.inner.charge(idempotency_key, payment_method, amount_cents)
        if self.crash == "after":
            raise ProcessCrash
        return charge
