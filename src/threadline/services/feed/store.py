"""The feed service's tables and queries; migrations live beside it in `migrations/`."""

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from threadline.platform.clock import utcnow
from threadline.platform.db import (
    Command,
    Database,
    InsertIgnoringConflicts,
    Migrations,
    PagedQuery,
    Query,
    SqlStore,
    Transaction,
    UtcDateTime,
    insert_ignoring_conflicts,
    insert_many_ignoring_conflicts,
)
from threadline.platform.pagination import PageRequest
from threadline.services.feed.api import SERVICE
from threadline.services.feed.service import FollowEdge, PostCopy, TimelineEntry
from threadline.services.posts.api import AuthorPublic

__all__ = ["MIGRATIONS", "SqlFeedStore", "SqlFeedTransaction"]

MIGRATIONS = Migrations(Path(__file__).parent / "migrations")

metadata = sa.MetaData()

follows = sa.Table(
    "follows",
    metadata,
    sa.Column("follower_id", sa.String(36), primary_key=True),
    sa.Column("followee_id", sa.String(36), primary_key=True),
    sa.Column("following", sa.Boolean, nullable=False),
    sa.Column("version", sa.String(36), nullable=False),
)

post_copies = sa.Table(
    "post_copies",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("author_id", sa.String(36), nullable=False),
    sa.Column("author_handle", sa.String(30), nullable=False),
    sa.Column("author_display_name", sa.String(50), nullable=False),
    sa.Column("text", sa.String(500), nullable=True),
    sa.Column("reply_to", sa.String(36), nullable=True),
    sa.Column("root_id", sa.String(36), nullable=False),
    sa.Column("audience", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
)

deleted_posts = sa.Table(
    "deleted_posts",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("deleted_at", UtcDateTime, nullable=False),
)

timeline_entries = sa.Table(
    "timeline_entries",
    metadata,
    sa.Column("owner_id", sa.String(36), primary_key=True),
    sa.Column("post_id", sa.String(36), primary_key=True),
    sa.Column("author_id", sa.String(36), nullable=False),
    sqlite_with_rowid=False,
)

pending_fan_outs = sa.Table(
    "pending_fan_outs",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("post_id", sa.String(36), nullable=False),
    sa.Column("author_id", sa.String(36), nullable=False),
)

_OWNER_ID = sa.bindparam("owner_id", type_=sa.String)
_PAGE_LIMIT = sa.bindparam("page_limit", type_=sa.Integer)
_PAGE_CURSOR = sa.bindparam("page_cursor", type_=sa.String)


def _timeline_page(*, after_cursor: bool) -> Query:
    """The newest post ids of one timeline: its entries, and the posts still waiting for their fan-out.

    Those are the waiting posts of the accounts the owner follows now, and the owner's own. Only
    the newest page of entries is read (its own LIMIT), so a long timeline costs no more.
    """
    entries = sa.select(timeline_entries.c.post_id).where(timeline_entries.c.owner_id == _OWNER_ID)
    followed = (
        sa.select(pending_fan_outs.c.post_id)
        .select_from(follows.join(pending_fan_outs, pending_fan_outs.c.author_id == follows.c.followee_id))
        .where(follows.c.follower_id == _OWNER_ID, follows.c.following)
    )
    own = sa.select(pending_fan_outs.c.post_id).where(pending_fan_outs.c.author_id == _OWNER_ID)
    if after_cursor:
        entries = entries.where(timeline_entries.c.post_id < _PAGE_CURSOR)
        followed = followed.where(pending_fan_outs.c.post_id < _PAGE_CURSOR)
        own = own.where(pending_fan_outs.c.post_id < _PAGE_CURSOR)
    newest = entries.order_by(timeline_entries.c.post_id.desc()).limit(_PAGE_LIMIT).subquery()
    ids = sa.union(sa.select(newest.c.post_id), followed, own).subquery()
    return Query(sa.select(ids.c.post_id).order_by(ids.c.post_id.desc()).limit(_PAGE_LIMIT))


_TIMELINE = PagedQuery.of(
    _timeline_page(after_cursor=False), _timeline_page(after_cursor=True), cursor_key="post_id"
)
# When no post waits (most reads: fan-outs go out within moments), the entries alone: the
# merge's probes for the followees' waiting posts and its two sorts cost more than the entries.
_TIMELINE_ENTRIES = PagedQuery(
    sa.select(timeline_entries.c.post_id).where(timeline_entries.c.owner_id == _OWNER_ID),
    timeline_entries.c.post_id,
)
_ANY_WAITING = Query(sa.select(sa.exists(sa.select(pending_fan_outs.c.seq)).label("waiting")))
_FOLLOW_EDGE = Query(
    sa.select(follows).where(
        follows.c.follower_id == sa.bindparam("follower_id"),
        follows.c.followee_id == sa.bindparam("followee_id"),
    )
)
_QUEUE_FAN_OUT = Command(pending_fan_outs.insert())
_LAST_SEQ = sa.bindparam("last_seq", type_=sa.Integer)
_OLDEST_BATCH = (
    sa.select(pending_fan_outs.c.seq).order_by(pending_fan_outs.c.seq).limit(sa.bindparam("batch"))
)
_LAST_OF_OLDEST = Query(sa.select(sa.func.max(_OLDEST_BATCH.subquery().c.seq).label("last_seq")))
_WAITING = Query(sa.select(sa.func.count().label("waiting")).select_from(pending_fan_outs))
_WAITING_UP_TO_LAST = pending_fan_outs.c.seq <= _LAST_SEQ
# One statement for the whole batch, in key order, so that the entries of one timeline go into
# its newest page together. (SQLite needs a WHERE in the last SELECT of an INSERT ... SELECT ...
# ON CONFLICT to parse it.)
_FAN_OUT_WAITING = InsertIgnoringConflicts(
    timeline_entries,
    columns=["owner_id", "post_id", "author_id"],
    from_select=sa.select(follows.c.follower_id, pending_fan_outs.c.post_id, pending_fan_outs.c.author_id)
    .select_from(
        pending_fan_outs.join(
            follows, sa.and_(follows.c.followee_id == pending_fan_outs.c.author_id, follows.c.following)
        )
    )
    .where(_WAITING_UP_TO_LAST)
    .union_all(
        sa.select(
            pending_fan_outs.c.author_id, pending_fan_outs.c.post_id, pending_fan_outs.c.author_id
        ).where(_WAITING_UP_TO_LAST)
    )
    .order_by(sa.literal_column("1"), sa.literal_column("2")),
)
# A waiting post leaves the table only once its author's own entry shows its fan-out happened: on
# PostgreSQL a post queued with a lower seq can commit between the fan-out and this statement.
_DROP_FANNED_OUT = Command(
    pending_fan_outs.delete().where(
        _WAITING_UP_TO_LAST,
        sa.exists().where(
            timeline_entries.c.owner_id == pending_fan_outs.c.author_id,
            timeline_entries.c.post_id == pending_fan_outs.c.post_id,
        ),
    )
)
_DROP_WAITING_POST = Command(
    pending_fan_outs.delete().where(pending_fan_outs.c.post_id == sa.bindparam("post_id"))
)
_NEWER_EDGE = Command(
    follows.update()
    .where(
        follows.c.follower_id == sa.bindparam("follower"),
        follows.c.followee_id == sa.bindparam("followee"),
        follows.c.version < sa.bindparam("newer_version"),
    )
    .values(following=sa.bindparam("now_following", type_=sa.Boolean), version=sa.bindparam("newer_version"))
)
# Fills in a copy that lacked its text; every column but the id, each from a parameter `new_<column>`.
_FILL_COPY = Command(
    post_copies.update()
    .where(post_copies.c.id == sa.bindparam("copy_id"), post_copies.c.text.is_(None))
    .values(
        {
            column: sa.bindparam(f"new_{column.key}", type_=column.type)
            for column in post_copies.c
            if column.key != "id"
        }
    )
)
_DROP_COPY = Command(post_copies.delete().where(post_copies.c.id == sa.bindparam("post_id")))
_DROP_POST_ENTRIES = Command(
    timeline_entries.delete().where(timeline_entries.c.post_id == sa.bindparam("post_id"))
)
_DROP_AUTHOR_ENTRIES = Command(
    timeline_entries.delete().where(
        timeline_entries.c.owner_id == sa.bindparam("owner_id"),
        timeline_entries.c.author_id == sa.bindparam("author_id"),
    )
)
_COPIES_AMONG = Query(
    sa.select(post_copies).where(post_copies.c.id.in_(sa.bindparam("post_ids", expanding=True)))
)
_DELETED_AMONG = Query(
    sa.select(deleted_posts.c.id).where(deleted_posts.c.id.in_(sa.bindparam("post_ids", expanding=True)))
)


def _copy_row(post: PostCopy) -> dict[str, Any]:
    return {
        **post.model_dump(exclude={"author"}),
        "author_id": post.author.id,
        "author_handle": post.author.handle,
        "author_display_name": post.author.display_name,
    }


def _copy(row: Any) -> PostCopy:
    return PostCopy(
        id=row.id,
        author=AuthorPublic(id=row.author_id, handle=row.author_handle, display_name=row.author_display_name),
        text=row.text,
        reply_to=row.reply_to,
        root_id=row.root_id,
        audience=row.audience,
        created_at=row.created_at,
    )


class SqlFeedTransaction(Transaction):
    """The feed queries on one connection."""

    async def follow_edge(self, follower_id: str, followee_id: str) -> FollowEdge | None:
        """The latest known state of one follow."""
        rows = await self.conn.fetch(_FOLLOW_EDGE, {"follower_id": follower_id, "followee_id": followee_id})
        return FollowEdge.model_validate(rows[0]._asdict()) if rows else None

    async def save_follow_edge(self, edge: FollowEdge) -> bool:
        """Insert the edge, or replace an older one."""
        if await insert_ignoring_conflicts(self.conn, follows, edge.model_dump()):
            return True
        changed = await self.conn.run(
            _NEWER_EDGE,
            {
                "follower": edge.follower_id,
                "followee": edge.followee_id,
                "newer_version": edge.version,
                "now_following": edge.following,
            },
        )
        return changed == 1

    async def queue_fan_out(self, post_id: str, author_id: str) -> None:
        """Let the post wait for its fan-out, read with the timelines meanwhile."""
        await self.conn.run(_QUEUE_FAN_OUT, {"post_id": post_id, "author_id": author_id})

    async def keep_post(self, post: PostCopy) -> None:
        """Insert the copy, or fill in the text a stored copy lacked."""
        row = _copy_row(post)
        if await insert_ignoring_conflicts(self.conn, post_copies, row) or post.text is None:
            return
        filled = {f"new_{key}": value for key, value in row.items() if key != "id"}
        await self.conn.run(_FILL_COPY, {"copy_id": post.id, **filled})

    async def posts(self, post_ids: list[str]) -> list[PostCopy]:
        """The stored copies among `post_ids`."""
        if not post_ids:
            return []
        return [_copy(row) for row in await self.conn.fetch(_COPIES_AMONG, {"post_ids": post_ids})]

    async def deleted_among(self, post_ids: list[str]) -> set[str]:
        """Which of `post_ids` are tombstoned."""
        if not post_ids:
            return set()
        rows = await self.conn.fetch(_DELETED_AMONG, {"post_ids": post_ids})
        return {str(row.id) for row in rows}

    async def mark_deleted(self, post_id: str) -> None:
        """Tombstone the post, drop its copy and its timeline entries."""
        await insert_ignoring_conflicts(self.conn, deleted_posts, {"id": post_id, "deleted_at": utcnow()})
        await self.conn.run(_DROP_COPY, {"post_id": post_id})
        await self.conn.run(_DROP_POST_ENTRIES, {"post_id": post_id})
        await self.conn.run(_DROP_WAITING_POST, {"post_id": post_id})

    async def add_entries(self, entries: list[TimelineEntry]) -> None:
        """Insert timeline entries, skipping those already there."""
        await insert_many_ignoring_conflicts(
            self.conn, timeline_entries, [entry.model_dump() for entry in entries]
        )

    async def remove_author(self, owner_id: str, author_id: str) -> None:
        """Take an author's posts out of one timeline."""
        await self.conn.run(_DROP_AUTHOR_ENTRIES, {"owner_id": owner_id, "author_id": author_id})

    async def timeline(self, owner_id: str, page: PageRequest) -> tuple[list[str], str | None]:
        """A page of one timeline's post ids, newest first, waiting posts included."""
        waiting = (await self.conn.fetch(_ANY_WAITING, {}))[0].waiting
        paged = _TIMELINE if waiting else _TIMELINE_ENTRIES
        rows, cursor = await paged.page(self.conn, page, owner_id=owner_id)
        return [str(row.post_id) for row in rows], cursor


class SqlFeedStore(SqlStore[SqlFeedTransaction]):
    """The feed store on its own database."""

    def __init__(self, db: Database) -> None:
        super().__init__(db, SqlFeedTransaction, SERVICE)

    async def waiting_fan_outs(self) -> int:
        """How many posts wait for their fan-out."""
        async with self._db.read() as conn:
            return int((await conn.fetch(_WAITING, {}))[0][0])

    async def fan_out_waiting(self, batch: int) -> int:
        """Fan out the `batch` posts that have waited longest, in one transaction; how many left the queue.

        Its statements run off the event loop's thread: a batch of hundreds takes a while. Its
        commit does not wait for the disk: lost with the machine, the posts it took from the
        queue are back in it (one transaction), and go out again. A batch dirties a timeline page
        per follower; syncing them cost a tenth of a compose's CPU under steady posting.
        """
        async with self._db.write(durable=False, off_loop=True) as conn:
            last = (await conn.fetch(_LAST_OF_OLDEST, {"batch": batch}))[0][0]
            if last is None:
                return 0
            await conn.run(_FAN_OUT_WAITING.command(conn.dialect), {"last_seq": last})
            return await conn.run(_DROP_FANNED_OUT, {"last_seq": last})
