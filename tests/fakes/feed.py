"""An in-memory `FeedStore` with the semantics of `SqlFeedStore`, and a fake of the posts API feed calls."""

from dataclasses import dataclass, field

from tests.fakes.store import FakeState, FakeStore, FakeTransaction
from threadline.platform.clock import utcnow
from threadline.platform.errors import ServiceUnavailable
from threadline.platform.ids import new_id
from threadline.platform.invalid import require_batch_size
from threadline.platform.pagination import PageRequest
from threadline.platform.tokens import Identity
from threadline.services.feed.api import SERVICE
from threadline.services.feed.service import FollowEdge, PostCopy, TimelineEntry
from threadline.services.posts.api import (
    MAX_BATCH,
    Audience,
    AuthorPublic,
    PostCreated,
    PostDeleted,
    PostPage,
    PostPublic,
    PostsRead,
)
from threadline.services.posts.api import SERVICE as POSTS

__all__ = ["FakeFeedStore", "FakeFeedTransaction", "FakePosts", "FeedState"]


@dataclass
class FeedState(FakeState):
    """The feed service's tables."""

    follows: dict[tuple[str, str], FollowEdge] = field(default_factory=dict)
    copies: dict[str, PostCopy] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    # (owner_id, post_id) -> author_id
    entries: dict[tuple[str, str], str] = field(default_factory=dict)
    # Posts waiting for their fan-out, oldest first: (post_id, author_id)
    pending: list[tuple[str, str]] = field(default_factory=list)


class FakeFeedTransaction(FakeTransaction[FeedState]):
    """The feed queries over one in-memory transaction."""

    def __init__(self, state: FeedState, writable: bool) -> None:
        super().__init__(state, SERVICE, writable=writable)

    async def follow_edge(self, follower_id: str, followee_id: str) -> FollowEdge | None:
        """The latest known state of one follow."""
        edge = self._read().follows.get((follower_id, followee_id))
        return None if edge is None else edge.model_copy()

    async def save_follow_edge(self, edge: FollowEdge) -> bool:
        """Insert the edge, or replace an older one; False if the stored one is as new or newer."""
        stored = self._read().follows.get((edge.follower_id, edge.followee_id))
        if stored is not None and stored.version >= edge.version:
            return False
        self._write().follows[edge.follower_id, edge.followee_id] = edge.model_copy()
        return True

    async def queue_fan_out(self, post_id: str, author_id: str) -> None:
        """Let a post wait for its fan-out."""
        self._write().pending.append((post_id, author_id))

    def fan_out(self, post_id: str, author_id: str) -> None:
        """Put a post into its author's timeline and every current follower's, once each."""
        state = self._write()
        for owner in [author_id, *self._followers(author_id)]:
            state.entries.setdefault((owner, post_id), author_id)

    def take_waiting(self, batch: int) -> list[tuple[str, str]]:
        """Remove and give the `batch` posts that waited longest."""
        state = self._write()
        taken, state.pending = state.pending[:batch], state.pending[batch:]
        return taken

    def _followers(self, author_id: str) -> list[str]:
        return [
            edge.follower_id
            for edge in self._read().follows.values()
            if edge.followee_id == author_id and edge.following
        ]

    async def keep_post(self, post: PostCopy) -> None:
        """Insert the copy, or fill in the text a stored copy lacked."""
        stored = self._read().copies.get(post.id)
        if stored is None or (stored.text is None and post.text is not None):
            self._write().copies[post.id] = post.model_copy(deep=True)

    async def posts(self, post_ids: list[str]) -> list[PostCopy]:
        """The stored copies among `post_ids`, by id, not in the order asked."""
        copies = self._read().copies
        return [copies[i].model_copy(deep=True) for i in sorted(set(post_ids)) if i in copies]

    async def deleted_among(self, post_ids: list[str]) -> set[str]:
        """Which of `post_ids` are tombstoned."""
        return set(post_ids) & self._read().deleted

    async def mark_deleted(self, post_id: str) -> None:
        """Tombstone the post, drop its copy and its timeline entries."""
        state = self._write()
        state.deleted.add(post_id)
        state.copies.pop(post_id, None)
        state.entries = {key: author for key, author in state.entries.items() if key[1] != post_id}
        state.pending = [waiting for waiting in state.pending if waiting[0] != post_id]

    async def add_entries(self, entries: list[TimelineEntry]) -> None:
        """Insert timeline entries, skipping those already there."""
        if not entries:
            return
        stored = self._write().entries
        for entry in entries:
            stored.setdefault((entry.owner_id, entry.post_id), entry.author_id)

    async def remove_author(self, owner_id: str, author_id: str) -> None:
        """Take an author's posts out of one timeline."""
        state = self._write()
        state.entries = {
            key: author
            for key, author in state.entries.items()
            if not (key[0] == owner_id and author == author_id)
        }

    async def timeline(self, owner_id: str, page: PageRequest) -> tuple[list[str], str | None]:
        """A page of one timeline's post ids, waiting posts included, newest first, and the next cursor."""
        ids = [
            post_id for post_id in self.timeline_ids(owner_id) if page.cursor is None or post_id < page.cursor
        ]
        kept = ids[: page.limit]
        return kept, kept[-1] if len(ids) > page.limit else None

    def timeline_ids(self, owner_id: str) -> list[str]:
        """Every post id of one timeline, newest first: its entries, and waiting posts it would get."""
        state = self._read()
        followed = {
            edge.followee_id
            for edge in state.follows.values()
            if edge.follower_id == owner_id and edge.following
        }
        ids = {post_id for owner, post_id in state.entries if owner == owner_id}
        ids |= {post_id for post_id, author in state.pending if author == owner_id or author in followed}
        return sorted(ids, reverse=True)


class FakeFeedStore(FakeStore[FeedState, FakeFeedTransaction]):
    """The feed store in memory."""

    def __init__(self) -> None:
        super().__init__(FeedState(), FakeFeedTransaction)

    def timeline_of(self, owner_id: str) -> list[str]:
        """Every committed post id in one timeline, waiting posts included, newest first."""
        return FakeFeedTransaction(self.state, writable=False).timeline_ids(owner_id)

    async def waiting_fan_outs(self) -> int:
        """How many posts wait for their fan-out."""
        return len(self.state.pending)

    async def fan_out_waiting(self, batch: int) -> int:
        """Fan out the `batch` posts that waited longest, in one transaction."""
        async with self.write() as tx:
            taken = tx.take_waiting(batch)
            for post_id, author_id in taken:
                tx.fan_out(post_id, author_id)
        return len(taken)


@dataclass
class _Post:
    public: PostPublic
    deleted: bool = False
    likers: set[str] = field(default_factory=set)


class FakePosts:
    """The two PostsApi operations feed calls, over posts kept in memory; `down` makes them fail.

    Posts lies outside feed's boundary, so this is a fake of its API, not of its store: it
    publishes (returning the event posts would emit), likes and deletes posts, locks
    subscribers-only posts as posts does, and names `degraded` services when told to.
    """

    def __init__(self) -> None:
        self.posts: dict[str, _Post] = {}
        self.subscriptions: set[tuple[str, str]] = set()
        self.down = False
        self.degraded: list[str] = []
        self.calls: list[str] = []

    def publish(
        self,
        author: Identity,
        text: str = "hello",
        *,
        audience: Audience = "public",
        reply_to: str | None = None,
    ) -> PostCreated:
        """Create a post and return the post.created event posts would emit for it."""
        post_id = new_id()
        root_id = post_id if reply_to is None else self.posts[reply_to].public.root_id
        public = PostPublic(
            id=post_id,
            author=AuthorPublic(id=author.user_id, handle=author.handle, display_name=author.display_name),
            text=text,
            reply_to=reply_to,
            root_id=root_id,
            audience=audience,
            created_at=utcnow(),
            like_count=0,
            reply_count=0,
            liked_by_me=False,
            locked=False,
        )
        self.posts[post_id] = _Post(public)
        if reply_to is not None:
            parent = self.posts[reply_to]
            parent.public = parent.public.model_copy(update={"reply_count": parent.public.reply_count + 1})
        return PostCreated.model_validate(public.model_dump())

    def delete(self, post_id: str) -> PostDeleted:
        """Delete a post and return the post.deleted event posts would emit for it."""
        post = self.posts[post_id]
        post.deleted = True
        public = post.public
        return PostDeleted(
            id=public.id, author_id=public.author.id, reply_to=public.reply_to, root_id=public.root_id
        )

    def like(self, post_id: str, user_id: str) -> None:
        """Like a post once."""
        post = self.posts[post_id]
        if user_id not in post.likers:
            post.likers.add(user_id)
            post.public = post.public.model_copy(update={"like_count": post.public.like_count + 1})

    def subscribe(self, subscriber_id: str, creator_id: str) -> None:
        """Let `subscriber_id` read `creator_id`'s subscribers-only posts."""
        self.subscriptions.add((subscriber_id, creator_id))

    async def get_posts(self, post_ids: list[str], viewer: Identity | None) -> PostsRead:
        """Live posts in the order asked, as `viewer` sees them; missing or deleted ones left out."""
        self._answer("get_posts")
        require_batch_size("post_ids", post_ids, MAX_BATCH)
        live = [
            self.posts[i] for i in dict.fromkeys(post_ids) if i in self.posts and not self.posts[i].deleted
        ]
        return PostsRead(items=[self._seen(post, viewer) for post in live], degraded=list(self.degraded))

    async def posts_by_author(self, author_id: str, page: PageRequest, viewer: Identity | None) -> PostPage:
        """An author's live posts, newest first."""
        self._answer("posts_by_author")
        ids = sorted(
            (
                post_id
                for post_id, post in self.posts.items()
                if post.public.author.id == author_id
                and not post.deleted
                and (page.cursor is None or post_id < page.cursor)
            ),
            reverse=True,
        )[: page.limit + 1]
        kept = ids[: page.limit]
        return PostPage(
            items=[self._seen(self.posts[i], viewer) for i in kept],
            next_cursor=kept[-1] if len(ids) > page.limit else None,
            degraded=list(self.degraded),
        )

    def _answer(self, operation: str) -> None:
        self.calls.append(operation)
        if self.down:
            raise ServiceUnavailable(POSTS, "switched off by the test")

    def _seen(self, post: _Post, viewer: Identity | None) -> PostPublic:
        public = post.public
        viewer_id = None if viewer is None else viewer.user_id
        locked = (
            public.audience == "subscribers"
            and viewer_id != public.author.id
            and ("payments" in self.degraded or (viewer_id, public.author.id) not in self.subscriptions)
        )
        return public.model_copy(
            update={
                "text": None if locked else public.text,
                "locked": locked,
                "liked_by_me": viewer_id in post.likers,
            }
        )
