"""The payment processor port, and the sandbox processor that stands in for a card network's test mode."""

import asyncio
from datetime import datetime
from typing import Literal, Protocol

from pydantic import BaseModel

from threadline.platform.clock import utcnow
from threadline.platform.errors import FieldError, InvalidRequest
from threadline.platform.ids import new_id
from threadline.services.payments.api import CardDeclined, IdempotencyKeyReused

__all__ = [
    "CARD_DECLINED",
    "CARD_OK",
    "CARD_SLOW",
    "Charge",
    "ChargeStore",
    "PaymentProcessor",
    "SandboxProcessor",
]

CARD_OK = "pm_card_ok"
CARD_DECLINED = "pm_card_declined"
CARD_SLOW = "pm_card_slow"
PAYMENT_METHODS = frozenset({CARD_OK, CARD_DECLINED, CARD_SLOW})


class Charge(BaseModel):
    """One attempt to take money from a payment method, as the processor keeps it."""

    id: str
    idempotency_key: str
    payment_method: str
    amount_cents: int
    status: Literal["succeeded", "declined"]
    created_at: datetime


class PaymentProcessor(Protocol):
    """Takes money from payment methods; a repeated idempotency key never charges twice."""

    async def charge(self, idempotency_key: str, payment_method: str, amount_cents: int) -> Charge:
        """Charge once per key and answer the same charge for a repeat.

        Raises CardDeclined (also for a repeat of a declined key), InvalidRequest for an
        unknown payment method, and ServiceUnavailable when the processor cannot be reached.
        """


class ChargeStore(Protocol):
    """Where the sandbox processor keeps its charges by idempotency key."""

    async def find(self, idempotency_key: str) -> Charge | None:
        """The charge made with this key, if any."""

    async def save(self, charge: Charge) -> Charge:
        """Keep a charge unless one with its key exists; returns the charge kept for the key."""


class SandboxProcessor:
    """A processor in test mode: `pm_card_ok` succeeds, `pm_card_declined` is declined,
    `pm_card_slow` succeeds after `slow_seconds`; any other method is refused."""

    def __init__(self, charges: ChargeStore, *, slow_seconds: float = 1.5) -> None:
        self._charges = charges
        self._slow_seconds = slow_seconds

    async def charge(self, idempotency_key: str, payment_method: str, amount_cents: int) -> Charge:
        """Charge once per key; a repeat answers the first charge, or its decline, again."""
        if payment_method not in PAYMENT_METHODS:
            message = f"unknown payment method {payment_method!r}"
            raise InvalidRequest(message, [FieldError("payment_method", "unknown payment method")])
        charge = await self._charges.find(idempotency_key)
        if charge is None:
            if payment_method == CARD_SLOW:
                await asyncio.sleep(self._slow_seconds)
            charge = await self._charges.save(
                Charge(
                    id=new_id(),
                    idempotency_key=idempotency_key,
                    payment_method=payment_method,
                    amount_cents=amount_cents,
                    status="declined" if payment_method == CARD_DECLINED else "succeeded",
                    created_at=utcnow(),
                )
            )
        if (charge.payment_method, charge.amount_cents) != (payment_method, amount_cents):
            raise IdempotencyKeyReused("this idempotency key was used for a different charge")
        if charge.status == "declined":
            raise CardDeclined("the card was declined; no money moved")
        return charge
