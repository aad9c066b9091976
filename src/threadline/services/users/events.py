"""Handlers for the events the users service consumes: none, it is the source of its data."""

from threadline.platform.events import EventHandler
from threadline.services.users.service import UsersService

__all__ = ["handlers"]


def handlers(_service: UsersService) -> dict[str, EventHandler]:
    """Event type -> handler; users consumes no events."""
    return {}
