"""FakePostStore and SqlPostStore answer the same, and reads served from SqlPostStore's cache see every write.

Each test reads first, so that the SQL store holds the posts in memory before the write it checks.
"""

from collections.abc import AsyncIterator

import pytest

from tests.fakes.posts import FakePostStore
from threadline.platform.clock import utcnow
from threadline.platform.db import Database
from threadline.platform.pagination import PageRequest
from threadline.services.posts.api import AuthorPublic
from threadline.services.posts.service import AuthorSnapshot, PostRecord, PostStore
from threadline.services.posts.store import MIGRATIONS, SqlPostStore

ANN = AuthorSnapshot(id="ann-id", handle="ann", display_name="Ann", version=1)


@pytest.fixture
async def store(store_database_url: str | None) -> AsyncIterator[PostStore]:
    """A posts store holding Ann's snapshot: in memory, or SQLite or PostgreSQL through its migrations."""
    if store_database_url is None:
        fake = FakePostStore()
        await _save_author(fake, ANN)
        yield fake
        return
    database = Database(store_database_url)
    await database.open([MIGRATIONS])
    try:
        sql = SqlPostStore(database)
        await _save_author(sql, ANN)
        yield sql
    finally:
        await database.close()


async def _save_author(store: PostStore, author: AuthorSnapshot) -> None:
    async with store.write() as tx:
        await tx.save_author(author)


async def _insert(store: PostStore, post_id: str, reply_to: str | None = None) -> None:
    async with store.write() as tx:
        await tx.insert_post(
            PostRecord(
                id=post_id,
                author=AuthorPublic(id=ANN.id, handle=ANN.handle, display_name=ANN.display_name),
                text=f"text of {post_id}",
                reply_to=reply_to,
                root_id="p1",
                audience="public",
                created_at=utcnow(),
                like_count=0,
                reply_count=0,
            )
        )
        if reply_to is not None:
            await tx.count_reply(reply_to, +1)


async def _live(store: PostStore, *post_ids: str) -> dict[str, PostRecord]:
    async with store.read() as tx:
        return {post.id: post for post in await tx.live_posts(list(post_ids))}


async def _author_page(store: PostStore) -> list[str]:
    async with store.read() as tx:
        posts, _ = await tx.posts_by_author(ANN.id, PageRequest(limit=10))
    return [post.id for post in posts]


async def test_live_posts_are_found_once_each_and_missing_ones_left_out(store: PostStore) -> None:
    """A batch read gives each live post once, whether read before or not, and nothing for unknown ids."""
    await _insert(store, "p1")
    await _insert(store, "p2")
    assert set(await _live(store, "p1")) == {"p1"}
    async with store.read() as tx:
        found = await tx.live_posts(["p2", "p1", "unknown", "p1"])
    assert sorted(post.id for post in found) == ["p1", "p2"]


async def test_a_like_and_its_withdrawal_show_in_later_reads(store: PostStore) -> None:
    """The like count read after a like, and after its removal, is the stored one."""
    await _insert(store, "p1")
    assert (await _live(store, "p1"))["p1"].like_count == 0
    async with store.write() as tx:
        assert await tx.add_like("p1", "bob-id")
    assert (await _live(store, "p1"))["p1"].like_count == 1
    async with store.write() as tx:
        assert await tx.remove_like("p1", "bob-id")
    assert (await _live(store, "p1"))["p1"].like_count == 0


async def test_a_reply_and_a_deletion_show_in_later_reads(store: PostStore) -> None:
    """The parent's reply count follows its replies; a deleted post leaves batch reads and author pages."""
    await _insert(store, "p1")
    assert (await _live(store, "p1"))["p1"].reply_count == 0
    assert await _author_page(store) == ["p1"]
    await _insert(store, "p2", reply_to="p1")
    assert (await _live(store, "p1", "p2"))["p1"].reply_count == 1
    assert await _author_page(store) == ["p2", "p1"]
    async with store.write() as tx:
        await tx.mark_deleted("p2")
        await tx.count_reply("p1", -1)
    assert list(await _live(store, "p1", "p2")) == ["p1"]
    assert (await _live(store, "p1"))["p1"].reply_count == 0
    assert await _author_page(store) == ["p1"]


async def test_a_newer_author_profile_shows_in_posts_read_before(store: PostStore) -> None:
    """Posts read before an author's profile changed show the new one afterwards."""
    await _insert(store, "p1")
    assert (await _live(store, "p1"))["p1"].author.display_name == "Ann"
    await _save_author(store, ANN.model_copy(update={"display_name": "Ann B.", "version": 2}))
    assert (await _live(store, "p1"))["p1"].author.display_name == "Ann B."


async def test_a_write_that_rolled_back_leaves_reads_as_they_were(store: PostStore) -> None:
    """A like whose transaction failed is not counted, and reads after it say so."""
    await _insert(store, "p1")
    assert (await _live(store, "p1"))["p1"].like_count == 0
    with pytest.raises(RuntimeError):
        await _like_then_fail(store)
    assert (await _live(store, "p1"))["p1"].like_count == 0


async def _like_then_fail(store: PostStore) -> None:
    async with store.write() as tx:
        await tx.add_like("p1", "bob-id")
        raise RuntimeError("the request failed after liking")


async def test_a_read_older_than_a_write_does_not_outlive_it(store: PostStore) -> None:
    """A read transaction that began before a like committed may see the old count, but leaves no trace of it.

    On SQLite a read transaction keeps the snapshot of its first read: the post read after the
    like has committed is the old one, and must not be what later reads are served.
    """
    await _insert(store, "p1")
    await _insert(store, "p2")
    async with store.read() as older:
        await older.live_posts(["p2"])
        async with store.write() as tx:
            assert await tx.add_like("p1", "bob-id")
        seen_by_older = await older.live_posts(["p1"])
    assert [post.like_count for post in seen_by_older] in ([0], [1])
    assert (await _live(store, "p1"))["p1"].like_count == 1
