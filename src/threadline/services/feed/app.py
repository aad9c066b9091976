"""The feed service's composition root: built from settings and the adapters it is given."""

from threadline.platform.component import Component
from threadline.platform.db import Database, WriterSettings
from threadline.platform.settings import Settings
from threadline.services.feed import events
from threadline.services.feed.api import SERVICE
from threadline.services.feed.http import build_router
from threadline.services.feed.service import FeedService
from threadline.services.feed.store import MIGRATIONS, SqlFeedStore
from threadline.services.posts.api import PostsApi

__all__ = ["build"]


def build(settings: Settings, *, posts: PostsApi) -> Component:
    """Build the feed service from settings and the posts adapter it reads and back-fills from."""
    # A fan-out writes into the newest page of every follower's timeline, all over the file. With
    # SQLite's 2 MiB cache most of those pages were read from the file again (at 1,000 users and
    # 50,000 posts, 63 page reads per post; 4 with 64 MiB: -6% CPU per compose). With checkpoints
    # every 1,000 WAL pages, 33 pages per post were copied back into the file; 18 with 10,000,
    # as more of them were written more than once in between (-6 to -14% CPU per compose, feed reads
    # unchanged; the WAL file grows to about 40 MB).
    database = Database(
        settings.database_url(SERVICE), writer=WriterSettings(cache_mib=64, checkpoint_after_pages=10_000)
    )
    service = FeedService(SqlFeedStore(database), posts)
    return Component(
        name=SERVICE,
        service=service,
        database=database,
        migrations=[MIGRATIONS],
        router=build_router(service),
        handlers=events.handlers(service),
        background=[service.keep_fanning_out],
    )
