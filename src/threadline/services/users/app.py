"""The users service's composition root: built from settings and the adapters it is given."""

from threadline.platform.component import Component
from threadline.platform.db import Database
from threadline.platform.settings import Settings
from threadline.services.users import events
from threadline.services.users.api import SERVICE
from threadline.services.users.http import build_router
from threadline.services.users.service import UsersService
from threadline.services.users.store import MIGRATIONS, SqlUserStore

__all__ = ["build"]


def build(settings: Settings) -> Component:
    """Build the users service from settings."""
    database = Database(settings.database_url(SERVICE))
    service = UsersService(
        SqlUserStore(database, secret_key=settings.secret_key),
        token_ttl_seconds=settings.access_token_ttl_seconds,
    )
    return Component(
        name=SERVICE,
        service=service,
        database=database,
        migrations=[MIGRATIONS],
        router=build_router(service),
        handlers=events.handlers(service),
    )
