"""UsersApi behaves the same through the local and the HTTP adapter."""

import pytest

from tests.contract.conftest import Adapters
from threadline.platform.errors import ServiceError
from threadline.platform.pagination import PageRequest
from threadline.services.users.api import Credentials, ProfileUpdate, UserCreate


async def test_register_then_read_by_id_and_handle(adapters: Adapters) -> None:
    """A registered account reads back by id and by handle, display name defaulting to the handle."""
    user, _ = await adapters.account("ann_1")
    assert user.display_name == "ann_1"
    assert await adapters.users.get_user(user.id) == user
    assert await adapters.users.get_by_handle("ann_1") == user


async def test_duplicate_handle_is_handle_taken(adapters: Adapters) -> None:
    """A second registration with the same handle is a 409 handle_taken."""
    await adapters.account("dup")
    with pytest.raises(ServiceError) as caught:
        await adapters.users.register(UserCreate(handle="dup", password="another pass"))
    assert (caught.value.status, caught.value.code) == (409, "handle_taken")


async def test_wrong_password_and_unknown_handle_are_invalid_credentials(adapters: Adapters) -> None:
    """Login fails the same way for a wrong password and an unknown handle."""
    await adapters.account("carol")
    for handle, password in (("carol", "wrong password"), ("nobody", "whatever1")):
        with pytest.raises(ServiceError) as caught:
            await adapters.users.login(Credentials(handle=handle, password=password))
        assert (caught.value.status, caught.value.code) == (401, "invalid_credentials")


async def test_unknown_user_is_not_found(adapters: Adapters) -> None:
    """Reading an account that does not exist is a 404."""
    with pytest.raises(ServiceError) as caught:
        await adapters.users.get_by_handle("ghost")
    assert caught.value.status == 404


async def test_profile_update_changes_only_given_fields(adapters: Adapters) -> None:
    """PATCH semantics: a field left out keeps its value."""
    _, me = await adapters.account("dora", "Dora")
    await adapters.users.update_profile(me, ProfileUpdate(bio="hello"))
    updated = await adapters.users.update_profile(me, ProfileUpdate(display_name="Dora D"))
    assert (updated.display_name, updated.bio) == ("Dora D", "hello")


async def test_follow_is_idempotent_and_counted(adapters: Adapters) -> None:
    """Following twice counts once; unfollowing brings both counters back."""
    _, erin = await adapters.account("erin")
    await adapters.account("fred")
    await adapters.users.follow(erin, "fred")
    await adapters.users.follow(erin, "fred")
    assert (await adapters.users.get_by_handle("fred")).followers_count == 1
    assert (await adapters.users.get_by_handle("erin")).following_count == 1
    await adapters.users.unfollow(erin, "fred")
    await adapters.users.unfollow(erin, "fred")
    assert (await adapters.users.get_by_handle("fred")).followers_count == 0


async def test_follow_self_is_invalid(adapters: Adapters) -> None:
    """Following oneself is a 422."""
    _, gus = await adapters.account("gus")
    with pytest.raises(ServiceError) as caught:
        await adapters.users.follow(gus, "gus")
    assert caught.value.status == 422


async def test_followers_page_through_with_cursors(adapters: Adapters) -> None:
    """Followers come newest first, in pages that chain by cursor without repeats."""
    await adapters.account("star")
    handles = [f"fan_{i}" for i in range(5)]
    for handle in handles:
        _, fan = await adapters.account(handle)
        await adapters.users.follow(fan, "star")
    seen: list[str] = []
    cursor = None
    while True:
        page = await adapters.users.followers("star", PageRequest(limit=2, cursor=cursor))
        seen += [user.handle for user in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == list(reversed(handles))
    following = await adapters.users.following("fan_0", PageRequest())
    assert [user.handle for user in following.items] == ["star"]


async def test_jwks_publishes_an_eddsa_key(adapters: Adapters) -> None:
    """The JWKS holds the Ed25519 public key tokens are signed with."""
    jwks = await adapters.users.jwks()
    (key,) = jwks["keys"]
    assert (key["kty"], key["crv"], key["alg"]) == ("OKP", "Ed25519", "EdDSA")
    assert "d" not in key
