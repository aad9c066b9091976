"""The threads application layer over a fake store and a fake posts: trees, deletes, event order, batching."""

import random

import pytest

from tests.fakes.threads import FakePosts, FakeThreadStore
from threadline.platform.errors import ServiceUnavailable
from threadline.platform.events import Event
from threadline.platform.tokens import Identity
from threadline.services.posts.api import MAX_BATCH, PostPublic
from threadline.services.threads import events
from threadline.services.threads.api import ThreadNotFound, ThreadPublic
from threadline.services.threads.service import ThreadsService, ThreadStore


@pytest.fixture
def store() -> FakeThreadStore:
    return FakeThreadStore()


@pytest.fixture
def posts() -> FakePosts:
    return FakePosts()


@pytest.fixture
def service(store: FakeThreadStore, posts: FakePosts) -> ThreadsService:
    port: ThreadStore = store
    return ThreadsService(port, posts)


class Deliver:
    """Hands events to the service's handlers, as the bus does (in whatever order the test picks)."""

    def __init__(self, service: ThreadsService) -> None:
        self._handlers = events.handlers(service)

    async def __call__(self, *delivered: Event) -> None:
        for event in delivered:
            await self._handlers[event.type](event)


@pytest.fixture
def deliver(service: ThreadsService) -> Deliver:
    return Deliver(service)


def shape(thread: ThreadPublic) -> list[tuple[str, int]]:
    """The replies of a thread as (text, depth), in the order given."""
    return [(reply.text or "", reply.depth) for reply in thread.replies]


async def tree(posts: FakePosts, deliver: Deliver) -> dict[str, PostPublic]:
    """root ─ a ─ a1 ─ a1x / a ─ a2 / root ─ b ─ b1, published and delivered in creation order."""
    made: dict[str, PostPublic] = {}
    for text, parent in [
        ("root", None),
        ("a", "root"),
        ("b", "root"),
        ("a1", "a"),
        ("b1", "b"),
        ("a2", "a"),
        ("a1x", "a1"),
    ]:
        made[text], created = posts.publish(None if parent is None else made[parent], text=text)
        await deliver(created)
    return made


TREE_SHAPE = [("a", 1), ("a1", 2), ("a1x", 3), ("a2", 2), ("b", 1), ("b1", 2)]


# --- reading ------------------------------------------------------------------------------------


async def test_replies_are_depth_first_oldest_sibling_first(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """Replies come depth-first, older siblings before younger, each with its depth below the root."""
    made = await tree(posts, deliver)

    thread = await service.get_thread(made["root"].id, None)

    assert thread.root == made["root"]
    assert shape(thread) == TREE_SHAPE
    assert thread.degraded == []


async def test_any_post_of_a_conversation_gives_the_whole_conversation(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """Asking for a deep reply returns the same whole conversation as asking for its root."""
    made = await tree(posts, deliver)

    assert await service.get_thread(made["a1x"].id, None) == await service.get_thread(made["root"].id, None)


async def test_replies_carry_the_post_as_posts_shows_it(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """Each reply is the post posts returned, plus its depth."""
    root, created = posts.publish(text="root")
    reply, reply_created = posts.publish(root, text="reply", audience="subscribers")
    await deliver(created, reply_created)

    thread = await service.get_thread(root.id, None)

    assert thread.replies[0].model_dump() == {**reply.model_dump(), "depth": 1}


async def test_a_post_without_replies_is_a_thread_of_its_own(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """A lone post is the root of a thread with no replies."""
    root, created = posts.publish()
    await deliver(created)

    assert await service.get_thread(root.id, None) == ThreadPublic(root=root, replies=[], degraded=[])


async def test_deep_chain_keeps_every_depth(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """A chain of 60 replies each answering the previous one comes back in order at depths 1..60."""
    root, created = posts.publish(text="0")
    await deliver(created)
    parent = root
    for depth in range(1, 61):
        parent, created = posts.publish(parent, text=str(depth))
        await deliver(created)

    thread = await service.get_thread(parent.id, None)

    assert shape(thread) == [(str(depth), depth) for depth in range(1, 61)]
    assert len(posts.reads) == 1


async def test_unknown_post_is_not_found(service: ThreadsService, posts: FakePosts, deliver: Deliver) -> None:
    """A post id the threads service never heard of is ThreadNotFound, without asking posts."""
    await tree(posts, deliver)

    with pytest.raises(ThreadNotFound):
        await service.get_thread("no-such-post", None)
    assert posts.reads == []


async def test_viewer_is_passed_to_posts(service: ThreadsService, posts: FakePosts, deliver: Deliver) -> None:
    """The bodies are read as the viewer sees them."""
    made = await tree(posts, deliver)
    viewer = Identity(user_id="viewer-1", handle="vic", display_name="Vic", token="test-token")

    await service.get_thread(made["root"].id, viewer)

    assert [read.viewer for read in posts.reads] == [viewer]


# --- deletes ------------------------------------------------------------------------------------


async def test_deleted_reply_disappears_and_its_replies_stay_in_place(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """After a reply's post.deleted, it is gone and its descendants keep their position and depth."""
    made = await tree(posts, deliver)

    await deliver(posts.delete(made["a"]))

    thread = await service.get_thread(made["root"].id, None)
    assert shape(thread) == [row for row in TREE_SHAPE if row[0] != "a"]
    assert [read.post_ids for read in posts.reads] == [
        [made[text].id for text in ("root", "a1", "a1x", "a2", "b", "b1")]
    ]


async def test_deleted_reply_itself_is_not_found(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """Asking for the conversation of a deleted reply is ThreadNotFound."""
    made = await tree(posts, deliver)

    await deliver(posts.delete(made["a1"]))

    with pytest.raises(ThreadNotFound):
        await service.get_thread(made["a1"].id, None)


@pytest.mark.parametrize("asked", ["root", "a", "a1x"])
async def test_deleted_root_makes_the_conversation_not_found(
    service: ThreadsService, posts: FakePosts, deliver: Deliver, asked: str
) -> None:
    """Once the root is deleted, asking for it or any of its replies is ThreadNotFound."""
    made = await tree(posts, deliver)

    await deliver(posts.delete(made["root"]))

    with pytest.raises(ThreadNotFound):
        await service.get_thread(made[asked].id, None)


async def test_posts_deleted_meanwhile_are_left_out(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """A reply posts no longer returns (its post.deleted still on the way) is left out; its replies stay."""
    made = await tree(posts, deliver)
    posts.delete(made["a1"])

    thread = await service.get_thread(made["root"].id, None)

    assert shape(thread) == [row for row in TREE_SHAPE if row[0] != "a1"]


async def test_root_deleted_meanwhile_is_not_found(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """A root posts no longer returns makes the conversation ThreadNotFound, even before its event."""
    made = await tree(posts, deliver)
    posts.delete(made["root"])

    with pytest.raises(ThreadNotFound):
        await service.get_thread(made["b1"].id, None)


# --- event order and redelivery -----------------------------------------------------------------


async def test_reply_arriving_before_its_parent_is_placed_when_the_parent_arrives(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """A reply whose parent's post.created is late is not shown (nor found) until the parent arrives."""
    root, root_created = posts.publish(text="root")
    parent, parent_created = posts.publish(root, text="parent")
    child, child_created = posts.publish(parent, text="child")
    await deliver(root_created, child_created)

    assert shape(await service.get_thread(root.id, None)) == []
    with pytest.raises(ThreadNotFound):
        await service.get_thread(child.id, None)

    await deliver(parent_created)

    assert shape(await service.get_thread(child.id, None)) == [("parent", 1), ("child", 2)]


async def test_replies_arriving_before_the_root_wait_for_it(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """Until the root's post.created arrives, its replies are ThreadNotFound; then the thread is whole."""
    root, root_created = posts.publish(text="root")
    reply, reply_created = posts.publish(root, text="reply")
    await deliver(reply_created)

    with pytest.raises(ThreadNotFound):
        await service.get_thread(reply.id, None)

    await deliver(root_created)

    assert shape(await service.get_thread(reply.id, None)) == [("reply", 1)]


async def test_delete_arriving_before_create_is_not_undone_by_the_create(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """A post.deleted that overtakes its post.created leaves a tombstone the late create cannot revive."""
    root, root_created = posts.publish(text="root")
    reply, reply_created = posts.publish(root, text="reply")
    _, below_created = posts.publish(reply, text="below")
    reply_deleted = posts.delete(reply)
    await deliver(root_created, reply_deleted, below_created, reply_created)

    assert shape(await service.get_thread(root.id, None)) == [("below", 2)]
    with pytest.raises(ThreadNotFound):
        await service.get_thread(reply.id, None)


async def test_events_in_any_order_build_the_same_thread(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """Delivering the same creates and deletes in shuffled orders gives the thread of in-order delivery."""
    made: dict[str, PostPublic] = {}
    created: list[Event] = []
    for text, parent in [("root", None), ("a", "root"), ("b", "root"), ("a1", "a"), ("a1x", "a1")]:
        made[text], event = posts.publish(None if parent is None else made[parent], text=text)
        created.append(event)
    delivered = [*created, posts.delete(made["a1"])]
    expected = [("a", 1), ("a1x", 3), ("b", 1)]

    for seed in range(20):
        shuffled = delivered[:]
        random.Random(seed).shuffle(shuffled)
        fresh = ThreadsService(FakeThreadStore(), posts)
        await Deliver(fresh)(*shuffled)
        assert shape(await fresh.get_thread(made["root"].id, None)) == expected, f"seed {seed}"


async def test_redelivered_events_are_applied_once(
    service: ThreadsService, store: FakeThreadStore, posts: FakePosts, deliver: Deliver
) -> None:
    """Delivering every event twice changes nothing beyond the first delivery."""
    root, root_created = posts.publish(text="root")
    _, reply_created = posts.publish(root, text="reply")
    gone, gone_created = posts.publish(root, text="gone")
    gone_deleted = posts.delete(gone)
    await deliver(root_created, reply_created, gone_created, gone_deleted)
    state_after_first = (dict(store.state.nodes), set(store.state.processed_events))

    await deliver(root_created, reply_created, gone_created, gone_deleted, reply_created)

    assert (store.state.nodes, store.state.processed_events) == state_after_first
    assert len(store.state.processed_events) == 4
    assert shape(await service.get_thread(root.id, None)) == [("reply", 1)]


# --- reading bodies from posts ------------------------------------------------------------------


async def test_big_thread_is_read_in_batches_of_at_most_max_batch(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """A thread of more than MAX_BATCH posts is read in full batches, in thread order, none too big."""
    root, created = posts.publish(text="root")
    await deliver(created)
    replies = []
    for i in range(2 * MAX_BATCH + 4):
        reply, created = posts.publish(root, text=str(i))
        replies.append(reply)
        await deliver(created)

    thread = await service.get_thread(root.id, None)

    assert [len(read.post_ids) for read in posts.reads] == [MAX_BATCH, MAX_BATCH, 5]
    assert [i for read in posts.reads for i in read.post_ids] == [root.id, *(r.id for r in replies)]
    assert [reply.id for reply in thread.replies] == [r.id for r in replies]


async def test_small_thread_is_read_in_one_call(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """A thread of up to MAX_BATCH posts is read from posts in a single call."""
    root, created = posts.publish(text="root")
    await deliver(created)
    for i in range(MAX_BATCH - 1):
        _, created = posts.publish(root, text=str(i))
        await deliver(created)

    thread = await service.get_thread(root.id, None)

    assert len(thread.replies) == MAX_BATCH - 1
    assert len(posts.reads) == 1


async def test_degraded_parts_reported_by_posts_are_passed_on(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """What posts had to do without (e.g. payments) is the thread's `degraded`, each service once."""
    root, created = posts.publish(text="root")
    await deliver(created)
    for i in range(MAX_BATCH + 1):
        _, created = posts.publish(root, text=str(i), audience="subscribers")
        await deliver(created)
    posts.degraded = ["payments"]

    thread = await service.get_thread(root.id, None)

    assert len(posts.reads) == 2
    assert thread.degraded == ["payments"]


async def test_posts_unavailable_propagates(
    service: ThreadsService, posts: FakePosts, deliver: Deliver
) -> None:
    """Without posts there are no bodies to show: ServiceUnavailable reaches the caller."""
    made = await tree(posts, deliver)
    posts.unavailable = True

    with pytest.raises(ServiceUnavailable) as caught:
        await service.get_thread(made["root"].id, None)
    assert caught.value.service == "posts"
