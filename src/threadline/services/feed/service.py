"""The feed application layer: implements FeedApi by fan-out on write over its own store.

Everything feed knows comes from other services' events (post.created, post.deleted,
user.followed, user.unfollowed) and from the posts API; no other service was changed for it.

A new post waits in the store until it is fanned out in a batch with others; timelines are read
with the waiting posts of the accounts followed, so a post shows in feeds as soon as it is recorded.
"""

import asyncio
import contextlib
import logging
import time
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Protocol

from pydantic import BaseModel

from threadline.platform.errors import FieldError, InvalidRequest, ServiceUnavailable
from threadline.platform.pagination import MAX_LIMIT, PageRequest
from threadline.platform.tokens import Identity
from threadline.services.feed.api import FeedPage
from threadline.services.posts.api import (
    MAX_BATCH,
    Audience,
    AuthorPublic,
    PostCreated,
    PostDeleted,
    PostPublic,
    PostsApi,
)
from threadline.services.posts.api import SERVICE as POSTS
from threadline.services.users.api import UserFollowed, UserUnfollowed

__all__ = [
    "BACKFILL_POSTS",
    "FAN_OUT_AFTER_PAUSE_S",
    "FAN_OUT_BATCH",
    "MAX_PAGE",
    "FeedService",
    "FeedStore",
    "FeedTransaction",
    "FollowEdge",
    "PostCopy",
    "TimelineEntry",
]

log = logging.getLogger(__name__)

CONSUMER = "feed"
BACKFILL_POSTS = 20
# Posts fanned out together: each timeline's newest page is written once for all of a batch's
# posts to it. Fewer than a batch are fanned out once no post has arrived for a pause.
FAN_OUT_BATCH = 500
FAN_OUT_AFTER_PAUSE_S = 0.2
_RETRY_FAN_OUT_AFTER_S = 1.0
# A page is read from posts in one batch call, so it may not outgrow a batch.
MAX_PAGE = min(MAX_LIMIT, MAX_BATCH)


class PostCopy(BaseModel):
    """Feed's own copy of a post, to serve from while posts is down; `text` is None if unknown."""

    id: str
    author: AuthorPublic
    text: str | None
    reply_to: str | None
    root_id: str
    audience: Audience
    created_at: datetime


class FollowEdge(BaseModel):
    """Whether `follower_id` follows `followee_id`, as of the event whose id is `version`.

    Event ids are time-ordered (UUIDv7), so the newest event about a pair wins, whatever
    order the events arrive in.
    """

    follower_id: str
    followee_id: str
    following: bool
    version: str


class TimelineEntry(BaseModel):
    """One post in one home timeline."""

    owner_id: str
    post_id: str
    author_id: str


class FeedTransaction(Protocol):
    """Reads and writes of the feed store inside one transaction."""

    async def follow_edge(self, follower_id: str, followee_id: str) -> FollowEdge | None:
        """The latest known state of one follow, if any event about it arrived."""

    async def save_follow_edge(self, edge: FollowEdge) -> bool:
        """Store the edge if it is newer than the stored one; False if it was stale."""

    async def queue_fan_out(self, post_id: str, author_id: str) -> None:
        """Let a post wait for its fan-out; until then timelines are read with it."""

    async def keep_post(self, post: PostCopy) -> None:
        """Store a copy; an existing one is replaced only by one that knows the text it lacked."""

    async def posts(self, post_ids: list[str]) -> list[PostCopy]:
        """The stored copies among `post_ids`, in any order."""

    async def deleted_among(self, post_ids: list[str]) -> set[str]:
        """Which of `post_ids` are known to be deleted."""

    async def mark_deleted(self, post_id: str) -> None:
        """Remember the post as deleted, drop its copy and take it out of every timeline."""

    async def add_entries(self, entries: list[TimelineEntry]) -> None:
        """Put posts into timelines; entries already there stay as they are."""

    async def remove_author(self, owner_id: str, author_id: str) -> None:
        """Take every post of `author_id` out of `owner_id`'s timeline."""

    async def timeline(self, owner_id: str, page: PageRequest) -> tuple[list[str], str | None]:
        """A page of post ids of one timeline, newest first, and the next cursor.

        Besides its entries, a timeline holds the waiting posts of the accounts its owner follows
        now and the owner's own.
        """

    async def claim_event(self, consumer: str, event_id: str) -> bool:
        """False if this event was handled before."""


class FeedStore(Protocol):
    """The feed service's persistence port (SQL by default; a Redis store could replace it)."""

    def write(self) -> AbstractAsyncContextManager[FeedTransaction]:
        """A write transaction."""

    def read(self) -> AbstractAsyncContextManager[FeedTransaction]:
        """A read-only transaction."""

    async def waiting_fan_outs(self) -> int:
        """How many posts wait for their fan-out."""

    async def fan_out_waiting(self, batch: int) -> int:
        """Put the `batch` posts that waited longest into their author's timeline and every current
        follower's (entries there stay), in one transaction; how many posts stopped waiting."""


class FeedService:
    """Home timelines, fanned out on write; read fresh from posts, or from copies when it is down."""

    def __init__(
        self,
        store: FeedStore,
        posts: PostsApi,
        *,
        backfill: int = BACKFILL_POSTS,
        fan_out_batch: int = FAN_OUT_BATCH,
        fan_out_after_pause_s: float = FAN_OUT_AFTER_PAUSE_S,
    ) -> None:
        self._store = store
        self._posts = posts
        self._backfill = backfill
        self._fan_out_batch = fan_out_batch
        self._fan_out_after_pause_s = fan_out_after_pause_s
        # Posts this process queued, and how many of them are known to have been fanned out.
        self._queued_total = 0
        self._fanned_out_total = 0
        self._last_queued = 0.0
        self._queued = asyncio.Event()

    async def home(self, identity: Identity, page: PageRequest) -> FeedPage:
        """The caller's timeline, newest first, with current counts, likes and locks."""
        if not 1 <= page.limit <= MAX_PAGE:
            message = f"must be between 1 and {MAX_PAGE}"
            raise InvalidRequest(f"limit: {message}", [FieldError("limit", message)])
        async with self._store.read() as tx:
            ids, cursor = await tx.timeline(identity.user_id, page)
        if not ids:
            return FeedPage(items=[], next_cursor=cursor, degraded=[])
        try:
            fresh = await self._posts.get_posts(ids, identity)
        except ServiceUnavailable:
            async with self._store.read() as tx:
                copies = await tx.posts(ids)
            return FeedPage(
                items=_in_order(ids, [_from_copy(copy, identity) for copy in copies]),
                next_cursor=cursor,
                degraded=[POSTS],
            )
        return FeedPage(items=_in_order(ids, fresh.items), next_cursor=cursor, degraded=fresh.degraded)

    async def record_post(self, event_id: str, post: PostCreated) -> None:
        """Keep a copy of a new post and put it into its author's and followers' timelines."""
        async with self._store.write() as tx:
            if not await tx.claim_event(CONSUMER, event_id) or await tx.deleted_among([post.id]):
                return
            await tx.keep_post(PostCopy.model_validate(post.model_dump()))
            await tx.queue_fan_out(post.id, post.author.id)
        self._queued_total += 1
        self._last_queued = time.monotonic()
        if self._waiting in (1, self._fan_out_batch):
            self._queued.set()

    @property
    def _waiting(self) -> int:
        return self._queued_total - self._fanned_out_total

    async def keep_fanning_out(self) -> None:
        """Fan waiting posts out in batches, when a batch is full or posting pauses; runs until cancelled."""
        try:
            # What waits now includes what this process queued since it started, and what was left.
            waiting = await self._store.waiting_fan_outs()
            self._queued_total = max(self._queued_total, self._fanned_out_total + waiting)
        except Exception:
            log.exception("feed: counting the posts left waiting failed; they wait for the next batch")
        while True:
            await self._until_batch_or_pause()
            queued_before = self._queued_total
            try:
                done = await self._store.fan_out_waiting(self._fan_out_batch)
            except Exception:
                log.exception("feed: fanning out waiting posts failed; trying again")
                await asyncio.sleep(_RETRY_FAN_OUT_AFTER_S)
                continue
            if done < self._fan_out_batch:
                # None was left: every post queued before this batch began is out (perhaps fanned
                # out by another process); those queued meanwhile may still wait.
                self._fanned_out_total = queued_before
            else:
                self._fanned_out_total = min(self._queued_total, self._fanned_out_total + done)

    async def _until_batch_or_pause(self) -> None:
        while True:
            self._queued.clear()
            if self._waiting >= self._fan_out_batch:
                return
            timeout = None
            if self._waiting:
                timeout = self._last_queued + self._fan_out_after_pause_s - time.monotonic()
                if timeout <= 0:
                    return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._queued.wait()

    async def forget_post(self, event_id: str, post: PostDeleted) -> None:
        """Take a deleted post out of every timeline, for good."""
        async with self._store.write() as tx:
            if await tx.claim_event(CONSUMER, event_id):
                await tx.mark_deleted(post.id)

    async def record_follow(self, event_id: str, follow: UserFollowed) -> None:
        """Note the follow and back-fill the followee's recent posts; raises ServiceUnavailable."""
        edge = FollowEdge(
            follower_id=follow.follower_id, followee_id=follow.followee_id, following=True, version=event_id
        )
        async with self._store.read() as tx:
            known = await tx.follow_edge(edge.follower_id, edge.followee_id)
        recent: list[PostPublic] = []
        if known is None or known.version < edge.version:
            # Outside the write transaction: a remote call must not hold the store's writer.
            page = await self._posts.posts_by_author(
                edge.followee_id, PageRequest(limit=self._backfill), viewer=None
            )
            recent = page.items
        async with self._store.write() as tx:
            if not await tx.claim_event(CONSUMER, event_id) or not await tx.save_follow_edge(edge):
                return
            deleted = await tx.deleted_among([post.id for post in recent])
            kept = [post for post in recent if post.id not in deleted]
            for post in kept:
                await tx.keep_post(PostCopy.model_validate(post.model_dump()))
            await tx.add_entries(
                [
                    TimelineEntry(owner_id=edge.follower_id, post_id=post.id, author_id=post.author.id)
                    for post in kept
                ]
            )

    async def record_unfollow(self, event_id: str, unfollow: UserUnfollowed) -> None:
        """Note the unfollow and take the followee's posts out of the follower's timeline."""
        edge = FollowEdge(
            follower_id=unfollow.follower_id,
            followee_id=unfollow.followee_id,
            following=False,
            version=event_id,
        )
        async with self._store.write() as tx:
            if await tx.claim_event(CONSUMER, event_id) and await tx.save_follow_edge(edge):
                await tx.remove_author(edge.follower_id, edge.followee_id)


def _in_order(ids: list[str], posts: list[PostPublic]) -> list[PostPublic]:
    by_id = {post.id: post for post in posts}
    return [by_id[post_id] for post_id in ids if post_id in by_id]


def _from_copy(copy: PostCopy, viewer: Identity) -> PostPublic:
    """A stored copy as `viewer` sees it when entitlement cannot be checked: fail closed."""
    locked = copy.text is None or (copy.audience == "subscribers" and copy.author.id != viewer.user_id)
    return PostPublic(
        id=copy.id,
        author=copy.author,
        text=None if locked else copy.text,
        reply_to=copy.reply_to,
        root_id=copy.root_id,
        audience=copy.audience,
        created_at=copy.created_at,
        like_count=0,
        reply_count=0,
        liked_by_me=False,
        locked=locked,
    )
