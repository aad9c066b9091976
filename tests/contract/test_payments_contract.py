"""PaymentsApi behaves the same through the local and the HTTP adapter, on a real SQLite database."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa

from tests.support.polling import eventually
from tests.support.servers import serving
from tests.support.tokens import Signer
from threadline.platform.component import Component
from threadline.platform.errors import ServiceError
from threadline.platform.http_pool import HttpSession
from threadline.platform.ids import new_id
from threadline.platform.pagination import PageRequest
from threadline.platform.settings import Settings
from threadline.platform.tokens import Identity, TokenVerifier
from threadline.platform.web import create_app
from threadline.services.payments import app
from threadline.services.payments.api import (
    SERVICE,
    Party,
    PaymentsApi,
    PriceSet,
    SubscriptionCreate,
    SubscriptionPublic,
    TipCreate,
    TipPublic,
)
from threadline.services.payments.http import PaymentsClient
from threadline.services.payments.processor import CARD_DECLINED, CARD_OK, CARD_SLOW
from threadline.services.payments.store import idempotency_records, ledger_entries, sandbox_charges

PRICE = 900


@dataclass(frozen=True)
class Person:
    """An account as a verified caller and as the party a gateway resolves its handle to."""

    identity: Identity
    party: Party


@dataclass
class Payments:
    """The payments service as one caller reaches it, through one kind of adapter."""

    kind: str
    api: PaymentsApi
    component: Component
    signer: Signer
    verifier: TokenVerifier

    async def person(self, handle: str) -> Person:
        """A new account with a verified token."""
        user_id = new_id()
        identity = await self.verifier.verify(self.signer.token(user_id, handle))
        return Person(identity, Party(id=user_id, handle=handle))

    async def offer(self, creator: Person, price: int = PRICE) -> None:
        """Make `creator` offer subscriptions at `price`."""
        await self.api.set_price(creator.identity, PriceSet(price_cents=price))

    async def subscribe(
        self, who: Person, creator: Person, key: str = "key-1", method: str = CARD_OK
    ) -> SubscriptionPublic:
        """Subscribe `who` to `creator`."""
        data = SubscriptionCreate(creator=creator.party.handle, payment_method=method)
        return await self.api.subscribe(who.identity, creator.party, data, key)

    async def tip(
        self, who: Person, to: Person, amount: int = 500, key: str = "key-1", method: str = CARD_OK
    ) -> TipPublic:
        """Tip `to` from `who`."""
        data = TipCreate(to=to.party.handle, amount_cents=amount, payment_method=method)
        return await self.api.tip(who.identity, to.party, data, key)

    async def balance(self, who: Person) -> tuple[int, int]:
        """`who`'s (earned, spent) cents."""
        found = await self.api.balance(who.identity)
        return found.earned_cents, found.spent_cents

    async def charges_made(self) -> int:
        """How many charges the sandbox processor keeps."""
        async with self.component.database.read() as conn:
            return int(await conn.scalar(sa.select(sa.func.count()).select_from(sandbox_charges)) or 0)

    async def pending_claims(self) -> int:
        """How many idempotency keys are claimed and not yet settled."""
        async with self.component.database.read() as conn:
            pending = sa.select(sa.func.count()).where(idempotency_records.c.state == "pending")
            return int(await conn.scalar(pending) or 0)


async def refused(call: Any) -> ServiceError:
    """The ServiceError an awaitable raises (either adapter raises one with status and code)."""
    with pytest.raises(ServiceError) as caught:
        await call
    return caught.value


@pytest.fixture
async def component(monolith_settings: Settings) -> AsyncIterator[Component]:
    """The payments component on a fresh database; afterwards its ledger must balance."""
    component = app.build(monolith_settings)
    await component.database.open(component.migrations)
    yield component
    async with component.database.read() as conn:
        total = await conn.scalar(sa.select(sa.func.coalesce(sa.func.sum(ledger_entries.c.amount_cents), 0)))
        unbalanced = (
            await conn.execute(
                sa.select(ledger_entries.c.transaction_id)
                .group_by(ledger_entries.c.transaction_id)
                .having(sa.func.sum(ledger_entries.c.amount_cents) != 0)
            )
        ).all()
    await component.database.close()
    assert (total, unbalanced) == (0, [])


@pytest.fixture
def signer() -> Signer:
    return Signer()


@asynccontextmanager
async def served(component: Component, verifier: TokenVerifier) -> AsyncIterator[str]:
    """The payments router in an app of its own on a real loopback socket; yields the base URL."""
    web = create_app(
        title="threadline payments",
        routers=[component.router],
        readiness={"payments_database": component.database.ping},
        token_verifier=verifier,
    )
    async with serving(web) as url:
        yield url


@pytest.fixture(params=["local", "http"])
async def payments(
    request: pytest.FixtureRequest, component: Component, signer: Signer
) -> AsyncIterator[Payments]:
    """The application object itself, or PaymentsClient over HTTP against its router."""
    verifier = TokenVerifier(signer.jwks)
    if request.param == "local":
        yield Payments("local", component.service, component, signer, verifier)
        return
    session = HttpSession()
    async with served(component, verifier) as url:
        yield Payments("http", PaymentsClient(SERVICE, url, session), component, signer, verifier)
    await session.close()


async def test_subscribe_list_and_cancel(payments: Payments) -> None:
    """A subscription starts active for 30 days, entitles, is listed and moves money; cancel ends it."""
    ann, bob = await payments.person("ann"), await payments.person("bob")
    await payments.offer(bob)

    sub = await payments.subscribe(ann, bob)

    assert (sub.creator, sub.subscriber, sub.status, sub.price_cents) == ("bob", "ann", "active", PRICE)
    assert abs((sub.current_period_end - sub.created_at).days - 30) <= 1
    assert await payments.api.entitled_creators(ann.party.id, [bob.party.id]) == [bob.party.id]
    assert (await payments.api.my_subscriptions(ann.identity, PageRequest())).items == [sub]
    assert (await payments.balance(ann), await payments.balance(bob)) == ((0, PRICE), (PRICE, 0))
    canceled = await payments.api.cancel(ann.identity, sub.id)
    assert canceled == sub.model_copy(update={"status": "canceled"})
    assert await payments.api.entitled_creators(ann.party.id, [bob.party.id]) == []


async def test_subscription_rules(payments: Payments) -> None:
    """Self and not-offered are 422 invalid_request; a second subscription is 409 already_subscribed."""
    ann, bob, cid = await payments.person("ann"), await payments.person("bob"), await payments.person("cid")
    await payments.offer(bob)
    await payments.subscribe(ann, bob, key="first")

    myself = await refused(payments.subscribe(bob, bob, key="self"))
    not_offered = await refused(payments.subscribe(ann, cid, key="none"))
    again = await refused(payments.subscribe(ann, bob, key="second"))

    assert (myself.status, myself.code) == (422, "invalid_request")
    assert (not_offered.status, not_offered.code) == (422, "invalid_request")
    assert (again.status, again.code) == (409, "already_subscribed")
    assert await payments.balance(ann) == (0, PRICE)


async def test_declined_card_is_402_moves_nothing_and_replays(payments: Payments) -> None:
    """A declined card is 402 card_declined, again for its key, moving no money and listing nothing."""
    ann, bob = await payments.person("ann"), await payments.person("bob")
    await payments.offer(bob)

    first = await refused(payments.subscribe(ann, bob, method=CARD_DECLINED))
    again = await refused(payments.subscribe(ann, bob, method=CARD_DECLINED))

    assert (first.status, first.code) == (again.status, again.code) == (402, "card_declined")
    assert first.message == again.message
    assert await payments.balance(ann) == (0, 0)
    assert (await payments.api.my_subscriptions(ann.identity, PageRequest())).items == []


async def test_unknown_payment_method_is_422(payments: Payments) -> None:
    """A payment method the sandbox does not know is 422 invalid_request 'unknown payment method'."""
    ann, bob = await payments.person("ann"), await payments.person("bob")

    error = await refused(payments.tip(ann, bob, method="pm_card_visa"))

    assert (error.status, error.code) == (422, "invalid_request")
    assert "unknown payment method" in error.message


async def test_only_the_subscriber_cancels(payments: Payments) -> None:
    """Canceling someone else's subscription is 403 not_subscriber; an unknown one is 404."""
    ann, bob = await payments.person("ann"), await payments.person("bob")
    await payments.offer(bob)
    sub = await payments.subscribe(ann, bob)

    other = await refused(payments.api.cancel(bob.identity, sub.id))
    unknown = await refused(payments.api.cancel(ann.identity, "no-such-subscription"))

    assert (other.status, other.code) == (403, "not_subscriber")
    assert (unknown.status, unknown.code) == (404, "subscription_not_found")


async def test_tip_moves_money(payments: Payments) -> None:
    """A tip answers from/to handles and moves its amount; tipping oneself is 422."""
    ann, bob = await payments.person("ann"), await payments.person("bob")

    sent = await payments.tip(ann, bob, 700)
    myself = await refused(payments.tip(ann, ann, key="self"))

    assert (sent.from_, sent.to, sent.amount_cents, sent.status) == ("ann", "bob", 700, "succeeded")
    assert (await payments.balance(ann), await payments.balance(bob)) == ((0, 700), (700, 0))
    assert (myself.status, myself.code) == (422, "invalid_request")


async def test_replay_is_identical_and_a_reused_key_is_409(payments: Payments) -> None:
    """The same key and body answer the identical tip; another body under it is 409; money moves once."""
    ann, bob = await payments.person("ann"), await payments.person("bob")

    first = await payments.tip(ann, bob, 500)
    again = await payments.tip(ann, bob, 500)
    reused = await refused(payments.tip(ann, bob, 600))

    assert again.model_dump(mode="json") == first.model_dump(mode="json")
    assert (reused.status, reused.code) == (409, "idempotency_key_reused")
    assert (await payments.balance(ann), await payments.charges_made()) == ((0, 500), 1)


async def test_concurrent_duplicates_charge_once(payments: Payments) -> None:
    """Twenty identical slow-card tips sent at once with one key charge once and all answer the same tip."""
    ann, bob = await payments.person("ann"), await payments.person("bob")

    answers = await asyncio.gather(*(payments.tip(ann, bob, method=CARD_SLOW) for _ in range(20)))

    assert {a.model_dump_json() for a in answers} == {answers[0].model_dump_json()}
    assert (await payments.balance(ann), await payments.charges_made()) == ((0, 500), 1)


async def test_a_slow_charge_holds_no_database_lock(payments: Payments) -> None:
    """While a slow-card tip is being charged, its key is claimed and other writes complete at once."""
    ann, bob = await payments.person("ann"), await payments.person("bob")
    charging = asyncio.create_task(payments.tip(ann, bob, method=CARD_SLOW))

    async def claimed() -> None:
        assert await payments.pending_claims() == 1

    await eventually(claimed)
    await payments.offer(bob)

    assert not charging.done()
    await charging
    assert await payments.pending_claims() == 0


async def test_idempotency_key_out_of_bounds_is_422(payments: Payments) -> None:
    """An empty idempotency key, or one over 255 characters, is 422 and moves nothing."""
    ann, bob = await payments.person("ann"), await payments.person("bob")

    for key in ("", "k" * 256):
        error = await refused(payments.tip(ann, bob, key=key))
        assert (error.status, error.code) == (422, "invalid_request")

    assert await payments.charges_made() == 0


async def test_my_subscriptions_page_newest_first(payments: Payments) -> None:
    """Subscriptions page by cursor, newest first, each once."""
    ann = await payments.person("ann")
    made = []
    for i in range(3):
        creator = await payments.person(f"creator_{i}")
        await payments.offer(creator)
        made.append(await payments.subscribe(ann, creator, key=f"key-{i}"))

    first = await payments.api.my_subscriptions(ann.identity, PageRequest(limit=2))
    rest = await payments.api.my_subscriptions(ann.identity, PageRequest(limit=2, cursor=first.next_cursor))

    assert [s.id for s in first.items + rest.items] == [s.id for s in reversed(made)]
    assert rest.next_cursor is None


async def test_entitled_creators_keeps_the_order_asked(payments: Payments) -> None:
    """Entitlement answers the asked creators with an active subscription, in the order asked, once each."""
    ann, bob, cid, dan = [await payments.person(h) for h in ("ann", "bob", "cid", "dan")]
    for i, creator in enumerate((bob, cid)):
        await payments.offer(creator)
        await payments.subscribe(ann, creator, key=f"key-{i}")

    asked = [dan.party.id, cid.party.id, "unknown", bob.party.id, cid.party.id]

    assert await payments.api.entitled_creators(ann.party.id, asked) == [cid.party.id, bob.party.id]
    assert await payments.api.entitled_creators(ann.party.id, []) == []


async def test_http_routes_refuse_bad_requests(component: Component, signer: Signer) -> None:
    """Over HTTP: no token is 401, a money-moving POST without Idempotency-Key is 422, bad amounts are 422."""
    verifier = TokenVerifier(signer.jwks)
    ann, bob = (new_id(), "ann"), (new_id(), "bob")
    auth = {"Authorization": f"Bearer {signer.token(*ann)}"}

    def tip(amount_cents: int) -> dict[str, Any]:
        data = {"to": "bob", "amount_cents": amount_cents, "payment_method": CARD_OK}
        return {"to": {"id": bob[0], "handle": "bob"}, "data": data}

    async with served(component, verifier) as url, aiohttp.ClientSession(base_url=url) as http:
        async with http.post("/payments/tips", json=tip(500), headers={"Idempotency-Key": "k"}) as anonymous:
            assert anonymous.status == 401
        async with http.post("/payments/tips", json=tip(500), headers=auth) as keyless:
            assert keyless.status == 422
            body = await keyless.json()
            assert body["error"]["code"] == "invalid_request"
            assert body["error"]["fields"][0]["field"] == "Idempotency-Key"
        async with http.post(
            "/payments/tips", json=tip(99), headers={**auth, "Idempotency-Key": "k"}
        ) as small:
            assert (small.status, (await small.json())["error"]["code"]) == (422, "invalid_request")
        async with http.put("/payments/me/price", json={"price_cents": 50}, headers=auth) as price:
            assert (price.status, (await price.json())["error"]["code"]) == (422, "invalid_request")
