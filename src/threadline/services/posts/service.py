"""The posts application layer: implements PostsApi over its store."""

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from pydantic import BaseModel

from threadline.platform.clock import utcnow
from threadline.platform.errors import ServiceUnavailable
from threadline.platform.events import EventPayload
from threadline.platform.ids import new_id
from threadline.platform.invalid import require_batch_size
from threadline.platform.pagination import PageRequest
from threadline.platform.tokens import Identity
from threadline.services.payments.api import SERVICE as PAYMENTS
from threadline.services.payments.api import PaymentsApi
from threadline.services.posts.api import (
    MAX_BATCH,
    Audience,
    AuthorPublic,
    NotPostAuthor,
    PostCreate,
    PostCreated,
    PostDeleted,
    PostLiked,
    PostNotFound,
    PostPage,
    PostPublic,
    PostRead,
    PostsRead,
)

__all__ = ["AuthorSnapshot", "PostRecord", "PostStore", "PostTransaction", "PostsService"]

CONSUMER = "posts"


class AuthorSnapshot(BaseModel):
    """The posts service's copy of an author's public profile; `version` orders updates."""

    id: str
    handle: str
    display_name: str
    version: int


@dataclass(slots=True)
class PostRecord:
    """A post as stored, with its author's snapshot.

    A plain record, not a validated model: it is built only from validated input or the store's
    own rows, and a feed read builds twenty of them per page (not frozen either: a frozen
    dataclass took 2.5x as long to build).
    """

    id: str
    author: AuthorPublic
    text: str
    reply_to: str | None
    root_id: str
    audience: Audience
    created_at: datetime
    like_count: int
    reply_count: int
    deleted: bool = False
    seen_by_anyone: PostPublic | None = None
    """The post as a viewer who has not liked it and may read it sees it, once built (`_public`)."""


class PostTransaction(Protocol):
    """Reads and writes of the posts store inside one transaction."""

    async def post(self, post_id: str) -> PostRecord | None:
        """One post, deleted or not."""

    async def live_posts(self, post_ids: list[str]) -> list[PostRecord]:
        """The posts among `post_ids` that are not deleted, in any order."""

    async def posts_by_author(self, author_id: str, page: PageRequest) -> tuple[list[PostRecord], str | None]:
        """A page of an author's live posts, newest first, and the next cursor."""

    async def insert_post(self, post: PostRecord) -> None:
        """Store a new post."""

    async def mark_deleted(self, post_id: str) -> None:
        """Delete a post (its id stays taken)."""

    async def count_reply(self, post_id: str, delta: int) -> None:
        """Change a post's direct reply count."""

    async def add_like(self, post_id: str, user_id: str) -> bool:
        """Record a like and count it; False if it existed."""

    async def remove_like(self, post_id: str, user_id: str) -> bool:
        """Remove a like and uncount it; False if there was none."""

    async def liked_among(self, post_ids: list[str], user_id: str) -> set[str]:
        """Which of `post_ids` `user_id` has liked."""

    async def author(self, author_id: str) -> AuthorSnapshot | None:
        """The stored snapshot of an author."""

    async def save_author(self, author: AuthorSnapshot) -> None:
        """Store an author's snapshot if it is newer than the one stored."""

    async def emit(self, payload: EventPayload) -> object:
        """Publish an event when (and only if) this transaction commits."""

    async def claim_event(self, consumer: str, event_id: str) -> bool:
        """False if this event was handled before."""


class PostStore(Protocol):
    """The posts service's persistence port."""

    def write(self) -> AbstractAsyncContextManager[PostTransaction]:
        """A write transaction."""

    def read(self) -> AbstractAsyncContextManager[PostTransaction]:
        """A read-only transaction."""


class PostsService:
    """Posts, replies and likes; subscribers-only posts unlock for the author's subscribers."""

    def __init__(self, store: PostStore, payments: PaymentsApi) -> None:
        self._store = store
        self._payments = payments

    async def create_post(self, identity: Identity, data: PostCreate) -> PostPublic:
        """Publish a post; a reply joins its parent's thread."""
        async with self._store.write() as tx:
            author = await tx.author(identity.user_id)
            if author is None:
                # The user.registered event may not have arrived yet; the token's claims tide
                # us over, and any later profile event (version >= 1) replaces this snapshot.
                author = AuthorSnapshot(
                    id=identity.user_id,
                    handle=identity.handle,
                    display_name=identity.display_name or identity.handle,
                    version=0,
                )
                await tx.save_author(author)
            post_id = new_id()
            root_id = post_id
            if data.reply_to is not None:
                parent = await tx.post(data.reply_to)
                if parent is None or parent.deleted:
                    raise PostNotFound(f"cannot reply: no post with id {data.reply_to!r}")
                root_id = parent.root_id
                await tx.count_reply(parent.id, +1)
            post = PostRecord(
                id=post_id,
                author=AuthorPublic(id=author.id, handle=author.handle, display_name=author.display_name),
                text=data.text,
                reply_to=data.reply_to,
                root_id=root_id,
                audience=data.audience,
                created_at=utcnow(),
                like_count=0,
                reply_count=0,
            )
            await tx.insert_post(post)
            await tx.emit(
                PostCreated(
                    id=post.id,
                    author=post.author,
                    text=post.text,
                    reply_to=post.reply_to,
                    root_id=post.root_id,
                    audience=post.audience,
                    created_at=post.created_at,
                )
            )
        return _public(post, identity, liked=False, entitled=set())

    async def get_post(self, post_id: str, viewer: Identity | None) -> PostRead:
        """One live post as `viewer` sees it."""
        read = await self.get_posts([post_id], viewer)
        if not read.items:
            raise PostNotFound(f"no post with id {post_id!r}")
        return PostRead(post=read.items[0], degraded=read.degraded)

    async def get_posts(self, post_ids: list[str], viewer: Identity | None) -> PostsRead:
        """Live posts in the order asked."""
        require_batch_size("post_ids", post_ids, MAX_BATCH)
        async with self._store.read() as tx:
            found = {post.id: post for post in await tx.live_posts(post_ids)}
            liked = await tx.liked_among(list(found), viewer.user_id) if viewer and found else set()
        ordered = [found[i] for i in dict.fromkeys(post_ids) if i in found]
        posts, degraded = await self._as_seen_by(ordered, viewer, liked)
        return PostsRead(items=posts, degraded=degraded)

    async def delete_post(self, identity: Identity, post_id: str) -> None:
        """Delete one's own post."""
        async with self._store.write() as tx:
            post = await _live(tx, post_id)
            if post.author.id != identity.user_id:
                raise NotPostAuthor("only the author can delete this post")
            await tx.mark_deleted(post.id)
            if post.reply_to is not None:
                await tx.count_reply(post.reply_to, -1)
            await tx.emit(
                PostDeleted(
                    id=post.id, author_id=post.author.id, reply_to=post.reply_to, root_id=post.root_id
                )
            )

    async def like(self, identity: Identity, post_id: str) -> None:
        """Like a live post once."""
        async with self._store.write() as tx:
            post = await _live(tx, post_id)
            if await tx.add_like(post.id, identity.user_id):
                await tx.emit(PostLiked(post_id=post.id, user_id=identity.user_id, author_id=post.author.id))

    async def unlike(self, identity: Identity, post_id: str) -> None:
        """Take back a like."""
        async with self._store.write() as tx:
            post = await _live(tx, post_id)
            await tx.remove_like(post.id, identity.user_id)

    async def posts_by_author(self, author_id: str, page: PageRequest, viewer: Identity | None) -> PostPage:
        """An author's posts and replies, newest first."""
        async with self._store.read() as tx:
            records, cursor = await tx.posts_by_author(author_id, page)
            ids = [post.id for post in records]
            liked = await tx.liked_among(ids, viewer.user_id) if viewer and ids else set()
        posts, degraded = await self._as_seen_by(records, viewer, liked)
        return PostPage(items=posts, next_cursor=cursor, degraded=degraded)

    async def _as_seen_by(
        self, posts: list[PostRecord], viewer: Identity | None, liked: set[str]
    ) -> tuple[list[PostPublic], list[str]]:
        """The posts as `viewer` sees them; locked ones it cannot check are locked (fail closed)."""
        creators = sorted(
            {
                post.author.id
                for post in posts
                if post.audience == "subscribers" and viewer is not None and viewer.user_id != post.author.id
            }
        )
        entitled: set[str] = set()
        degraded: list[str] = []
        if creators and viewer is not None:
            try:
                entitled = set(await self._payments.entitled_creators(viewer.user_id, creators))
            except ServiceUnavailable:
                degraded = [PAYMENTS]
        return [_public(post, viewer, post.id in liked, entitled) for post in posts], degraded

    async def apply_author_profile(self, event_id: str, author: AuthorSnapshot) -> None:
        """Adopt an author's newer profile (from user.registered / user.updated), once per event."""
        async with self._store.write() as tx:
            if await tx.claim_event(CONSUMER, event_id):
                await tx.save_author(author)


async def _live(tx: PostTransaction, post_id: str) -> PostRecord:
    post = await tx.post(post_id)
    if post is None or post.deleted:
        raise PostNotFound(f"no post with id {post_id!r}")
    return post


def _public(post: PostRecord, viewer: Identity | None, liked: bool, entitled: set[str]) -> PostPublic:
    locked = (
        post.audience == "subscribers"
        and (viewer is None or viewer.user_id != post.author.id)
        and post.author.id not in entitled
    )
    if not (locked or liked):
        # Most views of a post are this one: built once per record, which the store may keep.
        if post.seen_by_anyone is None:
            post.seen_by_anyone = _built(post, liked=False, locked=False)
        return post.seen_by_anyone
    return _built(post, liked=liked, locked=locked)


def _built(post: PostRecord, *, liked: bool, locked: bool) -> PostPublic:
    return PostPublic(
        id=post.id,
        author=post.author,
        text=None if locked else post.text,
        reply_to=post.reply_to,
        root_id=post.root_id,
        audience=post.audience,
        created_at=post.created_at,
        like_count=post.like_count,
        reply_count=post.reply_count,
        liked_by_me=liked,
        locked=locked,
    )
