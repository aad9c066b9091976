"""The posts service's composition root: built from settings and the adapters it is given."""

from threadline.platform.component import Component
from threadline.platform.db import Database
from threadline.platform.settings import Settings
from threadline.services.payments.api import PaymentsApi
from threadline.services.posts import events
from threadline.services.posts.api import SERVICE
from threadline.services.posts.http import build_router
from threadline.services.posts.service import PostsService
from threadline.services.posts.store import MIGRATIONS, SqlPostStore

__all__ = ["build"]


def build(settings: Settings, *, payments: PaymentsApi) -> Component:
    """Build the posts service from settings and the payments adapter it checks entitlement with."""
    database = Database(settings.database_url(SERVICE))
    service = PostsService(SqlPostStore(database), payments)
    return Component(
        name=SERVICE,
        service=service,
        database=database,
        migrations=[MIGRATIONS],
        router=build_router(service),
        handlers=events.handlers(service),
    )
