"""The payments application layer over a fake store and the sandbox processor: prices, subscriptions,
tips, the ledger, and idempotent charging under duplicates, outages and crashes."""

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from tests.fakes.payments import FakeChargeStore, FakePaymentStore, ProcessCrash, RecordingProcessor
from tests.support.polling import eventually
from threadline.platform.errors import Conflict, InvalidRequest, ServiceUnavailable
from threadline.platform.events import Event
from threadline.platform.ids import new_id
from threadline.platform.pagination import PageRequest
from threadline.platform.tokens import Identity
from threadline.services.payments import events
from threadline.services.payments.api import (
    AlreadySubscribed,
    Balance,
    CannotPayOneself,
    CardDeclined,
    IdempotencyKeyReused,
    NotOffered,
    NotSubscriber,
    Party,
    PriceSet,
    SubscriptionCreate,
    SubscriptionEnded,
    SubscriptionNotFound,
    SubscriptionPublic,
    SubscriptionStarted,
    TipCreate,
    TipPublic,
    TipSent,
)
from threadline.services.payments.processor import CARD_DECLINED, CARD_OK, CARD_SLOW, SandboxProcessor
from threadline.services.payments.service import (
    MAX_ENTITLEMENT_BATCH,
    SUBSCRIPTION_PERIOD,
    LedgerEntry,
    LedgerTransaction,
    PaymentsService,
    PaymentStore,
)
from threadline.services.users.api import UserRegistered

SLOW_SECONDS = 0.05
STALE_SECONDS = 60.0
PRICE = 900


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2025, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass(frozen=True)
class Person:
    """A user as the payments service meets them: as a verified caller, and as a resolved party."""

    identity: Identity
    party: Party

    @property
    def id(self) -> str:
        return self.identity.user_id


def person(handle: str) -> Person:
    user_id = new_id()
    return Person(Identity(user_id, handle, handle.title(), "test-token"), Party(id=user_id, handle=handle))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> FakePaymentStore:
    return FakePaymentStore()


@pytest.fixture
def charges() -> FakeChargeStore:
    return FakeChargeStore()


@pytest.fixture
def processor(charges: FakeChargeStore) -> RecordingProcessor:
    return RecordingProcessor(SandboxProcessor(charges, slow_seconds=SLOW_SECONDS))


@pytest.fixture
def make_service(
    store: FakePaymentStore, processor: RecordingProcessor, clock: Clock
) -> Callable[..., PaymentsService]:
    def make(**options: float) -> PaymentsService:
        port: PaymentStore = store
        settings = {
            "wait_seconds": 5.0,
            "poll_seconds": 0.002,
            "stale_after_seconds": STALE_SECONDS,
            "charge_timeout_seconds": 2.0,
        }
        return PaymentsService(port, processor, now=clock, **(settings | options))

    return make


@pytest.fixture
def service(make_service: Callable[..., PaymentsService]) -> PaymentsService:
    return make_service()


@pytest.fixture(autouse=True)
def ledger_balances(store: FakePaymentStore) -> Iterator[None]:
    """After every test, every ledger transaction (and so the whole ledger) sums to zero."""
    yield
    assert all(sum(e.amount_cents for e in t.entries) == 0 for t in store.state.ledger)
    assert store.ledger_sum() == 0


@pytest.fixture
def ada() -> Person:
    return person("ada")


@pytest.fixture
def bob() -> Person:
    return person("bob")


async def offer(service: PaymentsService, creator: Person, price: int = PRICE) -> None:
    await service.set_price(creator.identity, PriceSet(price_cents=price))


async def subscribe(
    service: PaymentsService, who: Person, creator: Person, key: str = "key-1", method: str = CARD_OK
) -> SubscriptionPublic:
    data = SubscriptionCreate(creator=creator.party.handle, payment_method=method)
    return await service.subscribe(who.identity, creator.party, data, key)


async def tip(
    service: PaymentsService,
    who: Person,
    to: Person,
    amount: int = 500,
    key: str = "key-1",
    method: str = CARD_OK,
) -> TipPublic:
    data = TipCreate(to=to.party.handle, amount_cents=amount, payment_method=method)
    return await service.tip(who.identity, to.party, data, key)


async def balance(service: PaymentsService, who: Person) -> tuple[int, int]:
    found = await service.balance(who.identity)
    return found.earned_cents, found.spent_cents


# --- prices ---------------------------------------------------------------------------------


async def test_set_price_answers_and_stores_the_price(
    service: PaymentsService, store: FakePaymentStore, bob: Person
) -> None:
    """Setting a price answers it and keeps it for the caller."""
    assert await service.set_price(bob.identity, PriceSet(price_cents=PRICE)) == PriceSet(price_cents=PRICE)
    assert store.state.prices == {bob.id: PRICE}


async def test_price_zero_stops_offering(service: PaymentsService, ada: Person, bob: Person) -> None:
    """After the price is set back to 0, subscribing is NotOffered."""
    await offer(service, bob)
    await offer(service, bob, 0)

    with pytest.raises(NotOffered):
        await subscribe(service, ada, bob)


# --- subscriptions --------------------------------------------------------------------------


async def test_subscribe_charges_the_first_period_and_starts_active(
    service: PaymentsService,
    store: FakePaymentStore,
    processor: RecordingProcessor,
    clock: Clock,
    ada: Person,
    bob: Person,
) -> None:
    """Subscribing charges the price once, is active 30 days, moves money, emits subscription.started."""
    await offer(service, bob)

    sub = await subscribe(service, ada, bob)

    assert (sub.creator, sub.subscriber, sub.status, sub.price_cents) == ("bob", "ada", "active", PRICE)
    assert sub.current_period_end == clock.now + SUBSCRIPTION_PERIOD
    assert processor.calls == [(f"{ada.id}:key-1", CARD_OK, PRICE)]
    assert await balance(service, ada) == (0, PRICE)
    assert await balance(service, bob) == (PRICE, 0)
    assert store.events == [
        SubscriptionStarted(
            id=sub.id,
            creator_id=bob.id,
            subscriber_id=ada.id,
            price_cents=PRICE,
            current_period_end=sub.current_period_end,
        )
    ]
    assert await service.entitled_creators(ada.id, [bob.id]) == [bob.id]


async def test_subscribing_to_oneself_is_refused(
    service: PaymentsService, store: FakePaymentStore, processor: RecordingProcessor, bob: Person
) -> None:
    """Subscribing to oneself raises CannotPayOneself and charges and records nothing."""
    await offer(service, bob)

    with pytest.raises(CannotPayOneself):
        await subscribe(service, bob, bob)

    assert (processor.calls, store.state.subscriptions, store.state.idempotency) == ([], {}, {})


async def test_subscribing_to_a_creator_who_offers_nothing_is_refused(
    service: PaymentsService, store: FakePaymentStore, processor: RecordingProcessor, ada: Person, bob: Person
) -> None:
    """A creator without a price raises NotOffered, and nothing is charged."""
    with pytest.raises(NotOffered):
        await subscribe(service, ada, bob)

    assert (processor.calls, store.state.subscriptions, store.events) == ([], {}, [])


async def test_second_subscription_to_the_same_creator_is_already_subscribed(
    service: PaymentsService, processor: RecordingProcessor, ada: Person, bob: Person
) -> None:
    """With an active subscription, another (with a new key) raises AlreadySubscribed and charges nothing."""
    await offer(service, bob)
    await subscribe(service, ada, bob, key="first")

    with pytest.raises(AlreadySubscribed):
        await subscribe(service, ada, bob, key="second")

    assert len(processor.calls) == 1
    assert await balance(service, ada) == (0, PRICE)


async def test_declined_card_moves_no_money_and_creates_nothing(
    service: PaymentsService, store: FakePaymentStore, processor: RecordingProcessor, ada: Person, bob: Person
) -> None:
    """A declined card raises CardDeclined, moves no money, creates no subscription, emits nothing."""
    await offer(service, bob)

    with pytest.raises(CardDeclined) as declined:
        await subscribe(service, ada, bob, method=CARD_DECLINED)

    assert (declined.value.status, declined.value.code) == (402, "card_declined")
    assert (store.state.subscriptions, store.state.ledger, store.events) == ({}, [], [])
    assert await balance(service, ada) == await balance(service, bob) == (0, 0)
    assert await service.entitled_creators(ada.id, [bob.id]) == []
    assert len(processor.calls) == 1


async def test_unknown_payment_method_is_invalid_and_moves_nothing(
    service: PaymentsService, store: FakePaymentStore, ada: Person, bob: Person
) -> None:
    """An unknown payment method is a 422 invalid_request naming it, with nothing created."""
    await offer(service, bob)

    with pytest.raises(InvalidRequest) as refused:
        await subscribe(service, ada, bob, method="pm_card_unheard_of")

    assert (refused.value.status, refused.value.code) == (422, "invalid_request")
    assert "unknown payment method" in refused.value.message
    assert (store.state.subscriptions, store.state.ledger) == ({}, [])


async def test_handle_must_match_the_resolved_party(
    service: PaymentsService, processor: RecordingProcessor, ada: Person, bob: Person
) -> None:
    """A body naming another handle than the party it was resolved to is invalid, and charges nothing."""
    await offer(service, bob)
    wrong = SubscriptionCreate(creator="carol", payment_method=CARD_OK)

    with pytest.raises(InvalidRequest):
        await service.subscribe(ada.identity, bob.party, wrong, "key-1")
    with pytest.raises(InvalidRequest):
        await service.tip(
            ada.identity, bob.party, TipCreate(to="carol", amount_cents=500, payment_method=CARD_OK), "k"
        )

    assert processor.calls == []


async def test_cancel_ends_entitlement_at_once_and_emits_subscription_ended(
    service: PaymentsService, store: FakePaymentStore, ada: Person, bob: Person
) -> None:
    """Canceling answers it canceled, ends entitlement at once, and emits subscription.ended."""
    await offer(service, bob)
    sub = await subscribe(service, ada, bob)

    canceled = await service.cancel(ada.identity, sub.id)

    assert canceled == sub.model_copy(update={"status": "canceled"})
    assert await service.entitled_creators(ada.id, [bob.id]) == []
    assert store.events_of(SubscriptionEnded) == [
        SubscriptionEnded(id=sub.id, creator_id=bob.id, subscriber_id=ada.id)
    ]


async def test_only_the_subscriber_cancels(service: PaymentsService, ada: Person, bob: Person) -> None:
    """The creator or a stranger canceling raises NotSubscriber, and the subscription stays active."""
    await offer(service, bob)
    sub = await subscribe(service, ada, bob)

    for other in (bob, person("carol")):
        with pytest.raises(NotSubscriber):
            await service.cancel(other.identity, sub.id)

    assert await service.entitled_creators(ada.id, [bob.id]) == [bob.id]


async def test_cancel_of_an_unknown_subscription_is_not_found(service: PaymentsService, ada: Person) -> None:
    """Canceling an unknown subscription raises SubscriptionNotFound."""
    with pytest.raises(SubscriptionNotFound):
        await service.cancel(ada.identity, "no-such-subscription")


async def test_canceling_twice_ends_once(
    service: PaymentsService, store: FakePaymentStore, ada: Person, bob: Person
) -> None:
    """A second cancel answers the canceled subscription again and emits nothing more."""
    await offer(service, bob)
    sub = await subscribe(service, ada, bob)

    first = await service.cancel(ada.identity, sub.id)
    second = await service.cancel(ada.identity, sub.id)

    assert first == second
    assert len(store.events_of(SubscriptionEnded)) == 1


async def test_resubscribing_after_cancel_starts_a_new_paid_subscription(
    service: PaymentsService, ada: Person, bob: Person
) -> None:
    """After a cancel, subscribing again (new key) charges again and makes a new active subscription."""
    await offer(service, bob)
    old = await subscribe(service, ada, bob, key="first")
    await service.cancel(ada.identity, old.id)

    new = await subscribe(service, ada, bob, key="second")

    assert (new.id != old.id, new.status) == (True, "active")
    assert await balance(service, ada) == (0, 2 * PRICE)
    listed = await service.my_subscriptions(ada.identity, PageRequest())
    assert [(s.id, s.status) for s in listed.items] == [(new.id, "active"), (old.id, "canceled")]


async def test_my_subscriptions_pages_newest_first(
    service: PaymentsService, ada: Person, bob: Person
) -> None:
    """Five subscriptions read two at a time come in three pages, newest first; others' are left out."""
    creators = [person(f"creator_{i}") for i in range(5)]
    made = []
    for i, creator in enumerate(creators):
        await offer(service, creator)
        made.append(await subscribe(service, ada, creator, key=f"key-{i}"))
    await subscribe(service, bob, creators[0])

    pages = []
    cursor = None
    while True:
        page = await service.my_subscriptions(ada.identity, PageRequest(limit=2, cursor=cursor))
        pages.append(page)
        cursor = page.next_cursor
        if cursor is None:
            break

    assert [len(p.items) for p in pages] == [2, 2, 1]
    assert [s.id for page in pages for s in page.items] == [s.id for s in reversed(made)]


async def test_entitled_creators_are_the_active_ones_in_the_order_asked(
    service: PaymentsService, ada: Person
) -> None:
    """Entitlement lists the asked creators with an active subscription, once each, in the order asked."""
    kept, dropped, never = person("kept"), person("dropped"), person("never")
    for i, creator in enumerate((kept, dropped)):
        await offer(service, creator)
        await subscribe(service, ada, creator, key=f"key-{i}")
    await offer(service, never)
    sub = (await service.my_subscriptions(ada.identity, PageRequest())).items[0]
    await service.cancel(ada.identity, sub.id)

    asked = [never.id, dropped.id, kept.id, "unknown", kept.id]
    assert await service.entitled_creators(ada.id, asked) == [kept.id]
    assert await service.entitled_creators(ada.id, []) == []
    assert await service.entitled_creators(never.id, asked) == []


async def test_entitled_creators_refuses_an_oversized_batch(service: PaymentsService, ada: Person) -> None:
    """More than MAX_ENTITLEMENT_BATCH creator ids raise InvalidRequest."""
    with pytest.raises(InvalidRequest):
        await service.entitled_creators(ada.id, ["x"] * (MAX_ENTITLEMENT_BATCH + 1))


# --- tips -----------------------------------------------------------------------------------


async def test_tip_moves_money_and_emits_tip_sent(
    service: PaymentsService, store: FakePaymentStore, ada: Person, bob: Person
) -> None:
    """A tip answers from/to handles and status succeeded, moves the amount, and emits tip.sent."""
    sent = await tip(service, ada, bob, 700)

    assert (sent.from_, sent.to, sent.amount_cents, sent.status) == ("ada", "bob", 700, "succeeded")
    assert sent.model_dump(mode="json")["from"] == "ada"
    assert await balance(service, ada) == (0, 700)
    assert await balance(service, bob) == (700, 0)
    assert store.events == [TipSent(id=sent.id, from_id=ada.id, to_id=bob.id, amount_cents=700)]


async def test_tipping_oneself_is_refused(
    service: PaymentsService, processor: RecordingProcessor, ada: Person
) -> None:
    """Tipping oneself raises CannotPayOneself and charges nothing."""
    with pytest.raises(CannotPayOneself):
        await tip(service, ada, ada)

    assert processor.calls == []


async def test_declined_tip_moves_no_money(
    service: PaymentsService, store: FakePaymentStore, ada: Person, bob: Person
) -> None:
    """A declined tip raises CardDeclined and records no tip, no ledger entry, no event."""
    with pytest.raises(CardDeclined):
        await tip(service, ada, bob, method=CARD_DECLINED)

    assert (store.state.tips, store.state.ledger, store.events) == ({}, [], [])


# --- the ledger -----------------------------------------------------------------------------


async def test_balances_are_derived_from_the_ledger(
    service: PaymentsService, store: FakePaymentStore, ada: Person, bob: Person
) -> None:
    """Earned and spent sum each account's incoming and outgoing entries across tips and subscriptions."""
    await offer(service, bob)
    await tip(service, ada, bob, 500, key="a")
    await tip(service, bob, ada, 300, key="b")
    await subscribe(service, ada, bob, key="c")

    assert await service.balance(ada.identity) == Balance(earned_cents=300, spent_cents=500 + PRICE)
    assert await service.balance(bob.identity) == Balance(earned_cents=500 + PRICE, spent_cents=300)
    assert await balance(service, person("carol")) == (0, 0)
    assert [t.kind for t in store.state.ledger] == ["tip", "tip", "subscription"]


def test_an_unbalanced_ledger_transaction_cannot_be_made() -> None:
    """A ledger transaction whose entries do not sum to zero, or with one entry, is refused."""
    for entries in ([(-500, "user:a"), (400, "user:b")], [(0, "user:a")]):
        with pytest.raises(ValidationError):
            LedgerTransaction(
                id=new_id(),
                kind="tip",
                reference_id="t",
                charge_id="c",
                created_at=datetime.now(UTC),
                entries=[LedgerEntry(account=account, amount_cents=amount) for amount, account in entries],
            )


# --- idempotency ----------------------------------------------------------------------------


async def test_replay_answers_the_first_result_and_moves_money_once(
    service: PaymentsService, store: FakePaymentStore, processor: RecordingProcessor, ada: Person, bob: Person
) -> None:
    """The same key with the same tip answers the identical tip again, with one charge, entry and event."""
    first = await tip(service, ada, bob)

    again = await tip(service, ada, bob)

    assert again == first
    assert again.model_dump(mode="json") == first.model_dump(mode="json")
    assert (len(processor.calls), len(store.state.ledger), len(store.events)) == (1, 1, 1)
    assert await balance(service, ada) == (0, 500)


async def test_replay_answers_the_recorded_result_not_the_current_state(
    service: PaymentsService, ada: Person, bob: Person
) -> None:
    """Replaying a subscription after it was canceled answers the first (active) answer, without charging."""
    await offer(service, bob)
    sub = await subscribe(service, ada, bob)
    await service.cancel(ada.identity, sub.id)

    assert await subscribe(service, ada, bob) == sub
    assert await balance(service, ada) == (0, PRICE)


async def test_same_key_with_a_different_request_is_key_reused(
    service: PaymentsService, ada: Person, bob: Person
) -> None:
    """A key reused for another amount, recipient or operation is IdempotencyKeyReused; money moves once."""
    await offer(service, bob)
    await tip(service, ada, bob, 500)

    carol = person("carol")
    for reuse in (
        tip(service, ada, bob, 600),
        tip(service, ada, carol, 500),
        tip(service, ada, bob, 500, method=CARD_SLOW),
        subscribe(service, ada, bob),
    ):
        with pytest.raises(IdempotencyKeyReused) as reused:
            await reuse
        assert (reused.value.status, reused.value.code) == (409, "idempotency_key_reused")

    assert await balance(service, ada) == (0, 500)


async def test_keys_are_scoped_per_caller(service: PaymentsService, ada: Person, bob: Person) -> None:
    """Two callers using the same key make two separate tips."""
    carol = person("carol")

    from_ada = await tip(service, ada, bob, key="shared")
    from_carol = await tip(service, carol, bob, key="shared")

    assert from_ada.id != from_carol.id
    assert await balance(service, bob) == (1000, 0)


async def test_a_refusal_is_replayed_for_its_key(
    service: PaymentsService, processor: RecordingProcessor, ada: Person, bob: Person
) -> None:
    """A key refused as NotOffered stays refused once the creator offers; a new key succeeds."""
    with pytest.raises(NotOffered):
        await subscribe(service, ada, bob, key="early")
    await offer(service, bob)

    with pytest.raises(NotOffered):
        await subscribe(service, ada, bob, key="early")
    assert (await subscribe(service, ada, bob, key="later")).status == "active"
    assert len(processor.calls) == 1


async def test_a_decline_is_replayed_without_asking_the_processor_again(
    service: PaymentsService, processor: RecordingProcessor, ada: Person, bob: Person
) -> None:
    """The same key after a decline raises CardDeclined again with the same message, from the record."""
    with pytest.raises(CardDeclined) as first:
        await tip(service, ada, bob, method=CARD_DECLINED)

    with pytest.raises(CardDeclined) as again:
        await tip(service, ada, bob, method=CARD_DECLINED)

    assert again.value.body() == first.value.body()
    assert len(processor.calls) == 1


async def test_idempotency_key_must_be_1_to_255_characters(
    service: PaymentsService, processor: RecordingProcessor, ada: Person, bob: Person
) -> None:
    """An empty key or one over 255 characters is invalid and charges nothing; 255 characters are fine."""
    for key in ("", "k" * 256):
        with pytest.raises(InvalidRequest) as refused:
            await tip(service, ada, bob, key=key)
        assert refused.value.fields[0]["field"] == "Idempotency-Key"
    assert processor.calls == []

    await tip(service, ada, bob, key="k" * 255)


async def test_twenty_concurrent_duplicates_charge_once_and_answer_the_same(
    service: PaymentsService, store: FakePaymentStore, processor: RecordingProcessor, ada: Person, bob: Person
) -> None:
    """Twenty identical tips sent at once with one key charge once and all answer the same tip."""
    answers = await asyncio.gather(*(tip(service, ada, bob, method=CARD_SLOW) for _ in range(20)))

    assert {a.model_dump_json() for a in answers} == {answers[0].model_dump_json()}
    assert len(processor.calls) == 1
    assert (len(store.state.tips), len(store.state.ledger), len(store.events)) == (1, 1, 1)
    assert await balance(service, ada) == (0, 500)


async def test_concurrent_duplicates_of_a_declined_card_all_see_the_decline(
    service: PaymentsService, processor: RecordingProcessor, ada: Person, bob: Person
) -> None:
    """Duplicates waiting on a charge that is then declined all raise CardDeclined; the card is asked once."""
    processor.gate = asyncio.Event()
    waiting = [asyncio.create_task(tip(service, ada, bob, method=CARD_DECLINED)) for _ in range(5)]

    async def first_reached_the_processor() -> None:
        assert len(processor.calls) == 1

    await eventually(first_reached_the_processor)
    processor.gate.set()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)

    assert all(isinstance(outcome, CardDeclined) for outcome in outcomes)
    assert len(processor.calls) == 1


async def test_a_subscription_being_paid_for_blocks_another_key(
    service: PaymentsService, processor: RecordingProcessor, ada: Person, bob: Person
) -> None:
    """While a subscription is charging, another key for that creator is AlreadySubscribed, unrecorded."""
    await offer(service, bob)
    processor.gate = asyncio.Event()
    first = asyncio.create_task(subscribe(service, ada, bob, key="first"))

    async def first_is_charging() -> None:
        assert len(processor.calls) == 1

    await eventually(first_is_charging)
    with pytest.raises(AlreadySubscribed):
        await subscribe(service, ada, bob, key="second")
    processor.gate.set()
    sub = await first

    with pytest.raises(AlreadySubscribed):
        await subscribe(service, ada, bob, key="second")
    assert (sub.status, len(processor.calls)) == ("active", 1)


async def test_a_duplicate_gives_up_with_key_in_use_while_the_first_is_still_charging(
    make_service: Callable[..., PaymentsService], processor: RecordingProcessor, ada: Person, bob: Person
) -> None:
    """A duplicate that outwaits its deadline gets 409 idempotency_key_in_use; later it gets the result."""
    service = make_service(wait_seconds=0.05)
    processor.gate = asyncio.Event()
    first = asyncio.create_task(tip(service, ada, bob))

    async def first_is_charging() -> None:
        assert len(processor.calls) == 1

    await eventually(first_is_charging)
    with pytest.raises(Conflict) as busy:
        await tip(service, ada, bob)
    assert (busy.value.status, busy.value.code) == (409, "idempotency_key_in_use")
    processor.gate.set()
    sent = await first

    assert await tip(service, ada, bob) == sent


async def test_charging_holds_no_write_transaction(
    service: PaymentsService, processor: RecordingProcessor, ada: Person, bob: Person
) -> None:
    """While a charge is in progress, other writes to the store go through."""
    processor.gate = asyncio.Event()
    charging = asyncio.create_task(tip(service, ada, bob))

    async def is_charging() -> None:
        assert len(processor.calls) == 1

    await eventually(is_charging)
    await asyncio.wait_for(offer(service, bob), timeout=5)
    assert not charging.done()
    processor.gate.set()
    await charging


async def test_a_processor_outage_releases_the_key_for_a_retry(
    service: PaymentsService, store: FakePaymentStore, processor: RecordingProcessor, ada: Person, bob: Person
) -> None:
    """An unreachable processor raises ServiceUnavailable and leaves the key free to retry at once."""
    processor.fail_with = ServiceUnavailable("sandbox processor")
    with pytest.raises(ServiceUnavailable):
        await tip(service, ada, bob)
    assert (store.state.idempotency, store.state.ledger) == ({}, [])

    processor.fail_with = None
    await tip(service, ada, bob)

    assert await balance(service, ada) == (0, 500)


async def test_a_processor_that_does_not_answer_in_time_releases_the_key(
    make_service: Callable[..., PaymentsService],
    store: FakePaymentStore,
    processor: RecordingProcessor,
    ada: Person,
    bob: Person,
) -> None:
    """A charge past its timeout raises ServiceUnavailable and frees the key; the retry charges once."""
    service = make_service(charge_timeout_seconds=0.05)
    processor.gate = asyncio.Event()
    with pytest.raises(ServiceUnavailable):
        await tip(service, ada, bob)
    assert store.state.idempotency == {}

    processor.gate.set()
    await tip(service, ada, bob)

    assert await balance(service, ada) == (0, 500)


async def test_a_claim_left_by_a_crash_is_taken_over_once_stale(
    make_service: Callable[..., PaymentsService],
    processor: RecordingProcessor,
    charges: FakeChargeStore,
    clock: Clock,
    ada: Person,
    bob: Person,
) -> None:
    """A key whose process died before charging is in use until stale; then a retry charges once."""
    service = make_service(wait_seconds=0.05)
    processor.crash = "before"
    with pytest.raises(ProcessCrash):
        await tip(service, ada, bob)
    processor.crash = None

    with pytest.raises(Conflict):
        await tip(service, ada, bob)
    clock.advance(STALE_SECONDS + 1)
    await tip(service, ada, bob)

    assert len(charges.charges) == 1
    assert await balance(service, ada) == (0, 500)


async def test_a_crash_after_charging_is_settled_by_the_retry_without_charging_again(
    service: PaymentsService,
    store: FakePaymentStore,
    processor: RecordingProcessor,
    charges: FakeChargeStore,
    clock: Clock,
    ada: Person,
    bob: Person,
) -> None:
    """If the process died after charging, the retry gets the same charge back and settles it."""
    processor.crash = "after"
    with pytest.raises(ProcessCrash):
        await tip(service, ada, bob)
    assert (len(charges.charges), store.state.ledger) == (1, [])
    processor.crash = None

    clock.advance(STALE_SECONDS + 1)
    sent = await tip(service, ada, bob)

    (charge,) = charges.charges.values()
    assert store.state.tips[sent.id].charge_id == charge.id
    assert [call[0] for call in processor.calls] == [f"{ada.id}:key-1"] * 2
    assert await balance(service, ada) == (0, 500)


async def test_a_stale_owner_that_wakes_up_does_not_settle_twice(
    service: PaymentsService,
    store: FakePaymentStore,
    processor: RecordingProcessor,
    charges: FakeChargeStore,
    clock: Clock,
    ada: Person,
    bob: Person,
) -> None:
    """A retry that took over a slow owner's stale claim and the owner answer one tip, settled once."""
    processor.gate = asyncio.Event()
    slow_owner = asyncio.create_task(tip(service, ada, bob))

    async def charging(count: int) -> None:
        assert len(processor.calls) == count

    await eventually(lambda: charging(1))
    clock.advance(STALE_SECONDS + 1)
    retry = asyncio.create_task(tip(service, ada, bob))
    await eventually(lambda: charging(2))
    processor.gate.set()

    assert await slow_owner == await retry
    assert (len(charges.charges), len(store.state.tips), len(store.state.ledger)) == (1, 1, 1)


async def test_a_late_payment_for_a_stale_subscription_claim_extends_the_subscription(
    service: PaymentsService,
    store: FakePaymentStore,
    processor: RecordingProcessor,
    clock: Clock,
    ada: Person,
    bob: Person,
) -> None:
    """A stale claim lets another key subscribe; if the old one is paid after all, it adds a period."""
    await offer(service, bob)
    processor.gate = asyncio.Event()
    late = asyncio.create_task(subscribe(service, ada, bob, key="late"))

    async def late_is_charging() -> None:
        assert len(processor.calls) == 1

    await eventually(late_is_charging)
    gate, processor.gate = processor.gate, None
    clock.advance(STALE_SECONDS + 1)
    current = await subscribe(service, ada, bob, key="current")
    gate.set()
    extended = await late

    assert extended.id == current.id
    assert extended.current_period_end == current.current_period_end + SUBSCRIPTION_PERIOD
    assert len(store.state.subscriptions) == 1
    assert len(store.events_of(SubscriptionStarted)) == 1
    assert await balance(service, ada) == (0, 2 * PRICE)


# --- events consumed ------------------------------------------------------------------------


async def test_user_registered_opens_an_account_once(
    service: PaymentsService, store: FakePaymentStore, ada: Person
) -> None:
    """A user.registered event opens the user's account, and its redelivery changes nothing."""
    event_id = new_id()

    await service.open_account(event_id, ada.id, "ada")
    await service.open_account(event_id, ada.id, "renamed")

    assert store.state.accounts == {ada.id: "ada"}
    assert store.state.processed_events == {("payments", event_id)}


async def test_user_registered_handler_opens_the_account(
    service: PaymentsService, store: FakePaymentStore, ada: Person
) -> None:
    """The user.registered handler opens the new user's account under its handle."""
    registered = UserRegistered(id=ada.id, handle="ada", display_name="Ada", created_at=datetime.now(UTC))

    await events.handlers(service)[UserRegistered.TYPE](Event.of("users", registered))

    assert store.state.accounts == {ada.id: "ada"}


# --- the sandbox processor ------------------------------------------------------------------


async def test_sandbox_charges_a_key_once(charges: FakeChargeStore) -> None:
    """Charging twice with one key answers the same charge and keeps one."""
    sandbox = SandboxProcessor(charges)

    first = await sandbox.charge("k", CARD_OK, 500)
    again = await sandbox.charge("k", CARD_OK, 500)

    assert (again, first.status, list(charges.charges)) == (first, "succeeded", ["k"])


async def test_sandbox_declines_and_replays_the_decline(charges: FakeChargeStore) -> None:
    """pm_card_declined raises CardDeclined every time for its key, keeping one declined charge."""
    sandbox = SandboxProcessor(charges)

    for _ in range(2):
        with pytest.raises(CardDeclined):
            await sandbox.charge("k", CARD_DECLINED, 500)

    assert [c.status for c in charges.charges.values()] == ["declined"]


async def test_sandbox_slow_card_succeeds_after_its_delay(charges: FakeChargeStore) -> None:
    """pm_card_slow succeeds, taking at least its configured delay."""
    sandbox = SandboxProcessor(charges, slow_seconds=0.1)
    started = time.monotonic()

    charge = await sandbox.charge("k", CARD_SLOW, 500)

    assert charge.status == "succeeded"
    assert time.monotonic() - started >= 0.1


async def test_sandbox_refuses_unknown_methods(charges: FakeChargeStore) -> None:
    """Any other payment method is a 422 'unknown payment method', and no charge is kept."""
    with pytest.raises(InvalidRequest) as refused:
        await SandboxProcessor(charges).charge("k", "pm_card_visa", 500)

    assert "unknown payment method" in refused.value.message
    assert charges.charges == {}


async def test_sandbox_refuses_a_key_reused_for_another_charge(charges: FakeChargeStore) -> None:
    """A key reused for another amount raises IdempotencyKeyReused instead of charging."""
    sandbox = SandboxProcessor(charges)
    await sandbox.charge("k", CARD_OK, 500)

    with pytest.raises(IdempotencyKeyReused):
        await sandbox.charge("k", CARD_OK, 600)
