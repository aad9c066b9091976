"""The feed application layer over a fake store and a fake posts API: fan-out, back-fill, degraded reads."""

from collections.abc import Awaitable, Callable

import pytest

from tests.fakes.feed import FakeFeedStore, FakePosts
from tests.fakes.identities import identity
from tests.support.polling import eventually
from tests.support.tasks import running_in_background
from threadline.platform.errors import InvalidRequest, ServiceUnavailable
from threadline.platform.ids import new_id
from threadline.platform.pagination import PageRequest
from threadline.platform.tokens import Identity
from threadline.services.feed.api import FeedApi, FeedPage
from threadline.services.feed.service import FeedService, FeedStore
from threadline.services.posts.api import Audience, PostCreated, PostPage
from threadline.services.users.api import UserFollowed, UserUnfollowed


@pytest.fixture
def store() -> FakeFeedStore:
    return FakeFeedStore()


@pytest.fixture
def posts() -> FakePosts:
    return FakePosts()


@pytest.fixture
def service(store: FakeFeedStore, posts: FakePosts) -> FeedService:
    port: FeedStore = store
    return FeedService(port, posts)


@pytest.fixture
def ada() -> Identity:
    return identity("ada", "Ada")


@pytest.fixture
def bob() -> Identity:
    return identity("bob", "Bob")


@pytest.fixture
def cy() -> Identity:
    return identity("cy", "Cy")


async def follow(
    service: FeedService, follower: Identity, followee: Identity, event_id: str | None = None
) -> str:
    """Deliver user.followed; returns its event id."""
    event_id = event_id or new_id()
    await service.record_follow(
        event_id, UserFollowed(follower_id=follower.user_id, followee_id=followee.user_id)
    )
    return event_id


async def unfollow(
    service: FeedService, follower: Identity, followee: Identity, event_id: str | None = None
) -> str:
    """Deliver user.unfollowed; returns its event id."""
    event_id = event_id or new_id()
    await service.record_unfollow(
        event_id, UserUnfollowed(follower_id=follower.user_id, followee_id=followee.user_id)
    )
    return event_id


async def publish(
    service: FeedService,
    posts: FakePosts,
    author: Identity,
    text: str = "hello",
    *,
    audience: Audience = "public",
) -> PostCreated:
    """Create a post in posts and deliver its post.created to feed."""
    created = posts.publish(author, text, audience=audience)
    await service.record_post(new_id(), created)
    return created


async def delete(service: FeedService, posts: FakePosts, post_id: str) -> None:
    """Delete a post in posts and deliver its post.deleted to feed."""
    await service.forget_post(new_id(), posts.delete(post_id))


async def home_ids(service: FeedApi, viewer: Identity, limit: int = 100) -> list[str]:
    """The ids on the first page of `viewer`'s home timeline."""
    return [post.id for post in (await service.home(viewer, PageRequest(limit=limit))).items]


class InterleavingPosts(FakePosts):
    """Posts whose back-fill answer is computed, then something else happens before feed commits."""

    def __init__(self) -> None:
        super().__init__()
        self.meanwhile: list[Callable[[], Awaitable[None]]] = []

    async def posts_by_author(self, author_id: str, page: PageRequest, viewer: Identity | None) -> PostPage:
        """Answer as posts would, but run the `meanwhile` steps before returning."""
        answer = await super().posts_by_author(author_id, page, viewer)
        for step in self.meanwhile:
            await step()
        return answer


# --- fan-out on write ---------------------------------------------------------------------------


async def test_new_post_reaches_its_author_and_followers_only(
    service: FeedService, store: FakeFeedStore, posts: FakePosts, ada: Identity, bob: Identity, cy: Identity
) -> None:
    """post.created puts the post into the author's and each current follower's timeline, no one else's."""
    await follow(service, bob, ada)

    created = await publish(service, posts, ada)

    assert store.timeline_of(ada.user_id) == [created.id]
    assert store.timeline_of(bob.user_id) == [created.id]
    assert store.timeline_of(cy.user_id) == []
    assert await home_ids(service, bob) == [created.id]


async def test_follow_backfills_the_followees_recent_posts(
    store: FakeFeedStore, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """user.followed copies the followee's newest posts (up to the back-fill size) to the follower."""
    service = FeedService(store, posts, backfill=2)
    made = [await publish(service, posts, ada, str(i)) for i in range(3)]
    # Posts still waiting for their fan-out would reach bob with it: these have gone out.
    assert await store.fan_out_waiting(10) == 3

    await follow(service, bob, ada)

    assert store.timeline_of(bob.user_id) == [made[2].id, made[1].id]
    assert posts.calls == ["posts_by_author"]


async def test_follow_while_posts_is_down_raises_and_is_redelivered(
    service: FeedService, store: FakeFeedStore, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """A back-fill that cannot reach posts raises so the event comes again; the redelivery back-fills."""
    created = await publish(service, posts, ada)
    posts.down = True
    event_id = new_id()

    with pytest.raises(ServiceUnavailable):
        await follow(service, bob, ada, event_id)
    assert store.timeline_of(bob.user_id) == []
    assert store.state.follows == {}

    posts.down = False
    await follow(service, bob, ada, event_id)
    assert store.timeline_of(bob.user_id) == [created.id]


async def test_unfollow_removes_only_that_authors_posts(
    service: FeedService, store: FakeFeedStore, posts: FakePosts, ada: Identity, bob: Identity, cy: Identity
) -> None:
    """user.unfollowed takes the followee's posts out of the follower's timeline and stops new ones."""
    await follow(service, bob, ada)
    await follow(service, bob, cy)
    from_ada = await publish(service, posts, ada)
    from_cy = await publish(service, posts, cy)
    own = await publish(service, posts, bob)

    await unfollow(service, bob, ada)
    later = await publish(service, posts, ada)

    assert store.timeline_of(bob.user_id) == [own.id, from_cy.id]
    assert store.timeline_of(ada.user_id) == [later.id, from_ada.id]


async def test_delete_removes_the_post_from_every_timeline_and_its_copy(
    service: FeedService, store: FakeFeedStore, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """post.deleted takes the post out of the author's and followers' timelines and drops feed's copy."""
    await follow(service, bob, ada)
    kept = await publish(service, posts, ada, "kept")
    gone = await publish(service, posts, ada, "gone")

    await delete(service, posts, gone.id)

    assert store.timeline_of(ada.user_id) == [kept.id]
    assert store.timeline_of(bob.user_id) == [kept.id]
    assert set(store.state.copies) == {kept.id}


async def test_refollow_after_unfollow_backfills_again(
    service: FeedService, store: FakeFeedStore, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """Follow, unfollow and follow again leaves the followee's posts in the timeline."""
    created = await publish(service, posts, ada)

    await follow(service, bob, ada)
    await unfollow(service, bob, ada)
    assert store.timeline_of(bob.user_id) == []
    await follow(service, bob, ada)

    assert store.timeline_of(bob.user_id) == [created.id]


# --- reading the home timeline ------------------------------------------------------------------


async def test_home_pages_newest_first_with_cursors(
    service: FeedService, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """Pages follow each other by cursor, newest first, and the last one has no next cursor."""
    await follow(service, bob, ada)
    made = [await publish(service, posts, author, str(i)) for i, author in enumerate([ada, bob] * 3)]

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await service.home(bob, PageRequest(limit=4, cursor=cursor))
        seen += [post.id for post in page.items]
        pages += 1
        if page.next_cursor is None:
            break
        assert page.next_cursor == page.items[-1].id
        cursor = page.next_cursor

    assert seen == [post.id for post in reversed(made)]
    assert pages == 2


async def test_home_reads_posts_fresh_in_one_call(
    service: FeedService, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """A page asks posts once for its posts, so likes and counts are current; the order is the timeline's."""
    await follow(service, bob, ada)
    first = await publish(service, posts, ada, "first")
    second = await publish(service, posts, ada, "second")
    posts.like(first.id, bob.user_id)
    posts.like(first.id, ada.user_id)
    posts.calls.clear()

    page = await service.home(bob, PageRequest())

    assert posts.calls == ["get_posts"]
    assert [post.id for post in page.items] == [second.id, first.id]
    assert (page.items[1].like_count, page.items[1].liked_by_me, page.items[0].liked_by_me) == (
        2,
        True,
        False,
    )
    assert page.degraded == []


async def test_empty_timeline_asks_posts_nothing(
    service: FeedService, posts: FakePosts, bob: Identity
) -> None:
    """With nothing in the timeline, home answers an empty complete page without calling posts."""
    page = await service.home(bob, PageRequest())

    assert page == FeedPage(items=[], next_cursor=None, degraded=[])
    assert posts.calls == []


async def test_posts_deleted_but_not_yet_announced_are_left_out(
    service: FeedService, posts: FakePosts, ada: Identity
) -> None:
    """A post posts no longer has is left out before feed hears post.deleted; the cursor is unchanged."""
    made = [await publish(service, posts, ada, str(i)) for i in range(3)]
    posts.delete(made[1].id)

    page = await service.home(ada, PageRequest(limit=2))

    assert [post.id for post in page.items] == [made[2].id]
    assert page.next_cursor == made[1].id


async def test_posts_degraded_is_passed_through(
    service: FeedService, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """When posts answers without payments, the page names it and subscriber posts come locked."""
    await follow(service, bob, ada)
    locked = await publish(service, posts, ada, "for subscribers", audience="subscribers")
    posts.subscribe(bob.user_id, ada.user_id)
    posts.degraded = ["payments"]

    page = await service.home(bob, PageRequest())

    assert page.degraded == ["payments"]
    assert [(post.id, post.locked, post.text) for post in page.items] == [(locked.id, True, None)]


@pytest.mark.parametrize("limit", [0, 101])
async def test_limit_out_of_bounds_is_invalid(service: FeedService, bob: Identity, limit: int) -> None:
    """A page size outside 1..100 is a 422 naming the limit."""
    with pytest.raises(InvalidRequest) as caught:
        await service.home(bob, PageRequest(limit=limit))
    assert caught.value.fields[0]["field"] == "limit"


# --- degraded: posts is down --------------------------------------------------------------------


async def test_posts_down_serves_copies_marked_degraded(
    service: FeedService, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """With posts down, the page comes from feed's copies: same posts and cursor, no counts, degraded."""
    await follow(service, bob, ada)
    made = [await publish(service, posts, ada, str(i)) for i in range(3)]
    posts.like(made[2].id, bob.user_id)
    fresh = await service.home(bob, PageRequest(limit=2))
    posts.down = True

    page = await service.home(bob, PageRequest(limit=2))

    assert page.degraded == ["posts"]
    assert page.next_cursor == fresh.next_cursor
    assert [post.id for post in page.items] == [post.id for post in fresh.items]
    assert [post.text for post in page.items] == ["2", "1"]
    assert {(p.like_count, p.reply_count, p.liked_by_me, p.locked) for p in page.items} == {
        (0, 0, False, False)
    }
    assert page.items[0].author == fresh.items[0].author
    assert page.items[0].created_at == fresh.items[0].created_at


async def test_posts_down_locks_subscriber_posts_except_for_their_author(
    service: FeedService, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """Served from copies, a subscribers-only post is locked for everyone but its author, subscribers too."""
    await follow(service, bob, ada)
    secret = await publish(service, posts, ada, "secret", audience="subscribers")
    posts.subscribe(bob.user_id, ada.user_id)
    assert (await service.home(bob, PageRequest())).items[0].text == "secret"
    posts.down = True

    as_bob = (await service.home(bob, PageRequest())).items
    as_ada = (await service.home(ada, PageRequest())).items

    assert [(p.id, p.locked, p.text) for p in as_bob] == [(secret.id, True, None)]
    assert [(p.id, p.locked, p.text) for p in as_ada] == [(secret.id, False, "secret")]


async def test_backfilled_subscriber_post_copy_never_leaks_text(
    service: FeedService, store: FakeFeedStore, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """A back-filled subscriber post has a copy without text; post.created fills it in."""
    created = posts.publish(ada, "secret", audience="subscribers")
    await follow(service, bob, ada)
    posts.down = True

    assert [(p.locked, p.text) for p in (await service.home(bob, PageRequest())).items] == [(True, None)]
    assert store.state.copies[created.id].text is None

    await service.record_post(new_id(), created)
    as_ada = (await service.home(ada, PageRequest())).items
    assert [(p.locked, p.text) for p in as_ada] == [(False, "secret")]


# --- fanning out in batches ---------------------------------------------------------------------


async def test_a_full_batch_is_fanned_out_without_waiting_for_a_pause(
    store: FakeFeedStore, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """The batch's last post sets off its fan-out at once; posts short of a batch keep waiting."""
    service = FeedService(store, posts, fan_out_batch=3, fan_out_after_pause_s=3600)
    await follow(service, bob, ada)
    async with running_in_background(service.keep_fanning_out()):
        made = [await publish(service, posts, ada, str(i)) for i in range(4)]

        async def only_the_last_waits() -> None:
            assert [post_id for post_id, _ in store.state.pending] == [made[3].id]

        await eventually(only_the_last_waits)
    assert sorted(post_id for owner, post_id in store.state.entries if owner == bob.user_id) == sorted(
        post.id for post in made[:3]
    )
    assert store.timeline_of(bob.user_id) == [post.id for post in reversed(made)]


async def test_posts_short_of_a_batch_go_out_once_posting_pauses(
    store: FakeFeedStore, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """After the pause with no new post, whatever waits is fanned out, left-overs from before included."""
    service = FeedService(store, posts, fan_out_batch=100, fan_out_after_pause_s=0.05)
    await follow(service, bob, ada)
    left_over = await publish(service, posts, ada, "before a restart")
    restarted = FeedService(store, posts, fan_out_batch=100, fan_out_after_pause_s=0.05)
    async with running_in_background(restarted.keep_fanning_out()):

        async def none_waits() -> None:
            assert store.state.pending == []

        await eventually(none_waits)
        made = await publish(restarted, posts, ada, "after")
        await eventually(none_waits)
    assert {post_id for owner, post_id in store.state.entries if owner == bob.user_id} == {
        left_over.id,
        made.id,
    }


class FailingOnce(FakeFeedStore):
    """A store whose first fan-out of waiting posts fails."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    async def fan_out_waiting(self, batch: int) -> int:
        """Fail the first time, then fan out."""
        if not self.failures:
            self.failures += 1
            raise RuntimeError("database went away")
        return await super().fan_out_waiting(batch)


async def test_a_failed_fan_out_is_tried_again(posts: FakePosts, ada: Identity, bob: Identity) -> None:
    """A batch that failed is not lost: it waits, still read with the timelines, and goes out later."""
    store = FailingOnce()
    service = FeedService(store, posts, fan_out_batch=1, fan_out_after_pause_s=3600)
    await follow(service, bob, ada)
    async with running_in_background(service.keep_fanning_out()):
        made = await publish(service, posts, ada)

        async def fanned_out() -> None:
            assert store.state.pending == []

        await eventually(fanned_out)
    assert store.failures == 1
    assert (bob.user_id, made.id) in store.state.entries


# --- idempotence and reordering -----------------------------------------------------------------


async def test_redelivered_events_change_nothing(
    service: FeedService, store: FakeFeedStore, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """Redelivered events neither duplicate entries, nor back-fill twice, nor undo later events."""
    followed = await follow(service, bob, ada)
    created = posts.publish(ada)
    created_id = new_id()
    await service.record_post(created_id, created)
    unfollowed = await unfollow(service, bob, ada)
    calls = list(posts.calls)

    await follow(service, bob, ada, followed)
    await service.record_post(created_id, created)
    await unfollow(service, bob, ada, unfollowed)

    assert posts.calls == calls
    assert store.timeline_of(bob.user_id) == []
    assert store.timeline_of(ada.user_id) == [created.id]
    assert await store.fan_out_waiting(10) == 1
    assert store.timeline_of(bob.user_id) == []
    assert len(store.state.entries) == 1


async def test_unfollow_processed_before_an_older_follow_leaves_nothing(
    service: FeedService, store: FakeFeedStore, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """A follow delivered after the newer unfollow that undid it is stale: no entries, no back-fill."""
    posts.publish(ada)
    followed, unfollowed = new_id(), new_id()

    await unfollow(service, bob, ada, unfollowed)
    await follow(service, bob, ada, followed)
    await publish(service, posts, ada)

    assert store.timeline_of(bob.user_id) == []
    assert posts.calls == []


async def test_old_unfollow_after_newer_follow_is_ignored(
    service: FeedService, store: FakeFeedStore, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """An unfollow older than the follow already applied does not empty the timeline."""
    unfollowed, followed = new_id(), new_id()
    created = await publish(service, posts, ada)

    await follow(service, bob, ada, followed)
    await unfollow(service, bob, ada, unfollowed)

    assert store.timeline_of(bob.user_id) == [created.id]


async def test_unfollow_during_backfill_leaves_no_entries(
    store: FakeFeedStore, ada: Identity, bob: Identity
) -> None:
    """An unfollow committed while a back-fill is in flight wins: the late back-fill adds nothing."""
    posts = InterleavingPosts()
    service = FeedService(store, posts)
    await publish(service, posts, ada)
    followed = new_id()

    async def unfollow_meanwhile() -> None:
        await unfollow(service, bob, ada)

    posts.meanwhile.append(unfollow_meanwhile)
    await follow(service, bob, ada, followed)

    assert store.timeline_of(bob.user_id) == []
    assert store.state.follows[bob.user_id, ada.user_id].following is False


async def test_delete_during_backfill_is_not_undone(
    store: FakeFeedStore, ada: Identity, bob: Identity
) -> None:
    """A post deleted while a back-fill that fetched it is in flight stays out of the timeline."""
    posts = InterleavingPosts()
    service = FeedService(store, posts)
    kept = await publish(service, posts, ada, "kept")
    gone = await publish(service, posts, ada, "gone")

    async def delete_meanwhile() -> None:
        await delete(service, posts, gone.id)

    posts.meanwhile.append(delete_meanwhile)
    await follow(service, bob, ada)

    assert store.timeline_of(bob.user_id) == [kept.id]
    assert gone.id not in store.state.copies


async def test_delete_before_create_keeps_the_post_out(
    service: FeedService, store: FakeFeedStore, posts: FakePosts, ada: Identity, bob: Identity
) -> None:
    """post.deleted arriving before its post.created leaves a tombstone the late post.created respects."""
    await follow(service, bob, ada)
    created = posts.publish(ada)
    await service.forget_post(new_id(), posts.delete(created.id))

    await service.record_post(new_id(), created)

    assert store.timeline_of(ada.user_id) == []
    assert store.timeline_of(bob.user_id) == []
    assert store.state.copies == {}
