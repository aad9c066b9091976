"""The posts service contract: its operations, models, events and public errors."""

from datetime import datetime
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from threadline.platform.errors import Forbidden, NotFound
from threadline.platform.events import EventPayload
from threadline.platform.pagination import Page, PageRequest
from threadline.platform.tokens import Identity

__all__ = [
    "MAX_BATCH",
    "SERVICE",
    "Audience",
    "AuthorPublic",
    "NotPostAuthor",
    "PostAnswer",
    "PostCreate",
    "PostCreated",
    "PostDeleted",
    "PostLiked",
    "PostNotFound",
    "PostPage",
    "PostPublic",
    "PostRead",
    "PostsApi",
    "PostsRead",
]

SERVICE = "posts"
MAX_BATCH = 100

Audience = Literal["public", "subscribers"]
PostId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class PostCreate(BaseModel):
    """A new post, or a reply when `reply_to` names the post it answers."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: Annotated[str, StringConstraints(min_length=1, max_length=500)]
    reply_to: PostId | None = None
    audience: Audience = "public"


class AuthorPublic(BaseModel):
    """Who wrote a post, as of the latest profile the posts service has heard of."""

    # Immutable, so that one object can stand for the author in every post that names it.
    model_config = ConfigDict(frozen=True)

    id: str
    handle: str
    display_name: str


class PostPublic(BaseModel):
    """A post as one viewer sees it; `text` is None when it is locked for that viewer.

    A subscribers-only post is locked for anyone but its author and the author's active
    subscribers, and for everyone but the author when subscriptions cannot be checked.
    """

    # Immutable, so that one object can stand for the post as every viewer but a few sees it.
    model_config = ConfigDict(frozen=True)

    id: str
    author: AuthorPublic
    text: str | None
    reply_to: str | None
    root_id: str
    audience: Audience
    created_at: datetime
    like_count: int = Field(ge=0)
    reply_count: int = Field(ge=0)
    liked_by_me: bool
    locked: bool


class PostRead(BaseModel):
    """One post as one viewer sees it, naming any service it had to do without."""

    post: PostPublic
    degraded: list[str]


class PostAnswer(PostPublic):
    """A post read on its own as the API answers it: the post's fields and `degraded` beside them."""

    degraded: list[str]

    @classmethod
    def of(cls, read: PostRead) -> "PostAnswer":
        """The answer for a read."""
        return cls(**dict(read.post), degraded=read.degraded)

    def read(self) -> PostRead:
        """The read this answers."""
        fields = dict(self)
        degraded = fields.pop("degraded")
        return PostRead(post=PostPublic(**fields), degraded=degraded)


class PostsRead(BaseModel):
    """Several posts as one viewer sees them, naming any service they had to do without."""

    items: list[PostPublic]
    degraded: list[str]


class PostPage(Page[PostPublic]):
    """A page of posts, naming any service it had to do without."""

    degraded: list[str] = []


class PostCreated(EventPayload):
    """A post (or reply) was published; it carries the post so consumers can keep a copy."""

    TYPE = "post.created"
    id: str
    author: AuthorPublic
    text: str
    reply_to: str | None
    root_id: str
    audience: Audience
    created_at: datetime


class PostDeleted(EventPayload):
    """A post was deleted by its author."""

    TYPE = "post.deleted"
    id: str
    author_id: str
    reply_to: str | None
    root_id: str


class PostLiked(EventPayload):
    """Someone liked a post."""

    TYPE = "post.liked"
    post_id: str
    user_id: str
    author_id: str


class PostNotFound(NotFound):
    """No such post, or it was deleted."""

    code = "post_not_found"


class NotPostAuthor(Forbidden):
    """Only a post's author may do this."""

    code = "not_author"


class PostsApi(Protocol):
    """What the posts service offers to the gateway and to other services."""

    async def create_post(self, identity: Identity, data: PostCreate) -> PostPublic:
        """Publish a post or a reply; raises PostNotFound for a reply to a missing post."""

    async def get_post(self, post_id: str, viewer: Identity | None) -> PostRead:
        """One post as `viewer` sees it; raises PostNotFound."""

    async def get_posts(self, post_ids: list[str], viewer: Identity | None) -> PostsRead:
        """Up to MAX_BATCH posts in the order asked; missing or deleted ones are left out."""

    async def delete_post(self, identity: Identity, post_id: str) -> None:
        """Delete one's own post; raises PostNotFound, NotPostAuthor."""

    async def like(self, identity: Identity, post_id: str) -> None:
        """Like a post (idempotent); raises PostNotFound."""

    async def unlike(self, identity: Identity, post_id: str) -> None:
        """Take a like back (idempotent); raises PostNotFound."""

    async def posts_by_author(self, author_id: str, page: PageRequest, viewer: Identity | None) -> PostPage:
        """An author's posts and replies, newest first."""
