"""FakePaymentStore and SqlPaymentStore (SQLite, PostgreSQL) keep the same semantics: one body for all."""

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from tests.fakes.payments import FakeChargeStore, FakePaymentStore
from threadline.platform.clock import utcnow
from threadline.platform.db import Database
from threadline.platform.ids import new_id
from threadline.platform.pagination import PageRequest
from threadline.services.payments.processor import Charge, ChargeStore
from threadline.services.payments.service import (
    IdempotencyRecord,
    LedgerEntry,
    LedgerTransaction,
    Outcome,
    PaymentStore,
    SubscriptionRecord,
    TipRecord,
)
from threadline.services.payments.store import MIGRATIONS, SqlChargeStore, SqlPaymentStore


@pytest.fixture
async def stores(store_database_url: str | None) -> AsyncIterator[tuple[PaymentStore, ChargeStore]]:
    """The in-memory fakes, or the SQL stores on a fresh SQLite file or PostgreSQL database."""
    if store_database_url is None:
        yield FakePaymentStore(), FakeChargeStore()
        return
    database = Database(store_database_url)
    await database.open([MIGRATIONS])
    try:
        yield SqlPaymentStore(database), SqlChargeStore(database)
    finally:
        await database.close()


@pytest.fixture
def store(stores: tuple[PaymentStore, ChargeStore]) -> PaymentStore:
    return stores[0]


def claim(
    key: str, token: str, *, subject: str | None = None, age: timedelta = timedelta()
) -> IdempotencyRecord:
    """A pending claim of `key` by caller "bob", held with `token`, made `age` ago."""
    return IdempotencyRecord(
        caller_id="bob",
        key=key,
        operation="subscribe",
        fingerprint="f" * 64,
        subject=subject,
        state="pending",
        claim_token=token,
        claimed_at=utcnow() - age,
        amount_cents=500,
    )


def subscription(creator: str = "ada") -> SubscriptionRecord:
    """An active subscription of bob to `creator`."""
    now = utcnow()
    return SubscriptionRecord(
        id=new_id(),
        subscriber_id="bob",
        subscriber_handle="bob",
        creator_id=creator,
        creator_handle=creator,
        status="active",
        price_cents=500,
        current_period_end=now + timedelta(days=30),
        created_at=now,
    )


async def test_a_price_is_zero_until_set_and_the_last_set_wins(store: PaymentStore) -> None:
    """A creator without a price costs 0; setting it again replaces it."""
    async with store.write() as tx:
        assert await tx.price("ada") == 0
        await tx.set_price("ada", 500, utcnow())
        await tx.set_price("ada", 700, utcnow())
        await tx.set_price("cy", 100, utcnow())
    async with store.read() as tx:
        assert (await tx.price("ada"), await tx.price("cy"), await tx.price("bob")) == (700, 100, 0)


async def test_subscriptions_are_stored_updated_and_found_by_pair_and_entitlement(
    store: PaymentStore,
) -> None:
    """An active subscription entitles; once canceled it is still found by id but entitles no more."""
    to_ada, to_cy = subscription("ada"), subscription("cy")
    async with store.write() as tx:
        await tx.lock_account("bob", "bob")
        assert not await tx.open_account("bob", "bob")
        await tx.insert_subscription(to_ada)
        await tx.insert_subscription(to_cy)
    async with store.read() as tx:
        assert await tx.subscription(to_ada.id) == to_ada
        assert await tx.active_subscription("bob", "ada") == to_ada
        assert await tx.entitled_creators("bob", ["ada", "cy", "dee"]) == {"ada", "cy"}
    canceled = to_ada.model_copy(
        update={"status": "canceled", "canceled_at": utcnow(), "current_period_end": utcnow()}
    )
    async with store.write() as tx:
        await tx.update_subscription(canceled)
    async with store.read() as tx:
        assert await tx.subscription(to_ada.id) == canceled
        assert await tx.active_subscription("bob", "ada") is None
        assert await tx.entitled_creators("bob", ["ada", "cy"]) == {"cy"}
        listed, _ = await tx.subscriptions_of("bob", PageRequest())
        assert {s.id for s in listed} == {to_ada.id, to_cy.id}


async def test_the_ledger_sums_earned_and_spent_per_account(store: PaymentStore) -> None:
    """Positive entries count as earned, negative ones as spent, per account; none is (0, 0)."""
    now = utcnow()
    tip = TipRecord(
        id=new_id(),
        from_id="bob",
        from_handle="bob",
        to_id="ada",
        to_handle="ada",
        amount_cents=250,
        charge_id=new_id(),
        created_at=now,
    )
    async with store.write() as tx:
        await tx.insert_tip(tip)
        for amount in (250, 100):
            await tx.record_ledger(
                LedgerTransaction(
                    id=new_id(),
                    kind="tip",
                    reference_id=tip.id,
                    charge_id=tip.charge_id,
                    created_at=now,
                    entries=[
                        LedgerEntry(account="user:bob", amount_cents=-amount),
                        LedgerEntry(account="user:ada", amount_cents=amount),
                    ],
                )
            )
    async with store.read() as tx:
        assert await tx.account_totals("user:ada") == (350, 0)
        assert await tx.account_totals("user:bob") == (0, 350)
        assert await tx.account_totals("user:cy") == (0, 0)


async def test_a_pending_claim_moves_only_for_the_token_that_holds_it(store: PaymentStore) -> None:
    """Taking over, completing and releasing a claim each need its current token; a done claim stays."""
    async with store.write() as tx:
        assert await tx.insert_idempotency_record(claim("k1", "t1"))
        assert not await tx.insert_idempotency_record(claim("k1", "t9"))
        assert not await tx.take_over_claim("bob", "k1", "wrong", "t2", utcnow())
        assert await tx.take_over_claim("bob", "k1", "t1", "t2", utcnow())
        assert not await tx.complete_claim("bob", "k1", "t1", Outcome(status=201, body={"id": "x"}))
    outcome = Outcome(
        status=402, body={"error": {"code": "card_declined", "message": "no"}}, error_kind="Declined"
    )
    async with store.write() as tx:
        assert await tx.complete_claim("bob", "k1", "t2", outcome)
        await tx.release_claim("bob", "k1", "t2")
    async with store.read() as tx:
        record = await tx.idempotency_record("bob", "k1")
    assert record is not None
    assert (record.state, record.claim_token, record.outcome) == ("done", "t2", outcome)
    async with store.write() as tx:
        assert await tx.insert_idempotency_record(claim("k2", "t3"))
        await tx.release_claim("bob", "k2", "wrong")
    async with store.read() as tx:
        assert await tx.idempotency_record("bob", "k2") is not None
    async with store.write() as tx:
        await tx.release_claim("bob", "k2", "t3")
    async with store.read() as tx:
        assert await tx.idempotency_record("bob", "k2") is None
        assert await tx.idempotency_record("cy", "k1") is None


async def test_a_subject_is_in_flight_only_while_a_fresh_claim_about_it_is_pending(
    store: PaymentStore,
) -> None:
    """A pending claim about a subject counts if claimed since the given time, and not once done."""
    now = utcnow()
    async with store.write() as tx:
        assert await tx.insert_idempotency_record(claim("fresh", "t1", subject="creator:ada"))
        assert await tx.insert_idempotency_record(
            claim("stale", "t2", subject="creator:cy", age=timedelta(minutes=5))
        )
    async with store.read() as tx:
        since = now - timedelta(minutes=1)
        assert await tx.subject_in_flight("bob", "creator:ada", since)
        assert not await tx.subject_in_flight("bob", "creator:cy", since)
        assert await tx.subject_in_flight("bob", "creator:cy", now - timedelta(minutes=10))
        assert not await tx.subject_in_flight("cy", "creator:ada", since)
    async with store.write() as tx:
        assert await tx.complete_claim("bob", "fresh", "t1", Outcome(status=201, body={}))
    async with store.read() as tx:
        assert not await tx.subject_in_flight("bob", "creator:ada", since)


async def test_the_first_charge_saved_under_a_key_is_kept(stores: tuple[PaymentStore, ChargeStore]) -> None:
    """Saving another charge under a used key answers the one kept; an unused key finds nothing."""
    _, charges = stores
    first = Charge(
        id=new_id(),
        idempotency_key="tip:bob:k1",
        payment_method="pm_card_ok",
        amount_cents=250,
        status="succeeded",
        created_at=utcnow(),
    )
    second = first.model_copy(update={"id": new_id(), "amount_cents": 999})
    assert await charges.save(first) == first
    assert await charges.save(second) == first
    assert await charges.find("tip:bob:k1") == first
    assert await charges.find("tip:bob:other") is None
