"""FakeThreadStore and SqlThreadStore answer the same: the same test body runs against both."""

from collections.abc import AsyncIterator

import pytest

from tests.fakes.threads import FakeThreadStore
from threadline.platform.db import Database
from threadline.services.threads.service import ThreadNode, ThreadStore
from threadline.services.threads.store import MIGRATIONS, SqlThreadStore


@pytest.fixture
async def store(store_database_url: str | None) -> AsyncIterator[ThreadStore]:
    """An empty threads store: in memory, or SQLite or PostgreSQL through the real migrations."""
    if store_database_url is None:
        yield FakeThreadStore()
        return
    database = Database(store_database_url)
    await database.open([MIGRATIONS])
    try:
        yield SqlThreadStore(database)
    finally:
        await database.close()


def node(node_id: str, parent_id: str | None = None, root_id: str = "r") -> ThreadNode:
    return ThreadNode(id=node_id, parent_id=parent_id, root_id=root_id)


async def conversation(store: ThreadStore, post_id: str) -> list[ThreadNode]:
    async with store.read() as tx:
        return sorted(await tx.conversation(post_id), key=lambda n: n.id)


async def test_conversation_is_every_node_sharing_the_root(store: ThreadStore) -> None:
    """Any node's conversation is all nodes with its root, and only those; an unknown id has none."""
    async with store.write() as tx:
        for added in (
            node("r"),
            node("r1", "r"),
            node("r2", "r1"),
            node("s", root_id="s"),
            node("s1", "s", "s"),
        ):
            assert await tx.add_node(added)

    assert await conversation(store, "r2") == [node("r"), node("r1", "r"), node("r2", "r1")]
    assert await conversation(store, "s") == [node("s", root_id="s"), node("s1", "s", "s")]
    assert await conversation(store, "unknown") == []


async def test_adding_a_known_node_changes_nothing(store: ThreadStore) -> None:
    """A second add of the same id is refused and keeps the first."""
    async with store.write() as tx:
        assert await tx.add_node(node("r"))
        assert not await tx.add_node(node("r", "x"))

    assert await conversation(store, "r") == [node("r")]


async def test_burying_marks_known_nodes_and_leaves_tombstones_for_unknown_ones(store: ThreadStore) -> None:
    """Burying marks a known node deleted, or stores a tombstone for an unknown one that add cannot revive."""
    async with store.write() as tx:
        await tx.add_node(node("r"))
        await tx.add_node(node("r1", "r"))
        await tx.bury_node(node("r1", "r"))
        await tx.bury_node(node("r1", "r"))
        await tx.bury_node(node("r2", "r1"))
        assert not await tx.add_node(node("r2", "r1"))

    assert await conversation(store, "r") == [
        node("r"),
        ThreadNode(id="r1", parent_id="r", root_id="r", deleted=True),
        ThreadNode(id="r2", parent_id="r1", root_id="r", deleted=True),
    ]


async def test_claiming_an_event_twice_is_refused(store: ThreadStore) -> None:
    """The consumer guard claims an event once per consumer."""
    async with store.write() as tx:
        assert await tx.claim_event("threads", "e1")
        assert not await tx.claim_event("threads", "e1")
        assert await tx.claim_event("threads", "e2")


async def test_a_write_that_raises_leaves_nothing(store: ThreadStore) -> None:
    """A rolled-back write adds no node and claims no event."""

    async def failing_write() -> None:
        async with store.write() as tx:
            await tx.claim_event("threads", "e1")
            await tx.add_node(node("r"))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await failing_write()

    assert await conversation(store, "r") == []
    async with store.write() as tx:
        assert await tx.claim_event("threads", "e1")
