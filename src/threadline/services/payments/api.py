"""The payments service contract: its operations, models, events and public errors."""

from datetime import datetime
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from threadline.platform.errors import Conflict, Forbidden, InvalidRequest, NotFound, PaymentRequired
from threadline.platform.events import EventPayload
from threadline.platform.pagination import Page, PageRequest
from threadline.platform.tokens import Identity

__all__ = [
    "MAX_AMOUNT_CENTS",
    "MIN_AMOUNT_CENTS",
    "SERVICE",
    "AlreadySubscribed",
    "Balance",
    "CannotPayOneself",
    "CardDeclined",
    "IdempotencyKey",
    "IdempotencyKeyReused",
    "NotOffered",
    "NotSubscriber",
    "Party",
    "PaymentsApi",
    "PriceSet",
    "SubscriptionCreate",
    "SubscriptionEnded",
    "SubscriptionNotFound",
    "SubscriptionPublic",
    "SubscriptionStarted",
    "TipCreate",
    "TipPublic",
    "TipSent",
]

SERVICE = "payments"
MIN_AMOUNT_CENTS = 100
MAX_AMOUNT_CENTS = 100_000

IdempotencyKey = Annotated[str, StringConstraints(min_length=1, max_length=255)]
PaymentMethod = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Cents = Annotated[int, Field(ge=MIN_AMOUNT_CENTS, le=MAX_AMOUNT_CENTS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Party(BaseModel):
    """An account on one side of a payment, as resolved by the caller (id and handle)."""

    id: str
    handle: str


class PriceSet(_Strict):
    """A creator's monthly subscription price: 100 to 100000 cents, or 0 to stop offering."""

    price_cents: Annotated[int, Field(ge=0, le=MAX_AMOUNT_CENTS)]

    @field_validator("price_cents")
    @classmethod
    def _zero_or_in_range(cls, value: int) -> int:
        if 0 < value < MIN_AMOUNT_CENTS:
            raise ValueError(f"must be 0 (not offered) or between {MIN_AMOUNT_CENTS} and {MAX_AMOUNT_CENTS}")
        return value


class SubscriptionCreate(_Strict):
    """Subscribe to `creator` (a handle), paying with a payment method token."""

    creator: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    payment_method: PaymentMethod


class SubscriptionPublic(BaseModel):
    """A subscription; `creator` and `subscriber` are handles."""

    id: str
    creator: str
    subscriber: str
    status: Literal["active", "canceled"]
    price_cents: int
    current_period_end: datetime
    created_at: datetime


class TipCreate(_Strict):
    """A one-off payment to `to` (a handle)."""

    to: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    amount_cents: Cents
    payment_method: PaymentMethod


class TipPublic(BaseModel):
    """A tip that went through; `to` and `from` are handles."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    id: str
    to: str
    from_: str = Field(alias="from")
    amount_cents: int
    status: Literal["succeeded"] = "succeeded"
    created_at: datetime


class Balance(BaseModel):
    """What an account earned and spent, derived from the ledger."""

    earned_cents: int
    spent_cents: int


class SubscriptionStarted(EventPayload):
    """A subscription became active and its first period was paid."""

    TYPE = "subscription.started"
    id: str
    creator_id: str
    subscriber_id: str
    price_cents: int
    current_period_end: datetime


class SubscriptionEnded(EventPayload):
    """A subscription was canceled."""

    TYPE = "subscription.ended"
    id: str
    creator_id: str
    subscriber_id: str


class TipSent(EventPayload):
    """A tip moved money from one account to another."""

    TYPE = "tip.sent"
    id: str
    from_id: str
    to_id: str
    amount_cents: int


class CardDeclined(PaymentRequired):
    """The payment method was declined; no money moved."""

    code = "card_declined"


class AlreadySubscribed(Conflict):
    """An active subscription to this creator exists."""

    code = "already_subscribed"


class IdempotencyKeyReused(Conflict):
    """The idempotency key was used before with a different request."""

    code = "idempotency_key_reused"


class NotOffered(InvalidRequest):
    """The creator offers no subscription."""


class CannotPayOneself(InvalidRequest):
    """Subscribing or tipping oneself."""


class SubscriptionNotFound(NotFound):
    """No such subscription."""

    code = "subscription_not_found"


class NotSubscriber(Forbidden):
    """Only the subscriber may cancel a subscription."""

    code = "not_subscriber"


class PaymentsApi(Protocol):
    """What the payments service offers to the gateway and to other services."""

    async def set_price(self, identity: Identity, data: PriceSet) -> PriceSet:
        """Set the caller's subscription price (0 stops offering)."""

    async def subscribe(
        self, identity: Identity, creator: Party, data: SubscriptionCreate, idempotency_key: str
    ) -> SubscriptionPublic:
        """Subscribe the caller to `creator`, charging the first period at once.

        Raises CardDeclined, AlreadySubscribed, NotOffered, CannotPayOneself, IdempotencyKeyReused.
        The same key with the same request returns (or raises) the first result again.
        """

    async def cancel(self, identity: Identity, subscription_id: str) -> SubscriptionPublic:
        """Cancel one's own subscription; raises SubscriptionNotFound, NotSubscriber."""

    async def my_subscriptions(self, identity: Identity, page: PageRequest) -> Page[SubscriptionPublic]:
        """The caller's subscriptions, newest first."""

    async def tip(self, identity: Identity, to: Party, data: TipCreate, idempotency_key: str) -> TipPublic:
        """Send a tip; same idempotency rules as `subscribe`."""

    async def balance(self, identity: Identity) -> Balance:
        """What the caller earned and spent."""

    async def entitled_creators(self, subscriber_id: str, creator_ids: list[str]) -> list[str]:
        """Which of `creator_ids` `subscriber_id` has an active subscription to."""
