"""Handlers for the events the payments service consumes: new users get a ledger account."""

from threadline.platform.events import Event, EventHandler
from threadline.services.payments.service import PaymentsService
from threadline.services.users.api import UserRegistered

__all__ = ["handlers"]


def handlers(service: PaymentsService) -> dict[str, EventHandler]:
    """Event type -> handler."""

    async def on_user_registered(event: Event) -> None:
        user = UserRegistered.model_validate(event.data)
        await service.open_account(event.id, user.id, user.handle)

    return {UserRegistered.TYPE: on_user_registered}
