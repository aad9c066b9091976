"""FakeFeedStore and SqlFeedStore (SQLite, PostgreSQL) keep the same semantics: one test body for all."""

from collections.abc import AsyncIterator

import pytest

from tests.fakes.feed import FakeFeedStore
from threadline.platform.clock import utcnow
from threadline.platform.db import Database
from threadline.platform.ids import new_id
from threadline.platform.pagination import PageRequest
from threadline.services.feed.service import FeedStore, FollowEdge, PostCopy, TimelineEntry
from threadline.services.feed.store import MIGRATIONS, SqlFeedStore
from threadline.services.posts.api import Audience, AuthorPublic


@pytest.fixture
async def store(store_database_url: str | None) -> AsyncIterator[FeedStore]:
    """The in-memory fake, or the SQL store on a fresh SQLite file or PostgreSQL database."""
    if store_database_url is None:
        yield FakeFeedStore()
        return
    database = Database(store_database_url)
    await database.open([MIGRATIONS])
    try:
        yield SqlFeedStore(database)
    finally:
        await database.close()


def copy_of(post_id: str, text: str | None, audience: Audience = "public", author: str = "ada") -> PostCopy:
    """A copy of a root post by `author`."""
    return PostCopy(
        id=post_id,
        author=AuthorPublic(id=author, handle=author, display_name=author.title()),
        text=text,
        reply_to=None,
        root_id=post_id,
        audience=audience,
        created_at=utcnow(),
    )


def edge(following: bool, version: str, follower: str = "bob", followee: str = "ada") -> FollowEdge:
    """The state of one follow as of event `version`."""
    return FollowEdge(follower_id=follower, followee_id=followee, following=following, version=version)


async def owners_of(store: FeedStore, post_id: str, candidates: list[str]) -> list[str]:
    """Which of `candidates` have `post_id` in their timeline."""
    async with store.read() as tx:
        return [owner for owner in candidates if post_id in (await tx.timeline(owner, PageRequest()))[0]]


async def test_follow_edges_keep_the_newest_version(store: FeedStore) -> None:
    """An edge replaces a stored one only if its version is newer; fan-out reaches those following now."""
    older, newer = new_id(), new_id()
    async with store.write() as tx:
        assert await tx.save_follow_edge(edge(False, newer))
        assert not await tx.save_follow_edge(edge(True, older))
        assert not await tx.save_follow_edge(edge(True, newer))
        assert await tx.save_follow_edge(edge(True, new_id(), follower="cy"))
        first = new_id()
        await tx.queue_fan_out(first, "ada")
    assert await store.fan_out_waiting(10) == 1
    async with store.read() as tx:
        assert await tx.follow_edge("bob", "ada") == edge(False, newer)
        assert await tx.follow_edge("ada", "bob") is None
    assert await owners_of(store, first, ["ada", "bob", "cy"]) == ["ada", "cy"]
    async with store.write() as tx:
        assert await tx.save_follow_edge(edge(True, new_id()))
        second = new_id()
        await tx.queue_fan_out(second, "ada")
    assert await store.fan_out_waiting(10) == 1
    assert await owners_of(store, second, ["ada", "bob", "cy"]) == ["ada", "bob", "cy"]


async def test_fan_out_reaches_every_follower_once(store: FeedStore) -> None:
    """A post reaches its author and each follower once, even fanned out twice, and no one else."""
    followers = [f"f{i}" for i in range(30)]
    async with store.write() as tx:
        for follower in followers:
            await tx.save_follow_edge(edge(True, new_id(), follower=follower))
        await tx.save_follow_edge(edge(True, new_id(), follower="eve", followee="cy"))
        post = new_id()
        await tx.add_entries([TimelineEntry(owner_id="f3", post_id=post, author_id="ada")])
        await tx.queue_fan_out(post, "ada")
    candidates = ["ada", *followers, "eve", "cy"]
    assert await owners_of(store, post, candidates) == ["ada", *followers]
    assert await store.fan_out_waiting(10) == 1
    async with store.write() as tx:
        await tx.queue_fan_out(post, "ada")
    assert await store.fan_out_waiting(10) == 1
    assert await store.waiting_fan_outs() == 0
    assert await owners_of(store, post, candidates) == ["ada", *followers]
    async with store.read() as tx:
        page, _ = await tx.timeline("f3", PageRequest())
    assert page == [post]


async def test_waiting_posts_are_read_with_the_timelines_they_will_join(store: FeedStore) -> None:
    """Before its fan-out a post is in the pages of its author and of those following now, in order."""
    async with store.write() as tx:
        await tx.save_follow_edge(edge(True, new_id()))
        await tx.save_follow_edge(edge(True, new_id(), follower="cy", followee="dan"))
        await tx.save_follow_edge(edge(False, new_id(), follower="cy"))
    ids = [new_id() for _ in range(5)]
    async with store.write() as tx:
        await tx.add_entries([TimelineEntry(owner_id="bob", post_id=i, author_id="ada") for i in ids[0:4:2]])
        await tx.queue_fan_out(ids[1], "ada")
        await tx.queue_fan_out(ids[3], "dan")
        await tx.queue_fan_out(ids[4], "ada")
    async with store.read() as tx:
        first, cursor = await tx.timeline("bob", PageRequest(limit=2))
        rest, end = await tx.timeline("bob", PageRequest(limit=2, cursor=cursor))
        assert (await tx.timeline("ada", PageRequest()))[0] == [ids[4], ids[1]]
        assert (await tx.timeline("cy", PageRequest()))[0] == [ids[3]]
    assert first + rest == [ids[4], ids[2], ids[1], ids[0]]
    assert (cursor, end) == (ids[2], None)
    assert await store.waiting_fan_outs() == 3
    assert await store.fan_out_waiting(2) == 2
    assert await store.waiting_fan_outs() == 1
    assert await store.fan_out_waiting(2) == 1
    assert await store.fan_out_waiting(2) == 0
    async with store.read() as tx:
        assert (await tx.timeline("bob", PageRequest()))[0] == [ids[4], ids[2], ids[1], ids[0]]
        assert (await tx.timeline("ada", PageRequest()))[0] == [ids[4], ids[1]]
        assert (await tx.timeline("cy", PageRequest()))[0] == [ids[3]]


async def test_a_waiting_post_leaves_a_timeline_on_unfollow_and_everywhere_on_delete(
    store: FeedStore,
) -> None:
    """An unfollow hides a followee's waiting posts, which then skip that timeline; a delete drops one."""
    kept, gone = new_id(), new_id()
    async with store.write() as tx:
        await tx.save_follow_edge(edge(True, new_id()))
        await tx.save_follow_edge(edge(True, new_id(), follower="cy"))
        await tx.queue_fan_out(kept, "ada")
        await tx.queue_fan_out(gone, "ada")
    async with store.write() as tx:
        await tx.save_follow_edge(edge(False, new_id(), follower="cy"))
        await tx.mark_deleted(gone)
    assert await owners_of(store, kept, ["ada", "bob", "cy"]) == ["ada", "bob"]
    assert await owners_of(store, gone, ["ada", "bob", "cy"]) == []
    assert await store.fan_out_waiting(10) == 1
    assert await owners_of(store, kept, ["ada", "bob", "cy"]) == ["ada", "bob"]
    assert await owners_of(store, gone, ["ada", "bob", "cy"]) == []


async def test_copies_only_gain_their_text(store: FeedStore) -> None:
    """A stored copy is replaced only by one that knows the text it lacked, never the other way."""
    async with store.write() as tx:
        await tx.keep_post(copy_of("p1", None, "subscribers"))
        await tx.keep_post(copy_of("p2", "known", "subscribers"))
    async with store.write() as tx:
        await tx.keep_post(copy_of("p1", "filled in", "subscribers"))
        await tx.keep_post(copy_of("p2", None, "subscribers"))
        await tx.keep_post(copy_of("p1", "another", "subscribers"))
    async with store.read() as tx:
        texts = {copy.id: copy.text for copy in await tx.posts(["p1", "p2", "missing"])}
    assert texts == {"p1": "filled in", "p2": "known"}


async def test_timeline_pages_newest_first_without_duplicates(store: FeedStore) -> None:
    """Entries added twice appear once; pages run newest first by post id with a cursor."""
    ids = [new_id() for _ in range(5)]
    async with store.write() as tx:
        await tx.add_entries([TimelineEntry(owner_id="bob", post_id=i, author_id="ada") for i in ids])
        await tx.add_entries([TimelineEntry(owner_id="bob", post_id=ids[0], author_id="ada")])
        await tx.add_entries([TimelineEntry(owner_id="cy", post_id=ids[0], author_id="ada")])
        await tx.add_entries([])
    async with store.read() as tx:
        first, cursor = await tx.timeline("bob", PageRequest(limit=3))
        rest, end = await tx.timeline("bob", PageRequest(limit=3, cursor=cursor))
        exact, none = await tx.timeline("bob", PageRequest(limit=5))
    assert first + rest == exact == list(reversed(ids))
    assert (cursor, end, none) == (ids[2], None, None)


async def test_removing_an_author_touches_one_timeline(store: FeedStore) -> None:
    """remove_author drops that author's entries from that owner's timeline only."""
    by_ada, by_cy = new_id(), new_id()
    async with store.write() as tx:
        await tx.add_entries(
            [
                TimelineEntry(owner_id="bob", post_id=by_ada, author_id="ada"),
                TimelineEntry(owner_id="bob", post_id=by_cy, author_id="cy"),
                TimelineEntry(owner_id="dan", post_id=by_ada, author_id="ada"),
            ]
        )
        await tx.remove_author("bob", "ada")
    async with store.read() as tx:
        assert (await tx.timeline("bob", PageRequest()))[0] == [by_cy]
        assert (await tx.timeline("dan", PageRequest()))[0] == [by_ada]


async def test_deleting_tombstones_and_clears_everywhere(store: FeedStore) -> None:
    """mark_deleted remembers the post, drops its copy and every timeline entry of it, idempotently."""
    gone, kept = new_id(), new_id()
    async with store.write() as tx:
        await tx.keep_post(copy_of(gone, "gone"))
        await tx.keep_post(copy_of(kept, "kept"))
        await tx.add_entries(
            [
                TimelineEntry(owner_id=owner, post_id=p, author_id="ada")
                for owner in ("ada", "bob")
                for p in (gone, kept)
            ]
        )
        await tx.mark_deleted(gone)
        await tx.mark_deleted(gone)
        await tx.mark_deleted("never-seen")
    async with store.read() as tx:
        assert await tx.deleted_among([gone, kept, "never-seen"]) == {gone, "never-seen"}
        assert await tx.deleted_among([]) == set()
        assert [copy.id for copy in await tx.posts([gone, kept])] == [kept]
        assert (await tx.timeline("ada", PageRequest()))[0] == [kept]
        assert (await tx.timeline("bob", PageRequest()))[0] == [kept]


async def test_claiming_an_event_twice_fails(store: FeedStore) -> None:
    """The consumer guard accepts an event id once, and a rolled-back claim does not count."""
    event_id = new_id()

    async def claim_then_fail() -> None:
        async with store.write() as tx:
            assert await tx.claim_event("feed", event_id)
            raise RuntimeError("roll back")

    with pytest.raises(RuntimeError):
        await claim_then_fail()
    async with store.write() as tx:
        assert await tx.claim_event("feed", event_id)
        assert not await tx.claim_event("feed", event_id)
    async with store.write() as tx:
        assert not await tx.claim_event("feed", event_id)
