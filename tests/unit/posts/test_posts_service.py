"""The posts application layer over a fake store: posts, replies, likes, audiences and author snapshots."""

import pytest

from tests.fakes.identities import identity
from tests.fakes.posts import FakeEntitlements, FakePostStore
from threadline.platform.errors import InvalidRequest
from threadline.platform.ids import new_id
from threadline.platform.pagination import PageRequest
from threadline.platform.tokens import Identity
from threadline.services.posts.api import (
    MAX_BATCH,
    Audience,
    AuthorPublic,
    NotPostAuthor,
    PostCreate,
    PostCreated,
    PostDeleted,
    PostLiked,
    PostNotFound,
    PostPublic,
)
from threadline.services.posts.service import AuthorSnapshot, PostsService, PostStore


@pytest.fixture
def store() -> FakePostStore:
    return FakePostStore()


@pytest.fixture
def payments() -> FakeEntitlements:
    return FakeEntitlements()


@pytest.fixture
def service(store: FakePostStore, payments: FakeEntitlements) -> PostsService:
    port: PostStore = store
    return PostsService(port, payments)


@pytest.fixture
def ada() -> Identity:
    return identity("ada", "Ada")


@pytest.fixture
def bob() -> Identity:
    return identity("bob", "Bob")


async def post(
    service: PostsService,
    author: Identity,
    text: str = "hello",
    *,
    reply_to: str | None = None,
    audience: Audience = "public",
) -> PostPublic:
    return await service.create_post(author, PostCreate(text=text, reply_to=reply_to, audience=audience))


def snapshot(author: Identity, display_name: str, version: int, handle: str | None = None) -> AuthorSnapshot:
    return AuthorSnapshot(
        id=author.user_id, handle=handle or author.handle, display_name=display_name, version=version
    )


# --- creating -------------------------------------------------------------------------------


async def test_root_post_is_its_own_root(service: PostsService, ada: Identity) -> None:
    """A post that replies to nothing is the root of its own thread, with nothing counted yet."""
    created = await post(service, ada, "first!")

    assert created.root_id == created.id
    assert created.reply_to is None
    assert created.text == "first!"
    assert (created.like_count, created.reply_count, created.liked_by_me, created.locked) == (
        0,
        0,
        False,
        False,
    )
    assert (await service.get_post(created.id, ada)).post == created


async def test_create_emits_post_created(service: PostsService, store: FakePostStore, ada: Identity) -> None:
    """Publishing a post emits one post.created with its author, thread and audience."""
    created = await post(service, ada, audience="subscribers")

    assert store.events == [
        PostCreated(
            id=created.id,
            author=created.author,
            text=created.text,
            reply_to=None,
            root_id=created.id,
            audience="subscribers",
            created_at=created.created_at,
        )
    ]


async def test_reply_joins_thread_root_at_depth_three(
    service: PostsService, store: FakePostStore, ada: Identity, bob: Identity
) -> None:
    """A reply three levels deep points at its parent and has the thread's root as root_id."""
    root = await post(service, ada)
    first = await post(service, bob, reply_to=root.id)
    second = await post(service, ada, reply_to=first.id)
    third = await post(service, bob, reply_to=second.id)

    assert (third.reply_to, third.root_id) == (second.id, root.id)
    assert {first.root_id, second.root_id} == {root.id}
    assert store.events_of(PostCreated)[-1].root_id == root.id


async def test_reply_counts_direct_replies_of_parent(
    service: PostsService, ada: Identity, bob: Identity
) -> None:
    """A parent's reply_count counts its direct replies only, not deeper ones."""
    root = await post(service, ada)
    first = await post(service, bob, reply_to=root.id)
    await post(service, ada, reply_to=root.id)
    await post(service, ada, reply_to=first.id)

    assert ((await service.get_post(root.id, None)).post).reply_count == 2
    assert ((await service.get_post(first.id, None)).post).reply_count == 1


async def test_reply_to_unknown_post_writes_nothing(
    service: PostsService, store: FakePostStore, ada: Identity
) -> None:
    """A reply to an unknown post raises PostNotFound and stores and publishes nothing."""
    with pytest.raises(PostNotFound):
        await post(service, ada, reply_to="no-such-post")

    assert store.events == []
    assert store.state.posts == {}
    assert store.state.authors == {}


async def test_reply_to_deleted_post_writes_nothing(
    service: PostsService, store: FakePostStore, ada: Identity, bob: Identity
) -> None:
    """A reply to a deleted post raises PostNotFound and stores and publishes nothing."""
    root = await post(service, ada)
    await service.delete_post(ada, root.id)
    events_before = list(store.events)

    with pytest.raises(PostNotFound):
        await post(service, bob, reply_to=root.id)

    assert store.events == events_before
    assert list(store.state.posts) == [root.id]
    assert store.state.posts[root.id].reply_count == 0


# --- deleting -------------------------------------------------------------------------------


async def test_delete_hides_post_and_emits_post_deleted(
    service: PostsService, store: FakePostStore, ada: Identity, bob: Identity
) -> None:
    """The author's delete hides the post, decrements its parent's reply_count and emits post.deleted."""
    root = await post(service, bob)
    reply = await post(service, ada, reply_to=root.id)

    await service.delete_post(ada, reply.id)

    with pytest.raises(PostNotFound):
        await service.get_post(reply.id, ada)
    assert ((await service.get_post(root.id, None)).post).reply_count == 0
    assert store.events_of(PostDeleted) == [
        PostDeleted(id=reply.id, author_id=ada.user_id, reply_to=root.id, root_id=root.id)
    ]


async def test_delete_by_another_user_is_refused(
    service: PostsService, store: FakePostStore, ada: Identity, bob: Identity
) -> None:
    """Only the author may delete a post: anyone else gets NotPostAuthor and the post stays."""
    created = await post(service, ada)

    with pytest.raises(NotPostAuthor):
        await service.delete_post(bob, created.id)

    assert (await service.get_post(created.id, None)).post == created
    assert store.events_of(PostDeleted) == []


async def test_delete_unknown_or_deleted_post_raises(
    service: PostsService, store: FakePostStore, ada: Identity
) -> None:
    """Deleting an unknown post, or the same post twice, raises PostNotFound and emits once."""
    created = await post(service, ada)
    await service.delete_post(ada, created.id)

    with pytest.raises(PostNotFound):
        await service.delete_post(ada, created.id)
    with pytest.raises(PostNotFound):
        await service.delete_post(ada, "no-such-post")

    assert len(store.events_of(PostDeleted)) == 1


async def test_deleted_post_leaves_lists(service: PostsService, ada: Identity) -> None:
    """A deleted post is left out of batch gets and of its author's posts."""
    kept = await post(service, ada, "kept")
    gone = await post(service, ada, "gone")

    await service.delete_post(ada, gone.id)

    assert [p.id for p in (await service.get_posts([gone.id, kept.id], None)).items] == [kept.id]
    assert [p.id for p in (await service.posts_by_author(ada.user_id, PageRequest(), None)).items] == [
        kept.id
    ]


# --- likes ----------------------------------------------------------------------------------


async def test_like_is_idempotent_and_emitted_once(
    service: PostsService, store: FakePostStore, ada: Identity, bob: Identity
) -> None:
    """Liking twice counts one like, shows liked_by_me to the liker only, and emits post.liked once."""
    created = await post(service, ada)

    await service.like(bob, created.id)
    await service.like(bob, created.id)

    seen_by_bob = (await service.get_post(created.id, bob)).post
    assert (seen_by_bob.like_count, seen_by_bob.liked_by_me) == (1, True)
    assert ((await service.get_post(created.id, ada)).post).liked_by_me is False
    assert ((await service.get_post(created.id, None)).post).liked_by_me is False
    assert store.events_of(PostLiked) == [
        PostLiked(post_id=created.id, user_id=bob.user_id, author_id=ada.user_id)
    ]


async def test_likes_of_several_users_add_up(service: PostsService, ada: Identity, bob: Identity) -> None:
    """Each user's like counts once towards like_count."""
    created = await post(service, ada)

    await service.like(ada, created.id)
    await service.like(bob, created.id)

    assert ((await service.get_post(created.id, None)).post).like_count == 2


async def test_unlike_is_idempotent(
    service: PostsService, store: FakePostStore, ada: Identity, bob: Identity
) -> None:
    """Unliking twice takes back one like, and unliking a post never liked changes nothing."""
    created = await post(service, ada)
    await service.like(ada, created.id)
    await service.like(bob, created.id)

    await service.unlike(bob, created.id)
    await service.unlike(bob, created.id)
    await service.unlike(identity("carol"), created.id)

    seen_by_bob = (await service.get_post(created.id, bob)).post
    assert (seen_by_bob.like_count, seen_by_bob.liked_by_me) == (1, False)
    assert ((await service.get_post(created.id, ada)).post).liked_by_me is True
    assert len(store.events_of(PostLiked)) == 2


async def test_like_again_after_unlike_emits_again(
    service: PostsService, store: FakePostStore, ada: Identity, bob: Identity
) -> None:
    """A like after an unlike is a new like: counted and published again."""
    created = await post(service, ada)

    await service.like(bob, created.id)
    await service.unlike(bob, created.id)
    await service.like(bob, created.id)

    assert ((await service.get_post(created.id, bob)).post).like_count == 1
    assert len(store.events_of(PostLiked)) == 2


async def test_like_or_unlike_missing_post_raises(
    service: PostsService, ada: Identity, bob: Identity
) -> None:
    """Liking or unliking an unknown or deleted post raises PostNotFound."""
    created = await post(service, ada)
    await service.delete_post(ada, created.id)

    for post_id in (created.id, "no-such-post"):
        with pytest.raises(PostNotFound):
            await service.like(bob, post_id)
        with pytest.raises(PostNotFound):
            await service.unlike(bob, post_id)


# --- audience -------------------------------------------------------------------------------


async def test_subscribers_post_is_locked_for_others(
    service: PostsService, ada: Identity, bob: Identity
) -> None:
    """A subscribers-only post shows no text and locked=True to anonymous and other viewers."""
    created = await post(service, ada, "for my fans", audience="subscribers")

    for viewer in (None, bob):
        seen = (await service.get_post(created.id, viewer)).post
        assert (seen.text, seen.locked, seen.audience) == (None, True, "subscribers")
        (listed,) = (await service.posts_by_author(ada.user_id, PageRequest(), viewer)).items
        assert (listed.text, listed.locked) == (None, True)


async def test_subscribers_post_is_open_to_its_author(service: PostsService, ada: Identity) -> None:
    """A subscribers-only post shows its text, unlocked, to its author."""
    created = await post(service, ada, "for my fans", audience="subscribers")

    assert (created.text, created.locked) == ("for my fans", False)
    seen = (await service.get_post(created.id, ada)).post
    assert (seen.text, seen.locked) == ("for my fans", False)


async def test_public_post_is_open_to_anonymous(service: PostsService, ada: Identity) -> None:
    """A public post shows its text, unlocked, to an anonymous viewer."""
    created = await post(service, ada, "hello world")

    seen = (await service.get_post(created.id, None)).post
    assert (seen.text, seen.locked, seen.liked_by_me) == ("hello world", False, False)


# --- author snapshots -----------------------------------------------------------------------


async def test_author_from_token_claims_before_any_user_event(service: PostsService, ada: Identity) -> None:
    """A post made before any profile event names its author from the token's claims."""
    created = await post(service, ada)

    assert created.author == AuthorPublic(id=ada.user_id, handle="ada", display_name="Ada")


async def test_author_without_display_name_claim_uses_handle(service: PostsService) -> None:
    """A token without a display name gives a snapshot named by the handle."""
    carol = identity("carol")

    created = await post(service, carol)

    assert created.author.display_name == "carol"


async def test_newer_profile_renames_author_on_old_posts(service: PostsService, ada: Identity) -> None:
    """A newer author profile changes the author shown on posts made before it, and on new ones."""
    old = await post(service, ada)

    await service.apply_author_profile(new_id(), snapshot(ada, "Countess", version=1, handle="lovelace"))

    expected = AuthorPublic(id=ada.user_id, handle="lovelace", display_name="Countess")
    assert ((await service.get_post(old.id, None)).post).author == expected
    assert (await post(service, ada)).author == expected


async def test_older_profile_does_not_replace_newer(service: PostsService, ada: Identity) -> None:
    """A profile older than the stored one (or as old) does not change the author shown."""
    created = await post(service, ada)
    await service.apply_author_profile(new_id(), snapshot(ada, "Version Two", version=2))

    await service.apply_author_profile(new_id(), snapshot(ada, "Version One", version=1))
    await service.apply_author_profile(new_id(), snapshot(ada, "Also Two", version=2))

    assert ((await service.get_post(created.id, None)).post).author.display_name == "Version Two"


async def test_same_profile_event_is_applied_once(
    service: PostsService, store: FakePostStore, ada: Identity
) -> None:
    """A redelivered profile event (same event id) is applied only the first time."""
    created = await post(service, ada)
    event_id = new_id()

    await service.apply_author_profile(event_id, snapshot(ada, "First Delivery", version=1))
    await service.apply_author_profile(event_id, snapshot(ada, "Second Delivery", version=2))

    assert ((await service.get_post(created.id, None)).post).author.display_name == "First Delivery"
    assert store.state.processed_events == {("posts", event_id)}


async def test_profile_before_first_post_is_used(service: PostsService, ada: Identity) -> None:
    """A profile that arrived before the author's first post names that post instead of the token."""
    await service.apply_author_profile(new_id(), snapshot(ada, "From Event", version=1))

    created = await post(service, ada)

    assert created.author.display_name == "From Event"


# --- reading --------------------------------------------------------------------------------


async def test_get_posts_keeps_requested_order_and_drops_missing(
    service: PostsService, ada: Identity, bob: Identity
) -> None:
    """A batch get answers in the order asked, once per id, leaving out unknown ids."""
    a, b, c = [await post(service, ada, text) for text in "abc"]
    await service.like(bob, b.id)

    found = (await service.get_posts([c.id, "missing", a.id, b.id, c.id], bob)).items

    assert [p.id for p in found] == [c.id, a.id, b.id]
    assert [p.liked_by_me for p in found] == [False, False, True]


async def test_get_posts_of_nothing_is_empty(service: PostsService, ada: Identity) -> None:
    """A batch get of no ids answers an empty list."""
    await post(service, ada)

    assert (await service.get_posts([], ada)).items == []


async def test_get_posts_rejects_more_than_max_batch(service: PostsService, ada: Identity) -> None:
    """A batch get of more than MAX_BATCH ids raises InvalidRequest; MAX_BATCH ids are fine."""
    created = await post(service, ada)

    with pytest.raises(InvalidRequest):
        await service.get_posts([created.id] * (MAX_BATCH + 1), None)
    assert len((await service.get_posts([created.id] * MAX_BATCH, None)).items) == 1


async def test_get_unknown_post_raises(service: PostsService) -> None:
    """Getting an unknown post raises PostNotFound."""
    with pytest.raises(PostNotFound):
        await service.get_post("no-such-post", None)


async def test_posts_by_author_pages_newest_first(
    service: PostsService, ada: Identity, bob: Identity
) -> None:
    """Five posts (replies included) read two at a time come in three pages, newest first, each once."""
    mine = [await post(service, ada, f"post {i}") for i in range(4)]
    await post(service, bob, "not mine")
    mine.append(await post(service, ada, "a reply", reply_to=mine[0].id))

    pages = []
    cursor = None
    while True:
        page = await service.posts_by_author(ada.user_id, PageRequest(limit=2, cursor=cursor), None)
        pages.append(page)
        cursor = page.next_cursor
        if cursor is None:
            break

    assert [len(p.items) for p in pages] == [2, 2, 1]
    assert [p.id for page in pages for p in page.items] == [p.id for p in reversed(mine)]


async def test_posts_by_author_marks_viewer_likes(
    service: PostsService, ada: Identity, bob: Identity
) -> None:
    """An author's posts show liked_by_me for the viewer's likes only."""
    liked = await post(service, ada, "liked")
    await post(service, ada, "not liked")
    await service.like(bob, liked.id)

    page = await service.posts_by_author(ada.user_id, PageRequest(), bob)

    assert {p.text: p.liked_by_me for p in page.items} == {"liked": True, "not liked": False}
    anonymous = await service.posts_by_author(ada.user_id, PageRequest(), None)
    assert not any(p.liked_by_me for p in anonymous.items)


async def test_posts_by_unknown_author_is_empty(service: PostsService) -> None:
    """An author with no posts has an empty page without a cursor."""
    page = await service.posts_by_author("nobody", PageRequest(), None)

    assert (page.items, page.next_cursor) == ([], None)


async def test_subscribers_post_unlocks_for_an_active_subscriber(
    service: PostsService, payments: FakeEntitlements, ada: Identity
) -> None:
    """A subscriber of the author reads a subscribers-only post; others still see it locked."""
    bob, cy = identity("bob"), identity("cy")
    created = await service.create_post(ada, PostCreate(text="members only", audience="subscribers"))
    payments.subscribe(bob.user_id, ada.user_id)
    as_bob = await service.get_post(created.id, bob)
    as_cy = await service.get_post(created.id, cy)
    assert (as_bob.post.locked, as_bob.post.text, as_bob.degraded) == (False, "members only", [])
    assert (as_cy.post.locked, as_cy.post.text) == (True, None)


async def test_payments_down_locks_and_marks_degraded(
    service: PostsService, payments: FakeEntitlements, ada: Identity
) -> None:
    """When entitlement cannot be checked, subscriber posts are locked (fail closed) and degraded."""
    bob = identity("bob")
    locked = await service.create_post(ada, PostCreate(text="members only", audience="subscribers"))
    public = await service.create_post(ada, PostCreate(text="for all"))
    payments.subscribe(bob.user_id, ada.user_id)
    payments.down = True
    read = await service.get_posts([locked.id, public.id], bob)
    assert [(p.locked, p.text) for p in read.items] == [(True, None), (False, "for all")]
    assert read.degraded == ["payments"]
    page = await service.posts_by_author(ada.user_id, PageRequest(), bob)
    assert page.degraded == ["payments"]
    assert (await service.get_post(locked.id, ada)).post.text == "members only"


async def test_entitlement_is_not_asked_without_subscriber_posts(
    service: PostsService, payments: FakeEntitlements, ada: Identity
) -> None:
    """Public posts, anonymous viewers and authors reading their own posts need no payments call."""
    public = await service.create_post(ada, PostCreate(text="for all"))
    own = await service.create_post(ada, PostCreate(text="mine", audience="subscribers"))
    payments.down = True
    assert (await service.get_post(public.id, identity("bob"))).degraded == []
    assert (await service.get_post(own.id, None)).degraded == []
    assert (await service.get_post(own.id, ada)).degraded == []
    assert payments.calls == 0
