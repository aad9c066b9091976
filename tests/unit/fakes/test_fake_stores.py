"""The fake stores keep the SQL stores' transaction semantics: commit on success, rollback on error."""

from datetime import UTC, datetime

import pytest

from tests.fakes.posts import FakePostStore
from tests.fakes.users import FakeUserStore
from threadline.services.posts.service import AuthorSnapshot
from threadline.services.users.api import UserFollowed
from threadline.services.users.service import UserRecord


class Boom(Exception):
    pass


def user(handle: str) -> UserRecord:
    return UserRecord(
        id=f"id-{handle}",
        handle=handle,
        display_name=handle,
        bio="",
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
        followers_count=0,
        following_count=0,
        password_hash="$argon2id$not-checked-here",
        version=1,
    )


async def test_write_commits_state_and_events_on_success() -> None:
    """A write block that ends normally commits its changes and publishes its events."""
    store = FakeUserStore()

    async with store.write() as tx:
        await tx.insert_user(user("ada"))
        await tx.insert_user(user("bob"))
        await tx.add_follow("id-ada", "id-bob")
        await tx.emit(UserFollowed(follower_id="id-ada", followee_id="id-bob"))

    assert store.events == [UserFollowed(follower_id="id-ada", followee_id="id-bob")]
    assert store.record("bob").followers_count == 1


async def test_write_that_raises_changes_and_emits_nothing() -> None:
    """A write block that raises leaves the state as it was and publishes none of its events."""
    store = FakeUserStore()
    async with store.write() as tx:
        await tx.insert_user(user("ada"))

    async def failing_write() -> None:
        async with store.write() as tx:
            await tx.insert_user(user("bob"))
            await tx.update_profile("id-ada", "Changed", "bio")
            await tx.emit(UserFollowed(follower_id="id-ada", followee_id="id-bob"))
            raise Boom

    with pytest.raises(Boom):
        await failing_write()

    assert list(store.state.users) == ["id-ada"]
    assert store.record("ada").display_name == "ada"
    assert store.events == []


async def test_read_transaction_refuses_writes() -> None:
    """A read transaction raises on a write or an emit instead of silently dropping it."""
    store = FakeUserStore()

    async with store.read() as tx:
        with pytest.raises(RuntimeError):
            await tx.insert_user(user("ada"))
        with pytest.raises(RuntimeError):
            await tx.emit(UserFollowed(follower_id="a", followee_id="b"))

    assert store.state.users == {}


async def test_transaction_is_unusable_after_its_block() -> None:
    """A transaction used after its block ended raises."""
    store = FakeUserStore()
    async with store.write() as tx:
        pass

    with pytest.raises(RuntimeError):
        await tx.user_by_handle("ada")


async def test_claim_event_is_false_the_second_time_and_rolls_back() -> None:
    """An event id is claimed once per consumer, and a claim in a rolled-back write does not count."""
    store = FakePostStore()

    async def failing_claim() -> None:
        async with store.write() as tx:
            assert await tx.claim_event("posts", "e1")
            raise Boom

    with pytest.raises(Boom):
        await failing_claim()

    async with store.write() as tx:
        assert await tx.claim_event("posts", "e1")
        assert not await tx.claim_event("posts", "e1")
        assert await tx.claim_event("feed", "e1")


async def test_save_author_replaces_only_an_older_version() -> None:
    """An author snapshot is replaced by a newer version only, never by an equal or older one."""
    store = FakePostStore()

    async with store.write() as tx:
        await tx.save_author(AuthorSnapshot(id="a", handle="ada", display_name="v2", version=2))
        await tx.save_author(AuthorSnapshot(id="a", handle="ada", display_name="v1", version=1))
        await tx.save_author(AuthorSnapshot(id="a", handle="ada", display_name="v2 again", version=2))
        await tx.save_author(AuthorSnapshot(id="a", handle="ada", display_name="v3", version=3))

    assert store.state.authors["a"].display_name == "v3"
