"""ThreadsApi behaves the same through the local and the HTTP adapter, over its real SQLite store."""

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from tests.fakes.threads import FakePosts
from tests.support.servers import serving
from tests.support.tokens import Signer
from threadline.platform.component import Component
from threadline.platform.errors import ServiceError
from threadline.platform.events import Event
from threadline.platform.http_pool import HttpSession
from threadline.platform.settings import Settings
from threadline.platform.tokens import TokenVerifier
from threadline.platform.web import create_app
from threadline.services.posts.api import MAX_BATCH, PostPublic
from threadline.services.threads import app
from threadline.services.threads.api import ThreadPublic, ThreadsApi
from threadline.services.threads.http import ThreadsClient


@dataclass
class Threads:
    """The threads service as one caller reaches it, with the fake posts it reads bodies from."""

    kind: str
    api: ThreadsApi
    posts: FakePosts
    component: Component
    keys: Signer

    async def deliver(self, *events: Event) -> None:
        """Hand events to the service's handlers, as the bus would, in the order given."""
        for event in events:
            await self.component.handlers[event.type](event)

    async def publish(self, reply_to: PostPublic | None = None, text: str = "hello") -> PostPublic:
        """Publish a post in the fake posts and deliver its post.created."""
        post, created = self.posts.publish(reply_to, text=text)
        await self.deliver(created)
        return post


@pytest.fixture
def posts() -> FakePosts:
    """The posts service as threads sees it: a batch read over what the test published."""
    return FakePosts()


@pytest.fixture
async def component(monolith_settings: Settings, posts: FakePosts) -> AsyncIterator[Component]:
    """The threads component on a fresh database, reading bodies from the fake posts."""
    built = app.build(monolith_settings, posts=posts)
    await built.database.open(built.migrations)
    yield built
    await built.database.close()


@pytest.fixture(params=["local", "http"])
async def threads(
    request: pytest.FixtureRequest, component: Component, posts: FakePosts
) -> AsyncIterator[Threads]:
    """The local adapter (the application object), or the HTTP client against a real socket."""
    keys = Signer()
    if request.param == "local":
        yield Threads("local", component.service, posts, component, keys)
        return
    served = create_app(
        title="threads", routers=[component.router], readiness={}, token_verifier=TokenVerifier(keys.jwks)
    )
    session = HttpSession()
    async with serving(served) as url:
        yield Threads("http", ThreadsClient("threads", url, session), posts, component, keys)
    await session.close()


def shape(thread: ThreadPublic) -> list[tuple[str | None, int]]:
    """The replies of a thread as (text, depth), in the order given."""
    return [(reply.text, reply.depth) for reply in thread.replies]


async def test_thread_is_depth_first_with_depths(threads: Threads) -> None:
    """Any post's thread is its whole conversation: replies depth-first, oldest sibling first."""
    root = await threads.publish(text="root")
    a = await threads.publish(root, "a")
    b = await threads.publish(root, "b")
    a1 = await threads.publish(a, "a1")
    await threads.publish(b, "b1")
    await threads.publish(a1, "a1x")

    thread = await threads.api.get_thread(a1.id, None)

    assert thread.root == root
    assert shape(thread) == [("a", 1), ("a1", 2), ("a1x", 3), ("b", 1), ("b1", 2)]
    assert thread.replies[0].model_dump() == {**a.model_dump(), "depth": 1}
    assert thread.degraded == []


async def test_unknown_post_is_404(threads: Threads) -> None:
    """A post id threads never heard of is a 404 post_not_found."""
    with pytest.raises(ServiceError) as caught:
        await threads.api.get_thread("no-such-post", None)
    assert (caught.value.status, caught.value.code) == (404, "post_not_found")


async def test_deleted_reply_vanishes_and_deleted_root_is_404(threads: Threads) -> None:
    """A deleted reply's descendants keep their place and depth; a deleted root makes the thread 404."""
    root = await threads.publish(text="root")
    reply = await threads.publish(root, "reply")
    await threads.publish(reply, "below")

    await threads.deliver(threads.posts.delete(reply))

    assert shape(await threads.api.get_thread(root.id, None)) == [("below", 2)]
    await threads.deliver(threads.posts.delete(root))
    with pytest.raises(ServiceError) as caught:
        await threads.api.get_thread(root.id, None)
    assert caught.value.status == 404


async def test_out_of_order_and_repeated_events_build_the_thread_once(threads: Threads) -> None:
    """Replies before parents, a delete before its create and redeliveries give the in-order thread."""
    posts = threads.posts
    root, root_created = posts.publish(text="root")
    reply, reply_created = posts.publish(root, text="reply")
    gone, gone_created = posts.publish(root, text="gone")
    below, below_created = posts.publish(reply, text="below")
    gone_deleted = posts.delete(gone)

    await threads.deliver(below_created, gone_deleted, reply_created, gone_created, root_created)
    await threads.deliver(root_created, below_created, gone_created, reply_created, gone_deleted)

    assert shape(await threads.api.get_thread(below.id, None)) == [("reply", 1), ("below", 2)]


async def test_deep_and_big_threads_come_back_whole(threads: Threads) -> None:
    """A 60-deep chain plus more than MAX_BATCH direct replies come back in order, read in batches."""
    root = await threads.publish(text="root")
    parent = root
    for depth in range(1, 61):
        parent = await threads.publish(parent, f"deep {depth}")
    for i in range(MAX_BATCH):
        await threads.publish(root, f"wide {i}")

    thread = await threads.api.get_thread(parent.id, None)

    expected = [(f"deep {d}", d) for d in range(1, 61)] + [(f"wide {i}", 1) for i in range(MAX_BATCH)]
    assert shape(thread) == expected
    assert [len(read.post_ids) for read in threads.posts.reads] == [MAX_BATCH, 61]


async def test_viewer_reaches_posts(threads: Threads) -> None:
    """Bodies are read as the viewer sees them: the caller's identity reaches posts, None if anonymous."""
    root = await threads.publish(text="root")
    viewer = await threads.keys.identity("viewer-1", "vic")

    await threads.api.get_thread(root.id, viewer)
    await threads.api.get_thread(root.id, None)

    assert [read.viewer for read in threads.posts.reads] == [viewer, None]


async def test_degraded_from_posts_is_passed_on(threads: Threads) -> None:
    """What posts had to do without is the thread's `degraded`."""
    root = await threads.publish(text="root")
    threads.posts.degraded = ["payments"]

    assert (await threads.api.get_thread(root.id, None)).degraded == ["payments"]


async def test_posts_down_is_503_naming_posts(threads: Threads) -> None:
    """Without posts the thread cannot be read: 503 service_unavailable, naming posts."""
    root = await threads.publish(text="root")
    threads.posts.unavailable = True

    with pytest.raises(ServiceError) as caught:
        await threads.api.get_thread(root.id, None)
    assert (caught.value.status, caught.value.code) == (503, "service_unavailable")
    assert caught.value.message.startswith("posts")
