"""The threads service's composition root: built from settings and the adapters it is given."""

from threadline.platform.component import Component
from threadline.platform.db import Database
from threadline.platform.settings import Settings
from threadline.services.posts.api import PostsApi
from threadline.services.threads import events
from threadline.services.threads.api import SERVICE
from threadline.services.threads.http import build_router
from threadline.services.threads.service import ThreadsService
from threadline.services.threads.store import MIGRATIONS, SqlThreadStore

__all__ = ["build"]


def build(settings: Settings, *, posts: PostsApi) -> Component:
    """Build the threads service from settings and the posts adapter it reads post bodies with."""
    database = Database(settings.database_url(SERVICE))
    service = ThreadsService(SqlThreadStore(database), posts)
    return Component(
        name=SERVICE,
        service=service,
        database=database,
        migrations=[MIGRATIONS],
        router=build_router(service),
        handlers=events.handlers(service),
    )
