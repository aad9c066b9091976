"""The payments application layer: implements PaymentsApi over its store and a payment processor.

A money-moving request runs in three steps, so that no duplicate ever charges twice and no
database transaction is held while the processor works:

1. claim: in its own committed write transaction, check the request's rules and record its
   idempotency key as pending (or find the key's earlier result, or a claim in progress);
2. charge: ask the processor, outside any transaction, with a key derived from the request's;
3. settle: in one write transaction, record the result, the ledger entries, the subscription
   or tip and its event, provided the claim is still this request's.

A duplicate that finds the key pending polls until the result is recorded and answers it. A
claim left pending longer than `stale_after_seconds` (its process died) is taken over by the
next retry, which charges again with the same processor key: the processor answers the first
charge instead of making a second one.
"""

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError, model_validator

from threadline.platform.clock import utcnow
from threadline.platform.deadlines import remaining_seconds
from threadline.platform.errors import (
    Conflict,
    FieldError,
    InvalidRequest,
    ServiceError,
    ServiceUnavailable,
)
from threadline.platform.events import EventPayload
from threadline.platform.ids import new_id
from threadline.platform.invalid import require_batch_size
from threadline.platform.pagination import Page, PageRequest
from threadline.platform.tokens import Identity
from threadline.services.payments.api import (
    SERVICE,
    AlreadySubscribed,
    Balance,
    CannotPayOneself,
    CardDeclined,
    IdempotencyKey,
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
from threadline.services.payments.processor import Charge, PaymentProcessor

__all__ = [
    "IDEMPOTENCY_HEADER",
    "MAX_ENTITLEMENT_BATCH",
    "SUBSCRIPTION_PERIOD",
    "IdempotencyRecord",
    "LedgerEntry",
    "LedgerTransaction",
    "Outcome",
    "PaymentStore",
    "PaymentTransaction",
    "PaymentsService",
    "SubscriptionRecord",
    "TipRecord",
    "user_account",
]

CONSUMER = "payments"
IDEMPOTENCY_HEADER = "Idempotency-Key"
SUBSCRIPTION_PERIOD = timedelta(days=30)
MAX_ENTITLEMENT_BATCH = 1000

_IDEMPOTENCY_KEY: TypeAdapter[str] = TypeAdapter(IdempotencyKey)


def user_account(user_id: str) -> str:
    """The ledger account of a user."""
    return f"user:{user_id}"


class SubscriptionRecord(BaseModel):
    """A subscription as stored, with both parties' ids and handles."""

    id: str
    subscriber_id: str
    subscriber_handle: str
    creator_id: str
    creator_handle: str
    status: Literal["active", "canceled"]
    price_cents: int
    current_period_end: datetime
    created_at: datetime
    canceled_at: datetime | None = None

    def public(self) -> SubscriptionPublic:
        """The subscription as its subscriber sees it."""
        return SubscriptionPublic(
            id=self.id,
            creator=self.creator_handle,
            subscriber=self.subscriber_handle,
            status=self.status,
            price_cents=self.price_cents,
            current_period_end=self.current_period_end,
            created_at=self.created_at,
        )


class TipRecord(BaseModel):
    """A tip as stored, with the charge that paid it."""

    id: str
    from_id: str
    from_handle: str
    to_id: str
    to_handle: str
    amount_cents: int
    charge_id: str
    created_at: datetime

    def public(self) -> TipPublic:
        """The tip as its sender sees it."""
        return TipPublic(
            id=self.id,
            to=self.to_handle,
            from_=self.from_handle,
            amount_cents=self.amount_cents,
            created_at=self.created_at,
        )


class LedgerEntry(BaseModel):
    """One side of a money movement: an amount (negative = out of) on one account."""

    account: str
    amount_cents: int


class LedgerTransaction(BaseModel):
    """One money movement: balanced entries (they sum to zero), and what they paid for."""

    id: str
    kind: Literal["subscription", "tip"]
    reference_id: str
    charge_id: str
    created_at: datetime
    entries: list[LedgerEntry]

    @model_validator(mode="after")
    def _balanced(self) -> "LedgerTransaction":
        if len(self.entries) < 2 or sum(entry.amount_cents for entry in self.entries) != 0:
            raise ValueError("a ledger transaction needs two or more entries that sum to zero")
        return self


class Outcome(BaseModel):
    """The final answer to an idempotent request: its HTTP status and body (the API error shape
    for an error), and for an error the name of its class, so a replay raises the same kind."""

    status: int
    body: dict[str, Any]
    error_kind: str | None = None


class IdempotencyRecord(BaseModel):
    """One caller's use of one idempotency key: what was asked, who holds the claim, the outcome.

    `subject` names what at most one pending request may be paying for at a time (a
    subscription to one creator); `amount_cents` is the amount fixed when the key was claimed
    (0 for a request refused before any charge).
    """

    caller_id: str
    key: str
    operation: str
    fingerprint: str
    subject: str | None
    state: Literal["pending", "done"]
    claim_token: str
    claimed_at: datetime
    amount_cents: int
    outcome: Outcome | None = None


class PaymentTransaction(Protocol):
    """Reads and writes of the payments store inside one transaction."""

    async def open_account(self, user_id: str, handle: str) -> bool:
        """Open a user's ledger account, remembering the handle; False if it was open."""

    async def lock_account(self, user_id: str, handle: str) -> None:
        """Open the account if needed and lock it until the transaction ends."""

    async def price(self, user_id: str) -> int:
        """A creator's subscription price; 0 when not offered."""

    async def set_price(self, user_id: str, price_cents: int, at: datetime) -> None:
        """Store a creator's subscription price."""

    async def subscription(self, subscription_id: str) -> SubscriptionRecord | None:
        """One subscription, in any state."""

    async def active_subscription(self, subscriber_id: str, creator_id: str) -> SubscriptionRecord | None:
        """The active subscription of a subscriber to a creator, if any."""

    async def insert_subscription(self, subscription: SubscriptionRecord) -> None:
        """Store a new subscription (at most one active per subscriber and creator)."""

    async def update_subscription(self, subscription: SubscriptionRecord) -> None:
        """Store a subscription's new status, period end and cancel time."""

    async def subscriptions_of(
        self, subscriber_id: str, page: PageRequest
    ) -> tuple[list[SubscriptionRecord], str | None]:
        """A page of a subscriber's subscriptions, newest first, and the next cursor."""

    async def entitled_creators(self, subscriber_id: str, creator_ids: list[str]) -> set[str]:
        """Which of `creator_ids` the subscriber has an active subscription to."""

    async def insert_tip(self, tip: TipRecord) -> None:
        """Store a tip."""

    async def record_ledger(self, transaction: LedgerTransaction) -> None:
        """Store a balanced ledger transaction with its entries."""

    async def account_totals(self, account: str) -> tuple[int, int]:
        """The sum of an account's positive entries and minus the sum of its negative ones."""

    async def idempotency_record(self, caller_id: str, key: str) -> IdempotencyRecord | None:
        """A caller's record of an idempotency key."""

    async def insert_idempotency_record(self, record: IdempotencyRecord) -> bool:
        """Store a new record; False if the caller already has one for that key."""

    async def subject_in_flight(self, caller_id: str, subject: str, claimed_since: datetime) -> bool:
        """Whether a pending record about `subject`, claimed at or after `claimed_since`, exists."""

    async def take_over_claim(
        self, caller_id: str, key: str, stale_token: str, token: str, at: datetime
    ) -> bool:
        """Move a pending claim held under `stale_token` to `token`; False if it is not held so."""

    async def complete_claim(self, caller_id: str, key: str, token: str, outcome: Outcome) -> bool:
        """Record the outcome of a pending claim held under `token`; False if it is not held so."""

    async def release_claim(self, caller_id: str, key: str, token: str) -> None:
        """Forget a pending claim held under `token`, so the key can be claimed again."""

    async def emit(self, payload: EventPayload) -> object:
        """Publish an event when (and only if) this transaction commits."""

    async def claim_event(self, consumer: str, event_id: str) -> bool:
        """False if this event was handled before."""


class PaymentStore(Protocol):
    """The payments service's persistence port."""

    def write(self) -> AbstractAsyncContextManager[PaymentTransaction]:
        """A write transaction."""

    def read(self) -> AbstractAsyncContextManager[PaymentTransaction]:
        """A read-only transaction."""


@dataclass(frozen=True)
class _Request:
    """A money-moving request as the idempotency machinery sees it."""

    caller: Identity
    key: str
    operation: str
    fingerprint: str
    payment_method: str
    subject: str | None = None

    @property
    def processor_key(self) -> str:
        """The processor's idempotency key: the same for every attempt of this request."""
        return f"{self.caller.user_id}:{self.key}"


@dataclass(frozen=True)
class _Claim:
    token: str
    amount_cents: int


Prepare = Callable[[PaymentTransaction], Awaitable[int]]
Settle = Callable[[PaymentTransaction, Charge], Awaitable[BaseModel]]


class PaymentsService:
    """Prices, subscriptions, tips and the ledger, with idempotent charging through a processor."""

    def __init__(
        self,
        store: PaymentStore,
        processor: PaymentProcessor,
        *,
        now: Callable[[], datetime] | None = None,
        wait_seconds: float = 30.0,
        poll_seconds: float = 0.05,
        stale_after_seconds: float = 60.0,
        charge_timeout_seconds: float = 20.0,
    ) -> None:
        if charge_timeout_seconds >= stale_after_seconds:
            raise ValueError("a claim must outlive the charge it waits for: raise stale_after_seconds")
        self._store = store
        self._processor = processor
        self._clock: Callable[[], datetime] = now or utcnow
        self._wait_seconds = wait_seconds
        self._poll_seconds = poll_seconds
        self._stale_after = timedelta(seconds=stale_after_seconds)
        self._charge_timeout = charge_timeout_seconds
        self._settling: set[asyncio.Task[Outcome | None]] = set()

    async def set_price(self, identity: Identity, data: PriceSet) -> PriceSet:
        """Set the caller's subscription price (0 stops offering)."""
        async with self._store.write() as tx:
            await tx.open_account(identity.user_id, identity.handle)
            await tx.set_price(identity.user_id, data.price_cents, self._clock())
        return PriceSet(price_cents=data.price_cents)

    async def subscribe(
        self, identity: Identity, creator: Party, data: SubscriptionCreate, idempotency_key: str
    ) -> SubscriptionPublic:
        """Subscribe the caller to `creator`, charging the first period at once."""
        key = _checked_key(idempotency_key)
        _require_resolved("creator", data.creator, creator)
        if creator.id == identity.user_id:
            raise CannotPayOneself("you cannot subscribe to yourself")
        request = _Request(
            caller=identity,
            key=key,
            operation="subscribe",
            fingerprint=_fingerprint("subscribe", data, creator),
            payment_method=data.payment_method,
            subject=f"subscription:{creator.id}",
        )

        async def prepare(tx: PaymentTransaction) -> int:
            price = await tx.price(creator.id)
            if price == 0:
                raise NotOffered(f"{creator.handle} offers no subscription")
            if await tx.active_subscription(identity.user_id, creator.id) is not None:
                raise AlreadySubscribed(f"you are already subscribed to {creator.handle}")
            return price

        async def settle(tx: PaymentTransaction, charge: Charge) -> SubscriptionPublic:
            now = self._clock()
            subscription = await tx.active_subscription(identity.user_id, creator.id)
            if subscription is None:
                subscription = SubscriptionRecord(
                    id=new_id(),
                    subscriber_id=identity.user_id,
                    subscriber_handle=identity.handle,
                    creator_id=creator.id,
                    creator_handle=creator.handle,
                    status="active",
                    price_cents=charge.amount_cents,
                    current_period_end=now + SUBSCRIPTION_PERIOD,
                    created_at=now,
                )
                await tx.insert_subscription(subscription)
                await tx.emit(
                    SubscriptionStarted(
                        id=subscription.id,
                        creator_id=creator.id,
                        subscriber_id=identity.user_id,
                        price_cents=subscription.price_cents,
                        current_period_end=subscription.current_period_end,
                    )
                )
            else:
                # Only after another key took over this request's stale claim and subscribed
                # meanwhile: the money is taken by now, so it pays for one more period.
                subscription = subscription.model_copy(
                    update={
                        "current_period_end": max(now, subscription.current_period_end) + SUBSCRIPTION_PERIOD
                    }
                )
                await tx.update_subscription(subscription)
            await _move_money(tx, "subscription", subscription.id, charge, identity, creator, now)
            return subscription.public()

        body = await self._once(request, prepare, settle)
        return SubscriptionPublic.model_validate(body)

    async def cancel(self, identity: Identity, subscription_id: str) -> SubscriptionPublic:
        """Cancel one's own subscription; entitlement ends at once, canceling again changes nothing."""
        async with self._store.write() as tx:
            subscription = await tx.subscription(subscription_id)
            if subscription is None:
                raise SubscriptionNotFound(f"no subscription with id {subscription_id!r}")
            if subscription.subscriber_id != identity.user_id:
                raise NotSubscriber("only the subscriber can cancel this subscription")
            if subscription.status == "active":
                subscription = subscription.model_copy(
                    update={"status": "canceled", "canceled_at": self._clock()}
                )
                await tx.update_subscription(subscription)
                await tx.emit(
                    SubscriptionEnded(
                        id=subscription.id,
                        creator_id=subscription.creator_id,
                        subscriber_id=subscription.subscriber_id,
                    )
                )
        return subscription.public()

    async def my_subscriptions(self, identity: Identity, page: PageRequest) -> Page[SubscriptionPublic]:
        """The caller's subscriptions, active and canceled, newest first."""
        async with self._store.read() as tx:
            records, cursor = await tx.subscriptions_of(identity.user_id, page)
        return Page(items=[record.public() for record in records], next_cursor=cursor)

    async def tip(self, identity: Identity, to: Party, data: TipCreate, idempotency_key: str) -> TipPublic:
        """Send a tip; the same key with the same request answers the first result again."""
        key = _checked_key(idempotency_key)
        _require_resolved("to", data.to, to)
        if to.id == identity.user_id:
            raise CannotPayOneself("you cannot tip yourself")
        request = _Request(
            caller=identity,
            key=key,
            operation="tip",
            fingerprint=_fingerprint("tip", data, to),
            payment_method=data.payment_method,
        )

        async def prepare(_tx: PaymentTransaction) -> int:
            return data.amount_cents

        async def settle(tx: PaymentTransaction, charge: Charge) -> TipPublic:
            tip = TipRecord(
                id=new_id(),
                from_id=identity.user_id,
                from_handle=identity.handle,
                to_id=to.id,
                to_handle=to.handle,
                amount_cents=charge.amount_cents,
                charge_id=charge.id,
                created_at=self._clock(),
            )
            await tx.insert_tip(tip)
            await _move_money(tx, "tip", tip.id, charge, identity, to, tip.created_at)
            await tx.emit(
                TipSent(id=tip.id, from_id=tip.from_id, to_id=tip.to_id, amount_cents=tip.amount_cents)
            )
            return tip.public()

        body = await self._once(request, prepare, settle)
        return TipPublic.model_validate(body)

    async def balance(self, identity: Identity) -> Balance:
        """What the caller earned and spent, summed from the ledger."""
        async with self._store.read() as tx:
            earned, spent = await tx.account_totals(user_account(identity.user_id))
        return Balance(earned_cents=earned, spent_cents=spent)

    async def entitled_creators(self, subscriber_id: str, creator_ids: list[str]) -> list[str]:
        """Which of `creator_ids` `subscriber_id` has an active subscription to, in the order asked."""
        require_batch_size("creator_ids", creator_ids, MAX_ENTITLEMENT_BATCH)
        if not creator_ids:
            return []
        async with self._store.read() as tx:
            entitled = await tx.entitled_creators(subscriber_id, creator_ids)
        return [creator_id for creator_id in dict.fromkeys(creator_ids) if creator_id in entitled]

    async def open_account(self, event_id: str, user_id: str, handle: str) -> None:
        """Open a new user's ledger account (from user.registered), once per event."""
        async with self._store.write() as tx:
            if await tx.claim_event(CONSUMER, event_id):
                await tx.open_account(user_id, handle)

    async def _once(self, request: _Request, prepare: Prepare, settle: Settle) -> dict[str, Any]:
        """Run a money-moving request at most once per key; answer (or raise) its outcome."""
        deadline = time.monotonic() + remaining_seconds(self._wait_seconds)
        while True:
            step = await self._claim(request, prepare)
            if isinstance(step, _Claim):
                outcome = await self._settle_shielded(request, step, settle)
            elif isinstance(step, Outcome):
                outcome = step
            else:
                outcome = await self._wait(request, deadline)
            if outcome is not None:
                return _replay(outcome)

    async def _claim(self, request: _Request, prepare: Prepare) -> _Claim | Outcome | None:
        """Claim the key (a _Claim), find its outcome, or find it in progress (None)."""
        caller = request.caller
        now = self._clock()
        fresh_since = now - self._stale_after
        async with self._store.write() as tx:
            await tx.lock_account(caller.user_id, caller.handle)
            record = await tx.idempotency_record(caller.user_id, request.key)
            if record is not None:
                if record.fingerprint != request.fingerprint:
                    raise IdempotencyKeyReused(
                        f"this {IDEMPOTENCY_HEADER} was used before with a different request"
                    )
                if record.outcome is not None:
                    return record.outcome
                if record.claimed_at >= fresh_since:
                    return None
                token = new_id()
                if not await tx.take_over_claim(caller.user_id, request.key, record.claim_token, token, now):
                    return None
                return _Claim(token, record.amount_cents)
            if request.subject is not None and await tx.subject_in_flight(
                caller.user_id, request.subject, fresh_since
            ):
                raise AlreadySubscribed("a subscription to this creator is being paid for right now")
            token = new_id()
            pending = IdempotencyRecord(
                caller_id=caller.user_id,
                key=request.key,
                operation=request.operation,
                fingerprint=request.fingerprint,
                subject=request.subject,
                state="pending",
                claim_token=token,
                claimed_at=now,
                amount_cents=0,
            )
            try:
                amount = await prepare(tx)
            except ServiceError as error:
                outcome = _outcome_of(error)
                await tx.insert_idempotency_record(
                    pending.model_copy(update={"state": "done", "outcome": outcome})
                )
                return outcome
            await tx.insert_idempotency_record(pending.model_copy(update={"amount_cents": amount}))
            return _Claim(token, amount)

    async def _settle_shielded(self, request: _Request, claim: _Claim, settle: Settle) -> Outcome | None:
        # Once money may be moving, finish recording it even if the caller stops waiting, so a
        # retry with the same key finds the result instead of a claim it must wait out.
        task = asyncio.create_task(self._charge_and_settle(request, claim, settle))
        self._settling.add(task)
        task.add_done_callback(self._settled)
        return await asyncio.shield(task)

    def _settled(self, task: asyncio.Task[Outcome | None]) -> None:
        self._settling.discard(task)
        if not task.cancelled():
            task.exception()

    async def _charge_and_settle(self, request: _Request, claim: _Claim, settle: Settle) -> Outcome | None:
        """Charge outside any transaction, then record everything at once; None if the claim was lost."""
        caller = request.caller
        try:
            charge = await self._charge(request, claim)
        except ServiceUnavailable:
            await self._release(request, claim)
            raise
        except ServiceError as error:
            outcome = _outcome_of(error)
            async with self._store.write() as tx:
                won = await tx.complete_claim(caller.user_id, request.key, claim.token, outcome)
            return outcome if won else None
        except Exception:
            await self._release(request, claim)
            raise
        async with self._store.write() as tx:
            record = await tx.idempotency_record(caller.user_id, request.key)
            if record is None or record.state != "pending" or record.claim_token != claim.token:
                return None
            answer = await settle(tx, charge)
            outcome = Outcome(status=201, body=answer.model_dump(mode="json"))
            await tx.complete_claim(caller.user_id, request.key, claim.token, outcome)
        return outcome

    async def _charge(self, request: _Request, claim: _Claim) -> Charge:
        try:
            async with asyncio.timeout(self._charge_timeout):
                return await self._processor.charge(
                    request.processor_key, request.payment_method, claim.amount_cents
                )
        except TimeoutError as exc:
            raise ServiceUnavailable(
                SERVICE,
                f"the payment processor did not answer in time; retry with the same {IDEMPOTENCY_HEADER}",
            ) from exc

    async def _release(self, request: _Request, claim: _Claim) -> None:
        async with self._store.write() as tx:
            await tx.release_claim(request.caller.user_id, request.key, claim.token)

    async def _wait(self, request: _Request, deadline: float) -> Outcome | None:
        """Poll a key in progress until it has an outcome; None when it must be claimed again."""
        while time.monotonic() < deadline:
            await asyncio.sleep(self._poll_seconds)
            async with self._store.read() as tx:
                record = await tx.idempotency_record(request.caller.user_id, request.key)
            if record is None or record.fingerprint != request.fingerprint:
                return None
            if record.outcome is not None:
                return record.outcome
            if record.claimed_at < self._clock() - self._stale_after:
                return None
        raise Conflict(
            f"a request with this {IDEMPOTENCY_HEADER} is still being processed; retry it later",
            code="idempotency_key_in_use",
        )


async def _move_money(
    tx: PaymentTransaction,
    kind: Literal["subscription", "tip"],
    reference_id: str,
    charge: Charge,
    payer: Identity,
    payee: Party,
    at: datetime,
) -> None:
    await tx.open_account(payee.id, payee.handle)
    await tx.record_ledger(
        LedgerTransaction(
            id=new_id(),
            kind=kind,
            reference_id=reference_id,
            charge_id=charge.id,
            created_at=at,
            entries=[
                LedgerEntry(account=user_account(payer.user_id), amount_cents=-charge.amount_cents),
                LedgerEntry(account=user_account(payee.id), amount_cents=charge.amount_cents),
            ],
        )
    )


def _checked_key(key: str) -> str:
    try:
        return _IDEMPOTENCY_KEY.validate_python(key)
    except ValidationError:
        message = "must be 1 to 255 characters"
        raise InvalidRequest(
            f"{IDEMPOTENCY_HEADER}: {message}", [FieldError(IDEMPOTENCY_HEADER, message)]
        ) from None


def _require_resolved(field: str, handle: str, party: Party) -> None:
    if handle != party.handle:
        message = f"{handle!r} does not match the account it was resolved to ({party.handle!r})"
        raise InvalidRequest(f"{field}: {message}", [FieldError(field, message)])


def _fingerprint(operation: str, data: BaseModel, party: Party) -> str:
    document = {"operation": operation, "body": data.model_dump(mode="json"), "party": party.id}
    return hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).hexdigest()


_REPLAYED_ERRORS: dict[str, type[ServiceError]] = {
    kind.__name__: kind
    for kind in (
        AlreadySubscribed,
        CannotPayOneself,
        CardDeclined,
        Conflict,
        IdempotencyKeyReused,
        InvalidRequest,
        NotOffered,
    )
}


def _outcome_of(error: ServiceError) -> Outcome:
    return Outcome(status=error.status, body=error.body(), error_kind=type(error).__name__)


def _replay(outcome: Outcome) -> dict[str, Any]:
    """The body of a successful outcome; for an error, raise it again as the same kind."""
    if outcome.status < 400:
        return outcome.body
    error = outcome.body["error"]
    kind = _REPLAYED_ERRORS.get(outcome.error_kind or "", ServiceError)
    if issubclass(kind, InvalidRequest):
        fields = [FieldError(f["field"], f["message"]) for f in error.get("fields", [])]
        raise kind(error["message"], fields, code=error["code"], status=outcome.status)
    raise kind(error["message"], code=error["code"], status=outcome.status)
