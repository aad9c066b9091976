"""The threads service contract: reading whole conversations."""

from typing import Protocol

from pydantic import BaseModel

from threadline.platform.errors import NotFound
from threadline.platform.tokens import Identity
from threadline.services.posts.api import PostPublic

__all__ = ["SERVICE", "ThreadNotFound", "ThreadPublic", "ThreadReply", "ThreadsApi"]

SERVICE = "threads"


class ThreadReply(PostPublic):
    """A reply in a thread, with its depth below the root (a direct reply has depth 1)."""

    depth: int


class ThreadPublic(BaseModel):
    """A whole conversation: the root, then the replies depth-first, oldest sibling first."""

    root: PostPublic
    replies: list[ThreadReply]
    degraded: list[str]


class ThreadNotFound(NotFound):
    """No live post with that id is known to the threads service."""

    code = "post_not_found"


class ThreadsApi(Protocol):
    """What the threads service offers."""

    async def get_thread(self, post_id: str, viewer: Identity | None) -> ThreadPublic:
        """The conversation containing `post_id`; raises ThreadNotFound."""
