"""The users application layer over a fake store: accounts, logins, profiles and the follow graph."""

import jwt
import pytest
from argon2 import PasswordHasher

from tests.fakes.users import FakeUserStore
from threadline.platform.errors import Unauthorized
from threadline.platform.pagination import PageRequest
from threadline.platform.tokens import Identity, TokenVerifier
from threadline.services.users.api import (
    CannotFollowSelf,
    Credentials,
    HandleTaken,
    InvalidCredentials,
    ProfileUpdate,
    UserCreate,
    UserFollowed,
    UserNotFound,
    UserPublic,
    UserRegistered,
    UserUnfollowed,
    UserUpdated,
)
from threadline.services.users.service import UsersService, UserStore

PASSWORD = "correct horse battery"
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.fixture
def store() -> FakeUserStore:
    return FakeUserStore()


@pytest.fixture
def service(store: FakeUserStore) -> UsersService:
    port: UserStore = store
    return UsersService(port, hasher=FAST_HASHER)


def identity_of(user: UserPublic) -> Identity:
    """The identity a verified token of `user` would give."""
    return Identity(user_id=user.id, handle=user.handle, display_name=user.display_name, token="test-token")


async def register(service: UsersService, handle: str, display_name: str | None = None) -> UserPublic:
    return await service.register(UserCreate(handle=handle, password=PASSWORD, display_name=display_name))


async def register_many(service: UsersService, count: int) -> list[UserPublic]:
    return [await register(service, f"user_{i}") for i in range(count)]


# --- registration ---------------------------------------------------------------------------


async def test_register_defaults_display_name_to_handle(service: UsersService) -> None:
    """A registration without a display name uses the handle as the display name."""
    user = await register(service, "ada")

    assert user.handle == "ada"
    assert user.display_name == "ada"
    assert user.bio == ""
    assert (user.followers_count, user.following_count) == (0, 0)


async def test_register_keeps_given_display_name(service: UsersService) -> None:
    """A registration's display name is stored and returned by both lookups."""
    user = await register(service, "ada", "Ada Lovelace")

    assert user.display_name == "Ada Lovelace"
    assert await service.get_user(user.id) == user
    assert await service.get_by_handle("ada") == user


async def test_register_emits_user_registered(service: UsersService, store: FakeUserStore) -> None:
    """Registering publishes exactly one user.registered with the new account's id, handle and name."""
    user = await register(service, "ada", "Ada")

    assert store.events == [
        UserRegistered(id=user.id, handle="ada", display_name="Ada", created_at=user.created_at)
    ]


async def test_register_taken_handle_raises_and_emits_nothing(
    service: UsersService, store: FakeUserStore
) -> None:
    """A second registration of a handle raises HandleTaken, emits nothing and leaves the first account."""
    first = await register(service, "ada", "First")

    with pytest.raises(HandleTaken):
        await register(service, "ada", "Second")

    assert len(store.events_of(UserRegistered)) == 1
    assert len(store.state.users) == 1
    assert await service.get_by_handle("ada") == first


async def test_default_hasher_stores_argon2id_hash(store: FakeUserStore) -> None:
    """With the default hasher the stored password is an argon2id hash, never the plain text."""
    service = UsersService(store)
    await register(service, "ada")

    stored = store.record("ada").password_hash
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored
    assert PasswordHasher().verify(stored, PASSWORD)
    assert (await service.login(Credentials(handle="ada", password=PASSWORD))).access_token


async def test_get_unknown_user_raises(service: UsersService) -> None:
    """Looking up an unknown id or handle raises UserNotFound."""
    with pytest.raises(UserNotFound):
        await service.get_user("no-such-id")
    with pytest.raises(UserNotFound):
        await service.get_by_handle("nobody")


# --- login ----------------------------------------------------------------------------------


async def test_login_returns_token_verified_by_own_jwks(service: UsersService) -> None:
    """A login with the right password returns a bearer token that the service's JWKS verifies."""
    user = await register(service, "ada", "Ada")

    token = await service.login(Credentials(handle="ada", password=PASSWORD))
    identity = await TokenVerifier(service.jwks).verify(token.access_token)

    assert token.token_type == "bearer"
    assert identity == Identity(user_id=user.id, handle="ada", display_name="Ada", token=token.access_token)


async def test_login_token_lives_for_configured_ttl(store: FakeUserStore) -> None:
    """An access token expires `token_ttl_seconds` after it was issued, as `expires_in` says."""
    service = UsersService(store, hasher=FAST_HASHER, token_ttl_seconds=120)
    await register(service, "ada")

    token = await service.login(Credentials(handle="ada", password=PASSWORD))
    claims = jwt.decode(token.access_token, options={"verify_signature": False})

    assert token.expires_in == 120
    assert claims["exp"] - claims["iat"] == 120


async def test_token_of_another_key_is_rejected(service: UsersService) -> None:
    """A token signed by another users store's key does not verify against this service's JWKS."""
    other = UsersService(FakeUserStore(), hasher=FAST_HASHER)
    await register(other, "ada")
    foreign = await other.login(Credentials(handle="ada", password=PASSWORD))

    with pytest.raises(Unauthorized):
        await TokenVerifier(service.jwks).verify(foreign.access_token)


async def test_login_with_wrong_password_raises(service: UsersService) -> None:
    """A login with a wrong password raises InvalidCredentials."""
    await register(service, "ada")

    with pytest.raises(InvalidCredentials):
        await service.login(Credentials(handle="ada", password="wrong password"))


async def test_login_with_unknown_handle_raises(service: UsersService) -> None:
    """A login with a handle nobody has raises InvalidCredentials."""
    await register(service, "ada")

    with pytest.raises(InvalidCredentials):
        await service.login(Credentials(handle="bob", password=PASSWORD))


async def test_login_after_profile_update_carries_new_name(service: UsersService) -> None:
    """A token issued after a profile change carries the new display name."""
    user = await register(service, "ada", "Ada")
    await service.update_profile(identity_of(user), ProfileUpdate(display_name="Countess"))

    token = await service.login(Credentials(handle="ada", password=PASSWORD))

    assert (await TokenVerifier(service.jwks).verify(token.access_token)).display_name == "Countess"


# --- profile --------------------------------------------------------------------------------


async def test_update_profile_bumps_version_and_emits_user_updated(
    service: UsersService, store: FakeUserStore
) -> None:
    """A profile change bumps the version and publishes user.updated with the new name."""
    user = await register(service, "ada", "Ada")

    updated = await service.update_profile(identity_of(user), ProfileUpdate(display_name="Countess"))

    assert updated.display_name == "Countess"
    assert (await service.get_by_handle("ada")).display_name == "Countess"
    assert store.record("ada").version == 2
    assert store.events_of(UserUpdated) == [
        UserUpdated(id=user.id, handle="ada", display_name="Countess", bio="", version=2)
    ]


async def test_update_profile_keeps_fields_left_out(service: UsersService, store: FakeUserStore) -> None:
    """A profile change of only the bio keeps the display name, and each change bumps the version."""
    user = await register(service, "ada", "Ada")
    await service.update_profile(identity_of(user), ProfileUpdate(display_name="Countess"))

    updated = await service.update_profile(identity_of(user), ProfileUpdate(bio="Analyst"))

    assert (updated.display_name, updated.bio) == ("Countess", "Analyst")
    assert [e.version for e in store.events_of(UserUpdated)] == [2, 3]
    assert store.events_of(UserUpdated)[-1].display_name == "Countess"


async def test_update_profile_of_unknown_account_raises(service: UsersService, store: FakeUserStore) -> None:
    """A profile change for a token whose account does not exist raises UserNotFound and emits nothing."""
    ghost = Identity(user_id="ghost", handle="ghost", display_name="Ghost", token="test-token")

    with pytest.raises(UserNotFound):
        await service.update_profile(ghost, ProfileUpdate(display_name="Boo"))

    assert store.events == []


# --- follow graph ---------------------------------------------------------------------------


async def test_follow_counts_and_emits_once(service: UsersService, store: FakeUserStore) -> None:
    """Following twice counts once on both accounts and publishes user.followed once."""
    ada, bob = await register(service, "ada"), await register(service, "bob")

    await service.follow(identity_of(ada), "bob")
    await service.follow(identity_of(ada), "bob")

    assert (await service.get_by_handle("ada")).following_count == 1
    assert (await service.get_by_handle("ada")).followers_count == 0
    assert (await service.get_by_handle("bob")).followers_count == 1
    assert store.events_of(UserFollowed) == [UserFollowed(follower_id=ada.id, followee_id=bob.id)]


async def test_unfollow_uncounts_and_emits_once(service: UsersService, store: FakeUserStore) -> None:
    """Unfollowing twice uncounts once and publishes user.unfollowed once."""
    ada, bob = await register(service, "ada"), await register(service, "bob")
    await service.follow(identity_of(ada), "bob")

    await service.unfollow(identity_of(ada), "bob")
    await service.unfollow(identity_of(ada), "bob")

    assert (await service.get_by_handle("ada")).following_count == 0
    assert (await service.get_by_handle("bob")).followers_count == 0
    assert store.events_of(UserUnfollowed) == [UserUnfollowed(follower_id=ada.id, followee_id=bob.id)]
    assert (await service.followers("bob", PageRequest())).items == []


async def test_unfollow_without_follow_emits_nothing(service: UsersService, store: FakeUserStore) -> None:
    """Unfollowing an account one does not follow changes nothing and publishes nothing."""
    ada = await register(service, "ada")
    await register(service, "bob")
    before = len(store.events)

    await service.unfollow(identity_of(ada), "bob")

    assert len(store.events) == before
    assert (await service.get_by_handle("bob")).followers_count == 0


async def test_follow_after_unfollow_emits_again(service: UsersService, store: FakeUserStore) -> None:
    """Following again after an unfollow is a new change: counted and published again."""
    ada = await register(service, "ada")
    await register(service, "bob")

    await service.follow(identity_of(ada), "bob")
    await service.unfollow(identity_of(ada), "bob")
    await service.follow(identity_of(ada), "bob")

    assert [e.TYPE for e in store.events if not isinstance(e, UserRegistered)] == [
        "user.followed",
        "user.unfollowed",
        "user.followed",
    ]
    assert (await service.get_by_handle("bob")).followers_count == 1


async def test_follow_self_raises(service: UsersService, store: FakeUserStore) -> None:
    """Following oneself raises CannotFollowSelf and changes nothing."""
    ada = await register(service, "ada")

    with pytest.raises(CannotFollowSelf):
        await service.follow(identity_of(ada), "ada")

    assert store.events_of(UserFollowed) == []
    assert (await service.get_by_handle("ada")).following_count == 0
    assert store.state.follows == []


async def test_follow_unknown_handle_raises(service: UsersService, store: FakeUserStore) -> None:
    """Following or unfollowing a handle nobody has raises UserNotFound and publishes nothing."""
    ada = await register(service, "ada")

    with pytest.raises(UserNotFound):
        await service.follow(identity_of(ada), "nobody")
    with pytest.raises(UserNotFound):
        await service.unfollow(identity_of(ada), "nobody")

    assert store.events_of(UserFollowed) == []
    assert store.events_of(UserUnfollowed) == []


async def test_followers_pages_newest_first_without_duplicates(service: UsersService) -> None:
    """Five followers read two at a time come in three pages, newest follow first, each once."""
    await register(service, "star")
    fans = await register_many(service, 5)
    for fan in fans:
        await service.follow(identity_of(fan), "star")

    pages = []
    cursor = None
    while True:
        page = await service.followers("star", PageRequest(limit=2, cursor=cursor))
        pages.append(page)
        cursor = page.next_cursor
        if cursor is None:
            break

    assert [len(p.items) for p in pages] == [2, 2, 1]
    assert [u.handle for p in pages for u in p.items] == [f.handle for f in reversed(fans)]


async def test_following_pages_newest_first_without_duplicates(service: UsersService) -> None:
    """Five followees read two at a time come in three pages, newest follow first, each once."""
    fan = await register(service, "fan")
    stars = await register_many(service, 5)
    for star in stars:
        await service.follow(identity_of(fan), star.handle)

    first = await service.following("fan", PageRequest(limit=2))
    second = await service.following("fan", PageRequest(limit=2, cursor=first.next_cursor))
    third = await service.following("fan", PageRequest(limit=2, cursor=second.next_cursor))

    assert first.next_cursor is not None
    assert second.next_cursor is not None
    assert third.next_cursor is None
    handles = [u.handle for page in (first, second, third) for u in page.items]
    assert handles == [s.handle for s in reversed(stars)]


async def test_follow_page_shows_current_counters(service: UsersService) -> None:
    """Accounts on a follow page carry their current follower and following counts."""
    ada = await register(service, "ada")
    bob = await register(service, "bob")
    await service.follow(identity_of(ada), "bob")
    await service.follow(identity_of(bob), "ada")

    (follower,) = (await service.followers("bob", PageRequest())).items

    assert follower.handle == "ada"
    assert (follower.followers_count, follower.following_count) == (1, 1)


async def test_full_last_page_has_no_cursor(service: UsersService) -> None:
    """A page holding exactly the remaining follows has no next cursor."""
    await register(service, "star")
    for fan in await register_many(service, 2):
        await service.follow(identity_of(fan), "star")

    page = await service.followers("star", PageRequest(limit=2))

    assert len(page.items) == 2
    assert page.next_cursor is None


async def test_follow_lists_of_unknown_handle_raise(service: UsersService) -> None:
    """The followers or following of a handle nobody has raise UserNotFound."""
    with pytest.raises(UserNotFound):
        await service.followers("nobody", PageRequest())
    with pytest.raises(UserNotFound):
        await service.following("nobody", PageRequest())
