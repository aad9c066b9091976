"""The posts service's tables and queries; migrations live beside it in `migrations/`."""

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from threadline.platform.clock import utcnow
from threadline.platform.db import (
    Command,
    Connection,
    Database,
    Migrations,
    PagedQuery,
    Query,
    SqlStore,
    Transaction,
    UtcDateTime,
    WrappedTransaction,
    add_to_counter,
    insert_ignoring_conflicts,
)
from threadline.platform.lru import LruCache
from threadline.platform.pagination import PageRequest
from threadline.platform.row_cache import RowCache
from threadline.services.posts.api import SERVICE, AuthorPublic
from threadline.services.posts.service import AuthorSnapshot, PostRecord

__all__ = ["CACHED_POSTS", "MIGRATIONS", "SqlPostStore"]

MIGRATIONS = Migrations(Path(__file__).parent / "migrations")

metadata = sa.MetaData()

posts = sa.Table(
    "posts",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("author_id", sa.String(36), nullable=False),
    sa.Column("text", sa.String(500), nullable=False),
    sa.Column("reply_to", sa.String(36), nullable=True),
    sa.Column("root_id", sa.String(36), nullable=False),
    sa.Column("audience", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("deleted_at", UtcDateTime, nullable=True),
    sa.Column("like_count", sa.Integer, nullable=False),
    sa.Column("reply_count", sa.Integer, nullable=False),
)

likes = sa.Table(
    "likes",
    metadata,
    sa.Column("post_id", sa.String(36), primary_key=True),
    sa.Column("user_id", sa.String(36), primary_key=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
)

authors = sa.Table(
    "authors",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("handle", sa.String(30), nullable=False),
    sa.Column("display_name", sa.String(50), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
)

_POST_WITH_AUTHOR = sa.select(
    *(column for column in posts.c if column.key != "deleted_at"),
    authors.c.handle,
    authors.c.display_name,
    (posts.c.deleted_at.is_not(None)).label("deleted"),
).join(authors, authors.c.id == posts.c.author_id)
# Posts of one author share one author object: building it is most of the cost of a post's record.
_AUTHORS: LruCache[tuple[str, str, str], AuthorPublic] = LruCache(10_000)
# Enough for the first pages of a thousand accounts' feeds and own posts: ~30 MB of 75-character posts.
CACHED_POSTS = 50_000
_POST_BY_ID = Query(_POST_WITH_AUTHOR.where(posts.c.id == sa.bindparam("post_id")))
_LIVE_POSTS_AMONG = Query(
    _POST_WITH_AUTHOR.where(
        posts.c.id.in_(sa.bindparam("post_ids", expanding=True)), posts.c.deleted_at.is_(None)
    )
)
# Ids only: the posts themselves are mostly in the cache.
_LIVE_POST_IDS_BY_AUTHOR = PagedQuery(
    sa.select(posts.c.id).where(posts.c.author_id == sa.bindparam("author_id"), posts.c.deleted_at.is_(None)),
    posts.c.id,
)
_LIKED_AMONG = Query(
    sa.select(likes.c.post_id).where(
        likes.c.user_id == sa.bindparam("user_id"),
        likes.c.post_id.in_(sa.bindparam("post_ids", expanding=True)),
    )
)
_AUTHOR_BY_ID = Query(sa.select(authors).where(authors.c.id == sa.bindparam("author_id")))
_INSERT_POST = Command(posts.insert())
_MARK_DELETED = Command(
    posts.update()
    .where(posts.c.id == sa.bindparam("post_id"))
    .values(deleted_at=sa.bindparam("now", type_=UtcDateTime))
)
_COUNT_REPLY = add_to_counter(posts.c.id, posts.c.reply_count)
_COUNT_LIKE = add_to_counter(posts.c.id, posts.c.like_count)
_REMOVE_LIKE = Command(
    likes.delete().where(
        likes.c.post_id == sa.bindparam("post_id"), likes.c.user_id == sa.bindparam("user_id")
    )
)
_NEWER_AUTHOR = Command(
    authors.update()
    .where(authors.c.id == sa.bindparam("author_id"), authors.c.version < sa.bindparam("newer_version"))
    .values(
        handle=sa.bindparam("new_handle"),
        display_name=sa.bindparam("new_display_name"),
        version=sa.bindparam("newer_version"),
    )
)


def _author(author_id: str, handle: str, display_name: str) -> AuthorPublic:
    key = (author_id, handle, display_name)
    author = _AUTHORS.get(key)
    if author is None:
        author = AuthorPublic(id=author_id, handle=handle, display_name=display_name)
        _AUTHORS.put(key, author)
    return author


def _record(row: Any) -> PostRecord:
    return PostRecord(
        id=row.id,
        author=_author(row.author_id, row.handle, row.display_name),
        text=row.text,
        reply_to=row.reply_to,
        root_id=row.root_id,
        audience=row.audience,
        created_at=row.created_at,
        like_count=row.like_count,
        reply_count=row.reply_count,
        deleted=bool(row.deleted),
    )


class SqlPostTransaction(Transaction):
    """The posts queries on one connection.

    A read transaction looks live posts up in `cache` first (`read_since` is the cache's version
    when it began); a write transaction notes in `changed` the posts whose stored row it changes,
    and in `authors_changed` whether it changed an author, which every post of theirs shows.
    """

    def __init__(
        self,
        conn: Connection,
        source: str,
        *,
        cache: RowCache[str, PostRecord] | None = None,
        read_since: int | None = None,
    ) -> None:
        super().__init__(conn, source)
        self._cache = cache
        self._read_since = read_since
        self.changed: set[str] = set()
        self.authors_changed = False

    async def post(self, post_id: str) -> PostRecord | None:
        """One post, deleted or not."""
        rows = await self.conn.fetch(_POST_BY_ID, {"post_id": post_id})
        return _record(rows[0]) if rows else None

    async def live_posts(self, post_ids: list[str]) -> list[PostRecord]:
        """The live posts among `post_ids`."""
        cache, read_since = self._cache, self._read_since
        if cache is None or read_since is None:
            return await self._live_posts_stored(post_ids)
        found: list[PostRecord] = []
        missing: list[str] = []
        for post_id in dict.fromkeys(post_ids):
            post = cache.get(post_id)
            if post is None:
                missing.append(post_id)
            else:
                found.append(post)
        for post in await self._live_posts_stored(missing):
            cache.remember(post.id, post, read_since=read_since)
            found.append(post)
        return found

    async def _live_posts_stored(self, post_ids: list[str]) -> list[PostRecord]:
        if not post_ids:
            return []
        return [_record(row) for row in await self.conn.fetch(_LIVE_POSTS_AMONG, {"post_ids": post_ids})]

    async def posts_by_author(self, author_id: str, page: PageRequest) -> tuple[list[PostRecord], str | None]:
        """A page of an author's live posts."""
        rows, cursor = await _LIVE_POST_IDS_BY_AUTHOR.page(self.conn, page, author_id=author_id)
        ids = [str(row.id) for row in rows]
        found = {post.id: post for post in await self.live_posts(ids)}
        return [found[post_id] for post_id in ids if post_id in found], cursor

    async def insert_post(self, post: PostRecord) -> None:
        """Store a new post."""
        await self.conn.run(
            _INSERT_POST,
            {
                "id": post.id,
                "author_id": post.author.id,
                "text": post.text,
                "reply_to": post.reply_to,
                "root_id": post.root_id,
                "audience": post.audience,
                "created_at": post.created_at,
                "deleted_at": None,
                "like_count": post.like_count,
                "reply_count": post.reply_count,
            },
        )

    async def mark_deleted(self, post_id: str) -> None:
        """Delete a post, keeping its id and thread position."""
        self.changed.add(post_id)
        await self.conn.run(_MARK_DELETED, {"post_id": post_id, "now": utcnow()})

    async def count_reply(self, post_id: str, delta: int) -> None:
        """Change a post's direct reply count."""
        self.changed.add(post_id)
        await self.conn.run(_COUNT_REPLY, {"key": post_id, "delta": delta})

    async def add_like(self, post_id: str, user_id: str) -> bool:
        """Record a like and count it."""
        added = await insert_ignoring_conflicts(
            self.conn, likes, {"post_id": post_id, "user_id": user_id, "created_at": utcnow()}
        )
        if added:
            await self._count_like(post_id, +1)
        return added

    async def remove_like(self, post_id: str, user_id: str) -> bool:
        """Remove a like and uncount it."""
        removed = await self.conn.run(_REMOVE_LIKE, {"post_id": post_id, "user_id": user_id}) == 1
        if removed:
            await self._count_like(post_id, -1)
        return removed

    async def liked_among(self, post_ids: list[str], user_id: str) -> set[str]:
        """Which of `post_ids` `user_id` has liked."""
        rows = await self.conn.fetch(_LIKED_AMONG, {"user_id": user_id, "post_ids": post_ids})
        return {str(row.post_id) for row in rows}

    async def author(self, author_id: str) -> AuthorSnapshot | None:
        """The stored snapshot of an author."""
        rows = await self.conn.fetch(_AUTHOR_BY_ID, {"author_id": author_id})
        return AuthorSnapshot.model_validate(rows[0]._asdict()) if rows else None

    async def save_author(self, author: AuthorSnapshot) -> None:
        """Insert the snapshot, or replace an older one."""
        if not await insert_ignoring_conflicts(self.conn, authors, author.model_dump()):
            replaced = await self.conn.run(
                _NEWER_AUTHOR,
                {
                    "author_id": author.id,
                    "newer_version": author.version,
                    "new_handle": author.handle,
                    "new_display_name": author.display_name,
                },
            )
            # A new author has no posts yet; a replaced profile shows in every post of theirs.
            self.authors_changed = self.authors_changed or replaced > 0

    async def _count_like(self, post_id: str, delta: int) -> None:
        self.changed.add(post_id)
        await self.conn.run(_COUNT_LIKE, {"key": post_id, "delta": delta})


class SqlPostStore(SqlStore[SqlPostTransaction]):
    """The posts store on its own database, which only this process writes.

    Live posts read are kept in memory (up to `cached_posts`, the most recently read; see
    `RowCache`) until a write of this store changes them.
    """

    def __init__(self, db: Database, *, cached_posts: int = CACHED_POSTS) -> None:
        super().__init__(db, SqlPostTransaction, SERVICE)
        self._cache: RowCache[str, PostRecord] = RowCache(cached_posts)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[SqlPostTransaction]:
        """A write transaction; the posts it changed are forgotten once it ended."""
        tx: SqlPostTransaction | None = None
        try:
            async with self._db.write() as conn:
                tx = SqlPostTransaction(conn, SERVICE)
                yield tx
        finally:
            if tx is not None and tx.authors_changed:
                self._cache.forget_all()
            elif tx is not None and tx.changed:
                self._cache.forget(tx.changed)

    def read(self) -> AbstractAsyncContextManager[SqlPostTransaction]:
        """A read-only transaction, served from the cache where it can be."""
        read_since = self._cache.version()
        return WrappedTransaction(
            self._db.read(),
            lambda conn: SqlPostTransaction(conn, SERVICE, cache=self._cache, read_since=read_since),
        )
