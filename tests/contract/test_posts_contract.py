"""PostsApi behaves the same through the local and the HTTP adapter."""

import pytest

from tests.contract.conftest import Adapters
from tests.support.polling import eventually
from threadline.platform.errors import ServiceError
from threadline.platform.pagination import PageRequest
from threadline.services.posts.api import MAX_BATCH, PostCreate
from threadline.services.users.api import ProfileUpdate


async def test_create_and_read_a_post_and_its_reply(adapters: Adapters) -> None:
    """A reply points at its parent and the thread root; the parent counts it."""
    _, ann = await adapters.account("ann", "Ann")
    root = await adapters.posts.create_post(ann, PostCreate(text="root"))
    reply = await adapters.posts.create_post(ann, PostCreate(text="reply", reply_to=root.id))
    deeper = await adapters.posts.create_post(ann, PostCreate(text="deeper", reply_to=reply.id))
    assert root.root_id == root.id
    assert root.reply_to is None
    assert (deeper.reply_to, deeper.root_id) == (reply.id, root.id)
    fetched = (await adapters.posts.get_post(root.id, None)).post
    assert (fetched.text, fetched.reply_count, fetched.author.display_name) == ("root", 1, "Ann")


async def test_reply_to_missing_post_is_not_found(adapters: Adapters) -> None:
    """Replying to an unknown post is a 404 and creates nothing."""
    _, ann = await adapters.account("ann")
    with pytest.raises(ServiceError) as caught:
        await adapters.posts.create_post(ann, PostCreate(text="x", reply_to="no-such-post"))
    assert caught.value.status == 404
    author_id = ann.user_id
    assert (await adapters.posts.posts_by_author(author_id, PageRequest(), None)).items == []


async def test_only_the_author_deletes(adapters: Adapters) -> None:
    """Someone else's delete is 403; the author's makes the post 404 and uncounts the reply."""
    _, ann = await adapters.account("ann")
    _, bob = await adapters.account("bob")
    root = await adapters.posts.create_post(ann, PostCreate(text="root"))
    reply = await adapters.posts.create_post(ann, PostCreate(text="reply", reply_to=root.id))
    with pytest.raises(ServiceError) as caught:
        await adapters.posts.delete_post(bob, reply.id)
    assert caught.value.status == 403
    await adapters.posts.delete_post(ann, reply.id)
    with pytest.raises(ServiceError) as gone:
        await adapters.posts.get_post(reply.id, None)
    assert gone.value.status == 404
    assert ((await adapters.posts.get_post(root.id, None)).post).reply_count == 0


async def test_likes_are_idempotent_and_personal(adapters: Adapters) -> None:
    """Liking twice counts once, shows as liked_by_me for the liker only, and unlikes back."""
    _, ann = await adapters.account("ann")
    _, bob = await adapters.account("bob")
    post = await adapters.posts.create_post(ann, PostCreate(text="like me"))
    await adapters.posts.like(bob, post.id)
    await adapters.posts.like(bob, post.id)
    as_bob = (await adapters.posts.get_post(post.id, bob)).post
    as_ann = (await adapters.posts.get_post(post.id, ann)).post
    assert (as_bob.like_count, as_bob.liked_by_me, as_ann.liked_by_me) == (1, True, False)
    await adapters.posts.unlike(bob, post.id)
    await adapters.posts.unlike(bob, post.id)
    assert ((await adapters.posts.get_post(post.id, bob)).post).like_count == 0


async def test_subscriber_posts_are_locked_for_others(adapters: Adapters) -> None:
    """A subscribers-only post shows its text to its author only."""
    _, ann = await adapters.account("ann")
    _, bob = await adapters.account("bob")
    post = await adapters.posts.create_post(ann, PostCreate(text="secret", audience="subscribers"))
    for viewer in (None, bob):
        seen = (await adapters.posts.get_post(post.id, viewer)).post
        assert (seen.locked, seen.text) == (True, None)
    assert ((await adapters.posts.get_post(post.id, ann)).post).text == "secret"


async def test_batch_read_keeps_order_and_drops_missing(adapters: Adapters) -> None:
    """get_posts answers in the order asked, leaves out unknown ids, and refuses huge batches."""
    _, ann = await adapters.account("ann")
    first = await adapters.posts.create_post(ann, PostCreate(text="1"))
    second = await adapters.posts.create_post(ann, PostCreate(text="2"))
    got = (await adapters.posts.get_posts([second.id, "missing", first.id], None)).items
    assert [post.id for post in got] == [second.id, first.id]
    with pytest.raises(ServiceError) as caught:
        await adapters.posts.get_posts(["x"] * (MAX_BATCH + 1), None)
    assert caught.value.status == 422


async def test_author_pages_are_newest_first(adapters: Adapters) -> None:
    """An author's posts page by cursor, newest first."""
    _, ann = await adapters.account("ann")
    made = [await adapters.posts.create_post(ann, PostCreate(text=str(i))) for i in range(5)]
    first = await adapters.posts.posts_by_author(ann.user_id, PageRequest(limit=3), None)
    assert first.next_cursor is not None
    rest = await adapters.posts.posts_by_author(
        ann.user_id, PageRequest(limit=3, cursor=first.next_cursor), None
    )
    assert [p.id for p in first.items + rest.items] == [p.id for p in reversed(made)]
    assert rest.next_cursor is None


async def test_display_name_change_reaches_old_posts(adapters: Adapters) -> None:
    """After user.updated is delivered, old posts show the new display name."""
    _, ann = await adapters.account("ann", "Ann")
    post = await adapters.posts.create_post(ann, PostCreate(text="before"))
    await adapters.users.update_profile(ann, ProfileUpdate(display_name="Ann Renamed"))

    async def renamed() -> None:
        assert ((await adapters.posts.get_post(post.id, None)).post).author.display_name == "Ann Renamed"

    await eventually(renamed)
