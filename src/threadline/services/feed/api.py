"""The feed service contract: home timelines."""

from typing import Protocol

from threadline.platform.pagination import Page, PageRequest
from threadline.platform.tokens import Identity
from threadline.services.posts.api import PostPublic

__all__ = ["SERVICE", "FeedApi", "FeedPage"]

SERVICE = "feed"


class FeedPage(Page[PostPublic]):
    """A page of a home timeline, naming any service it had to do without."""

    degraded: list[str] = []


class FeedApi(Protocol):
    """What the feed service offers."""

    async def home(self, identity: Identity, page: PageRequest) -> FeedPage:
        """The caller's home timeline: posts of whom they follow and their own, newest first."""
