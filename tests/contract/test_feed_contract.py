"""FeedApi behaves the same through the local and the HTTP adapter; events are fed to its handlers."""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from tests.fakes.feed import FakePosts
from tests.support.servers import serving
from tests.support.tokens import Signer
from threadline.platform.component import Component
from threadline.platform.errors import ServiceError
from threadline.platform.events import Event, EventPayload
from threadline.platform.http_pool import HttpSession
from threadline.platform.ids import new_id
from threadline.platform.pagination import PageRequest
from threadline.platform.settings import Settings
from threadline.platform.tokens import Identity, TokenVerifier
from threadline.platform.web import create_app
from threadline.services.feed import app
from threadline.services.feed.api import FeedApi
from threadline.services.feed.http import FeedClient
from threadline.services.posts.api import PostCreated, PostDeleted
from threadline.services.users.api import UserFollowed, UserUnfollowed


@dataclass
class Feed:
    """The feed service as one caller reaches it, plus what the test drives from outside."""

    kind: str
    api: FeedApi
    component: Component
    posts: FakePosts
    signer: Signer

    async def account(self, handle: str) -> Identity:
        """A verified identity for a fresh account id."""
        token = self.signer.token(new_id(), handle)
        return await TokenVerifier(self.signer.jwks).verify(token)

    async def deliver(self, payload: EventPayload, event: Event | None = None) -> Event:
        """Hand one event (a new one, or `event` again) to feed's handler for its type."""
        event = event or Event.of("test", payload)
        await self.component.handlers[event.type](event)
        return event

    async def follow(self, follower: Identity, followee: Identity) -> None:
        """Deliver user.followed."""
        await self.deliver(UserFollowed(follower_id=follower.user_id, followee_id=followee.user_id))

    async def publish(self, author: Identity, text: str = "hello", **kw: Any) -> PostCreated:
        """Create the post in posts and deliver its post.created."""
        created = self.posts.publish(author, text, **kw)
        await self.deliver(created)
        return created


@pytest.fixture
def posts() -> FakePosts:
    """The posts API feed calls, faked: it lies outside feed's boundary."""
    return FakePosts()


@pytest.fixture
async def component(monolith_settings: Settings, posts: FakePosts) -> AsyncIterator[Component]:
    """The feed component on a fresh database, reading from the fake posts API."""
    built = app.build(monolith_settings, posts=posts)
    await built.database.open(built.migrations)
    try:
        yield built
    finally:
        await built.database.close()


@pytest.fixture(params=["local", "http"])
async def feed(request: pytest.FixtureRequest, component: Component, posts: FakePosts) -> AsyncIterator[Feed]:
    """The local adapter (application object), or FeedClient against the feed router on a real socket."""
    signer = Signer()
    if request.param == "local":
        yield Feed("local", component.service, component, posts, signer)
        return
    served = create_app(
        title="threadline feed",
        routers=[component.router],
        readiness={},
        token_verifier=TokenVerifier(signer.jwks),
    )
    session = HttpSession()
    try:
        async with serving(served) as url:
            yield Feed("http", FeedClient("feed", url, session), component, posts, signer)
    finally:
        await session.close()


async def test_home_pages_own_and_followed_posts_newest_first(feed: Feed) -> None:
    """Own posts and followees' posts (new and back-filled) come newest first, page by page."""
    ann, bob, cat = await feed.account("ann"), await feed.account("bob"), await feed.account("cat")
    before = await feed.publish(ann, "before the follow")
    await feed.follow(bob, ann)
    made = [before] + [await feed.publish(author, author.handle) for author in (ann, bob, cat, ann)]

    first = await feed.api.home(bob, PageRequest(limit=2))
    rest = await feed.api.home(bob, PageRequest(limit=2, cursor=first.next_cursor))

    expected = [post.id for post in reversed(made) if post.author.id != cat.user_id]
    assert [post.id for post in first.items + rest.items] == expected
    assert (first.next_cursor, rest.next_cursor) == (expected[1], None)
    assert first.degraded == rest.degraded == []
    assert first.items[0].text == "ann"


async def test_new_account_has_an_empty_complete_page(feed: Feed) -> None:
    """Someone who follows no one and posted nothing gets no items, no cursor and nothing degraded."""
    page = await feed.api.home(await feed.account("ann"), PageRequest())

    assert (page.items, page.next_cursor, page.degraded) == ([], None, [])


async def test_unfollow_delete_and_redelivery(feed: Feed) -> None:
    """Unfollow and delete take posts out; a redelivered post.created does not bring one back."""
    ann, bob, cat = await feed.account("ann"), await feed.account("bob"), await feed.account("cat")
    await feed.follow(bob, ann)
    await feed.follow(bob, cat)
    by_ann = await feed.publish(ann)
    created = Event.of("posts", feed.posts.publish(cat, "cat's"))
    await feed.deliver(PostCreated.model_validate(created.data), created)
    await feed.deliver(PostCreated.model_validate(created.data), created)
    assert [p.id for p in (await feed.api.home(bob, PageRequest())).items] == [created.data["id"], by_ann.id]

    await feed.deliver(UserUnfollowed(follower_id=bob.user_id, followee_id=ann.user_id))
    deleted: PostDeleted = feed.posts.delete(created.data["id"])
    await feed.deliver(deleted)
    await feed.deliver(PostCreated.model_validate(created.data), created)

    assert (await feed.api.home(bob, PageRequest())).items == []
    assert [p.id for p in (await feed.api.home(ann, PageRequest())).items] == [by_ann.id]


async def test_posts_down_serves_stored_copies_degraded(feed: Feed) -> None:
    """With posts down the page is served from copies, marked degraded, subscriber posts locked."""
    ann, bob = await feed.account("ann"), await feed.account("bob")
    await feed.follow(bob, ann)
    public = await feed.publish(ann, "for all")
    secret = await feed.publish(ann, "for subscribers", audience="subscribers")
    feed.posts.subscribe(bob.user_id, ann.user_id)
    feed.posts.like(public.id, bob.user_id)
    fresh = await feed.api.home(bob, PageRequest(limit=1))
    feed.posts.down = True

    page = await feed.api.home(bob, PageRequest(limit=1))
    rest = await feed.api.home(bob, PageRequest(limit=1, cursor=page.next_cursor))
    own = await feed.api.home(ann, PageRequest())

    assert (fresh.items[0].text, fresh.degraded) == ("for subscribers", [])
    assert page.degraded == rest.degraded == own.degraded == ["posts"]
    assert page.next_cursor == fresh.next_cursor == secret.id
    assert [(p.id, p.locked, p.text) for p in page.items] == [(secret.id, True, None)]
    assert [(p.id, p.text, p.like_count, p.liked_by_me) for p in rest.items] == [
        (public.id, "for all", 0, False)
    ]
    assert [(p.locked, p.text) for p in own.items] == [(False, "for subscribers"), (False, "for all")]


async def test_degraded_answer_of_posts_is_passed_through(feed: Feed) -> None:
    """When posts answers without payments, the feed page names payments and locks subscriber posts."""
    ann, bob = await feed.account("ann"), await feed.account("bob")
    await feed.follow(bob, ann)
    secret = await feed.publish(ann, "for subscribers", audience="subscribers")
    feed.posts.subscribe(bob.user_id, ann.user_id)
    feed.posts.degraded = ["payments"]

    page = await feed.api.home(bob, PageRequest())

    assert page.degraded == ["payments"]
    assert [(p.id, p.locked, p.text) for p in page.items] == [(secret.id, True, None)]


async def test_page_size_out_of_bounds_is_422(feed: Feed) -> None:
    """A limit outside 1..100 is refused as invalid input, never a 500."""
    ann = await feed.account("ann")
    for limit in (0, 101):
        with pytest.raises(ServiceError) as caught:
            await feed.api.home(ann, PageRequest(limit=limit))
        assert (caught.value.status, caught.value.code) == (422, "invalid_request")


async def test_http_route_needs_a_valid_token(component: Component) -> None:
    """GET /feed/home without a token, or with one signed by a foreign key, is 401."""
    signer = Signer()
    served = create_app(
        title="threadline feed",
        routers=[component.router],
        readiness={},
        token_verifier=TokenVerifier(signer.jwks),
    )
    session = HttpSession()
    try:
        async with serving(served) as url:
            answer = await session.origin(url).request("GET", "/feed/home", timeout_seconds=30)
            assert answer.status == 401
            assert orjson.loads(answer.body)["error"]["code"] == "unauthorized"
            foreign = Signer(kid=signer.kid).token(new_id(), "eve")
            client = FeedClient("feed", url, session)
            with pytest.raises(ServiceError) as caught:
                await client.home(Identity(new_id(), "eve", "Eve", foreign), PageRequest())
            assert caught.value.status == 401
    finally:
        await session.close()
