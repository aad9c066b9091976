"""The gateway asks users once per handle, and forwards author pages of the handles it knows."""

import pytest

from tests.fakes.users import FakeUserStore
from tests.unit.users.test_users_service import FAST_HASHER
from threadline.gateway.routes import AccountIds, forwards
from threadline.platform.errors import ServiceUnavailable
from threadline.services.users.api import UserCreate, UserNotFound, UserPublic
from threadline.services.users.service import UsersService


class CountingUsers(UsersService):
    """The users application over a fake store, counting handle lookups; can be taken down."""

    def __init__(self) -> None:
        super().__init__(FakeUserStore(), hasher=FAST_HASHER)
        self.lookups = 0
        self.down = False

    async def get_by_handle(self, handle: str) -> UserPublic:
        self.lookups += 1
        if self.down:
            raise ServiceUnavailable("users", "connection refused")
        return await super().get_by_handle(handle)


async def register(users: UsersService, handle: str) -> str:
    return (await users.register(UserCreate(handle=handle, password="correct horse battery"))).id


async def test_a_known_handle_is_answered_from_memory_even_while_users_is_down() -> None:
    """The first lookup asks users; later ones, including during an outage, do not."""
    users = CountingUsers()
    ann = await register(users, "ann")
    ids = AccountIds(users)
    assert await ids.id_of("ann") == ann
    users.down = True
    assert [await ids.id_of("ann") for _ in range(3)] == [ann] * 3
    assert users.lookups == 1
    with pytest.raises(ServiceUnavailable):
        await ids.id_of("bob")


async def test_known_answers_only_from_memory() -> None:
    """`known` gives a remembered handle's id and None for any other, without asking users."""
    users = CountingUsers()
    ann = await register(users, "ann")
    await register(users, "bob")
    ids = AccountIds(users)
    assert ids.known("ann") is None
    await ids.id_of("ann")
    assert (ids.known("ann"), ids.known("bob")) == (ann, None)
    assert users.lookups == 1


async def test_an_unknown_handle_is_asked_again_so_a_later_registration_is_found() -> None:
    """Not-found is not remembered."""
    users = CountingUsers()
    ids = AccountIds(users)
    with pytest.raises(UserNotFound):
        await ids.id_of("cat")
    cat = await register(users, "cat")
    assert await ids.id_of("cat") == cat
    assert users.lookups == 2


async def test_memory_is_bounded_keeping_the_most_recently_used() -> None:
    """With room for two, the least recently used handle is forgotten and asked for again."""
    users = CountingUsers()
    for handle in ("ann", "bob", "cat"):
        await register(users, handle)
    ids = AccountIds(users, size=2)
    for handle in ("ann", "bob", "ann", "cat"):
        await ids.id_of(handle)
    assert users.lookups == 3
    await ids.id_of("ann")
    assert users.lookups == 3
    await ids.id_of("bob")
    assert users.lookups == 4


async def test_an_author_page_is_forwarded_only_for_a_handle_the_gateway_knows() -> None:
    """The author page's rewrite names the account of a remembered handle and declines any other."""
    users = CountingUsers()
    ann = await register(users, "ann")
    await register(users, "bob")
    account_ids = AccountIds(users)
    [author_page] = [f for f in forwards(account_ids) if f.path == "/api/v1/users/{handle}/posts"]
    assert author_page.rewrite is not None
    assert author_page.rewrite({"handle": "ann"}) is None
    assert await account_ids.id_of("ann") == ann
    assert author_page.rewrite({"handle": "ann"}) == {"author_id": ann}
    assert author_page.rewrite({"handle": "bob"}) is None
    assert users.lookups == 1
