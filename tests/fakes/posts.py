"""An in-memory `PostStore` with the semantics of `SqlPostStore`."""

from dataclasses import dataclass, field
from datetime import datetime

from tests.fakes.store import FakeState, FakeStore, FakeTransaction
from threadline.platform.clock import utcnow
from threadline.platform.errors import ServiceUnavailable
from threadline.platform.pagination import PageRequest
from threadline.services.posts.api import SERVICE, Audience, AuthorPublic
from threadline.services.posts.service import AuthorSnapshot, PostRecord

__all__ = ["FakePostStore", "FakePostTransaction", "PostState", "StoredPost"]


@dataclass
class StoredPost:
    """A row of the posts table: the author is kept by id and joined with its snapshot on read."""

    id: str
    author_id: str
    text: str
    reply_to: str | None
    root_id: str
    audience: Audience
    created_at: datetime
    like_count: int
    reply_count: int
    deleted_at: datetime | None = None


@dataclass
class PostState(FakeState):
    """The posts service's tables."""

    posts: dict[str, StoredPost] = field(default_factory=dict)
    likes: dict[tuple[str, str], datetime] = field(default_factory=dict)
    authors: dict[str, AuthorSnapshot] = field(default_factory=dict)


class FakePostTransaction(FakeTransaction[PostState]):
    """The posts queries over one in-memory transaction."""

    def __init__(self, state: PostState, writable: bool) -> None:
        super().__init__(state, SERVICE, writable=writable)

    async def post(self, post_id: str) -> PostRecord | None:
        """One post, deleted or not (None when its author has no snapshot, as the SQL join)."""
        row = self._read().posts.get(post_id)
        return None if row is None else self._record(row)

    async def live_posts(self, post_ids: list[str]) -> list[PostRecord]:
        """The live posts among `post_ids`, by id rather than in the order asked (the port promises none)."""
        posts = self._read().posts
        rows = [posts[i] for i in sorted(set(post_ids)) if i in posts and posts[i].deleted_at is None]
        return [record for record in map(self._record, rows) if record is not None]

    async def posts_by_author(self, author_id: str, page: PageRequest) -> tuple[list[PostRecord], str | None]:
        """A page of an author's live posts, newest first by id, and the next cursor."""
        records = sorted(
            (
                record
                for row in self._read().posts.values()
                if row.author_id == author_id
                and row.deleted_at is None
                and (page.cursor is None or row.id < page.cursor)
                and (record := self._record(row)) is not None
            ),
            key=lambda record: record.id,
            reverse=True,
        )[: page.limit + 1]
        kept = records[: page.limit]
        return kept, kept[-1].id if len(records) > page.limit else None

    async def insert_post(self, post: PostRecord) -> None:
        """Store a new post; its author is kept by id only."""
        posts = self._write().posts
        if post.id in posts:
            raise KeyError(f"duplicate post id {post.id!r}")
        posts[post.id] = StoredPost(
            id=post.id,
            author_id=post.author.id,
            text=post.text,
            reply_to=post.reply_to,
            root_id=post.root_id,
            audience=post.audience,
            created_at=post.created_at,
            like_count=post.like_count,
            reply_count=post.reply_count,
        )

    async def mark_deleted(self, post_id: str) -> None:
        """Delete a post, keeping its id and thread position."""
        row = self._write().posts.get(post_id)
        if row is not None:
            row.deleted_at = utcnow()

    async def count_reply(self, post_id: str, delta: int) -> None:
        """Change a post's direct reply count."""
        row = self._write().posts.get(post_id)
        if row is not None:
            row.reply_count += delta

    async def add_like(self, post_id: str, user_id: str) -> bool:
        """Record a like and count it; False if it existed."""
        likes = self._write().likes
        if (post_id, user_id) in likes:
            return False
        likes[post_id, user_id] = utcnow()
        self._count_like(post_id, +1)
        return True

    async def remove_like(self, post_id: str, user_id: str) -> bool:
        """Remove a like and uncount it; False if there was none."""
        if self._write().likes.pop((post_id, user_id), None) is None:
            return False
        self._count_like(post_id, -1)
        return True

    async def liked_among(self, post_ids: list[str], user_id: str) -> set[str]:
        """Which of `post_ids` `user_id` has liked."""
        likes = self._read().likes
        return {post_id for post_id in post_ids if (post_id, user_id) in likes}

    async def author(self, author_id: str) -> AuthorSnapshot | None:
        """The stored snapshot of an author."""
        author = self._read().authors.get(author_id)
        return None if author is None else author.model_copy()

    async def save_author(self, author: AuthorSnapshot) -> None:
        """Insert the snapshot, or replace an older one (same or lower versions change nothing)."""
        authors = self._write().authors
        stored = authors.get(author.id)
        if stored is None or stored.version < author.version:
            authors[author.id] = author.model_copy()

    def _count_like(self, post_id: str, delta: int) -> None:
        row = self._write().posts.get(post_id)
        if row is not None:
            row.like_count += delta

    def _record(self, row: StoredPost) -> PostRecord | None:
        author = self._read().authors.get(row.author_id)
        if author is None:
            return None
        return PostRecord(
            id=row.id,
            author=AuthorPublic(id=author.id, handle=author.handle, display_name=author.display_name),
            text=row.text,
            reply_to=row.reply_to,
            root_id=row.root_id,
            audience=row.audience,
            created_at=row.created_at,
            like_count=row.like_count,
            reply_count=row.reply_count,
            deleted=row.deleted_at is not None,
        )


class FakePostStore(FakeStore[PostState, FakePostTransaction]):
    """The posts store in memory."""

    def __init__(self) -> None:
        super().__init__(PostState(), FakePostTransaction)


class FakeEntitlements:
    """The one PaymentsApi operation posts uses: who subscribes to whom, or down on demand."""

    def __init__(self) -> None:
        self.subscriptions: set[tuple[str, str]] = set()
        self.down = False
        self.calls = 0

    def subscribe(self, subscriber_id: str, creator_id: str) -> None:
        """Record an active subscription."""
        self.subscriptions.add((subscriber_id, creator_id))

    async def entitled_creators(self, subscriber_id: str, creator_ids: list[str]) -> list[str]:
        """Creators among `creator_ids` that `subscriber_id` subscribes to."""
        self.calls += 1
        if self.down:
            raise ServiceUnavailable("payments")
        return [c for c in creator_ids if (subscriber_id, c) in self.subscriptions]
