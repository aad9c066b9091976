"""The payments service over HTTP: its internal routes, and the client adapter for other processes.

Money-moving POSTs carry the idempotency key in the `Idempotency-Key` header and the party the
caller resolved (creator or recipient) in the body, next to the public request body.
"""

from typing import Annotated

from fastapi import APIRouter, Header
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from threadline.platform.callers import Caller
from threadline.platform.http_client import ServiceClient
from threadline.platform.pagination import Page, PageRequest, Paging
from threadline.platform.tokens import Identity
from threadline.services.payments.api import (
    SERVICE,
    Balance,
    Party,
    PaymentsApi,
    PriceSet,
    SubscriptionCreate,
    SubscriptionPublic,
    TipCreate,
    TipPublic,
)
from threadline.services.payments.service import IDEMPOTENCY_HEADER, MAX_ENTITLEMENT_BATCH

__all__ = [
    "EntitlementQuery",
    "Entitlements",
    "PaymentsClient",
    "SubscriptionOrder",
    "TipOrder",
    "build_router",
]

PREFIX = f"/{SERVICE}"

IdempotencyKeyHeader = Annotated[str | None, Header(alias=IDEMPOTENCY_HEADER)]


class SubscriptionOrder(BaseModel):
    """A subscription request with the creator the caller resolved its handle to."""

    model_config = ConfigDict(extra="forbid")

    creator: Party
    data: SubscriptionCreate


class TipOrder(BaseModel):
    """A tip request with the recipient the caller resolved its handle to."""

    model_config = ConfigDict(extra="forbid")

    to: Party
    data: TipCreate


class EntitlementQuery(BaseModel):
    """Which of these creators does this subscriber have an active subscription to?"""

    model_config = ConfigDict(extra="forbid")

    subscriber_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    creator_ids: list[str] = Field(max_length=MAX_ENTITLEMENT_BATCH)


class Entitlements(BaseModel):
    """The creators of a query the subscriber is entitled to, in the order asked."""

    creator_ids: list[str]


def build_router(service: PaymentsApi) -> APIRouter:
    """Internal routes, one per PaymentsApi operation."""
    router = APIRouter(prefix=PREFIX)

    @router.put("/me/price")
    async def set_price(identity: Caller, data: PriceSet) -> PriceSet:
        return await service.set_price(identity, data)

    @router.post("/subscriptions", status_code=201)
    async def subscribe(
        identity: Caller, order: SubscriptionOrder, idempotency_key: IdempotencyKeyHeader = None
    ) -> SubscriptionPublic:
        return await service.subscribe(identity, order.creator, order.data, idempotency_key or "")

    @router.delete("/subscriptions/{subscription_id}")
    async def cancel(identity: Caller, subscription_id: str) -> SubscriptionPublic:
        return await service.cancel(identity, subscription_id)

    @router.get("/me/subscriptions")
    async def my_subscriptions(identity: Caller, page: Paging) -> Page[SubscriptionPublic]:
        return await service.my_subscriptions(identity, page)

    @router.post("/tips", status_code=201)
    async def tip(
        identity: Caller, order: TipOrder, idempotency_key: IdempotencyKeyHeader = None
    ) -> TipPublic:
        return await service.tip(identity, order.to, order.data, idempotency_key or "")

    @router.get("/me/balance")
    async def balance(identity: Caller) -> Balance:
        return await service.balance(identity)

    @router.post("/entitlements")
    async def entitled_creators(query: EntitlementQuery) -> Entitlements:
        return Entitlements(
            creator_ids=await service.entitled_creators(query.subscriber_id, query.creator_ids)
        )

    return router


class PaymentsClient(ServiceClient):
    """PaymentsApi for callers in another process; money-moving calls are retried under their key."""

    async def set_price(self, identity: Identity, data: PriceSet) -> PriceSet:
        """Set the caller's subscription price."""
        return await self.call_for(
            PriceSet, "PUT", f"{PREFIX}/me/price", json=data.model_dump(), token=identity.token
        )

    async def subscribe(
        self, identity: Identity, creator: Party, data: SubscriptionCreate, idempotency_key: str
    ) -> SubscriptionPublic:
        """Subscribe the caller to `creator`."""
        order = SubscriptionOrder(creator=creator, data=data)
        return await self.call_for(
            SubscriptionPublic,
            "POST",
            f"{PREFIX}/subscriptions",
            json=order.model_dump(mode="json"),
            token=identity.token,
            headers={IDEMPOTENCY_HEADER: idempotency_key},
            idempotent=True,
        )

    async def cancel(self, identity: Identity, subscription_id: str) -> SubscriptionPublic:
        """Cancel one's own subscription."""
        return await self.call_for(
            SubscriptionPublic, "DELETE", f"{PREFIX}/subscriptions/{subscription_id}", token=identity.token
        )

    async def my_subscriptions(self, identity: Identity, page: PageRequest) -> Page[SubscriptionPublic]:
        """The caller's subscriptions, newest first."""
        return await self.call_for(
            Page[SubscriptionPublic],
            "GET",
            f"{PREFIX}/me/subscriptions",
            params=page.model_dump(exclude_none=True),
            token=identity.token,
        )

    async def tip(self, identity: Identity, to: Party, data: TipCreate, idempotency_key: str) -> TipPublic:
        """Send a tip."""
        order = TipOrder(to=to, data=data)
        return await self.call_for(
            TipPublic,
            "POST",
            f"{PREFIX}/tips",
            json=order.model_dump(mode="json"),
            token=identity.token,
            headers={IDEMPOTENCY_HEADER: idempotency_key},
            idempotent=True,
        )

    async def balance(self, identity: Identity) -> Balance:
        """What the caller earned and spent."""
        return await self.call_for(Balance, "GET", f"{PREFIX}/me/balance", token=identity.token)

    async def entitled_creators(self, subscriber_id: str, creator_ids: list[str]) -> list[str]:
        """Which of `creator_ids` `subscriber_id` has an active subscription to."""
        query = EntitlementQuery(subscriber_id=subscriber_id, creator_ids=creator_ids)
        answer = await self.call_for(
            Entitlements, "POST", f"{PREFIX}/entitlements", json=query.model_dump(), idempotent=True
        )
        return answer.creator_ids
