"""An in-memory `UserStore` with the semantics of `SqlUserStore`."""

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.fakes.store import FakeState, FakeStore, FakeTransaction
from threadline.platform.clock import utcnow
from threadline.platform.ids import new_id
from threadline.platform.pagination import Page, PageRequest
from threadline.platform.tokens import SigningKey
from threadline.services.users.api import SERVICE, UserPublic
from threadline.services.users.service import UserRecord

__all__ = ["FakeUserStore", "FakeUserTransaction", "Follow", "UserState"]


@dataclass(frozen=True)
class Follow:
    """One row of the follow graph; its time-ordered id orders follows."""

    id: str
    follower_id: str
    followee_id: str
    created_at: datetime


@dataclass
class UserState(FakeState):
    """The users service's tables."""

    users: dict[str, UserRecord] = field(default_factory=dict)
    follows: list[Follow] = field(default_factory=list)


class FakeUserTransaction(FakeTransaction[UserState]):
    """The users queries over one in-memory transaction."""

    def __init__(self, state: UserState, writable: bool) -> None:
        super().__init__(state, SERVICE, writable=writable)

    async def user_by_id(self, user_id: str) -> UserRecord | None:
        """One account by id."""
        user = self._read().users.get(user_id)
        return None if user is None else user.model_copy(deep=True)

    async def user_by_handle(self, handle: str) -> UserRecord | None:
        """One account by handle."""
        user = next((u for u in self._read().users.values() if u.handle == handle), None)
        return None if user is None else user.model_copy(deep=True)

    async def insert_user(self, user: UserRecord) -> bool:
        """Add an account unless its id or handle is taken."""
        state = self._write()
        if user.id in state.users or any(u.handle == user.handle for u in state.users.values()):
            return False
        state.users[user.id] = user.model_copy(deep=True)
        return True

    async def update_profile(self, user_id: str, display_name: str, bio: str) -> UserRecord:
        """Store a new profile and bump the version."""
        state = self._write()
        user = state.users[user_id]
        state.users[user_id] = user.model_copy(
            update={"display_name": display_name, "bio": bio, "version": user.version + 1}
        )
        return state.users[user_id].model_copy(deep=True)

    async def add_follow(self, follower_id: str, followee_id: str) -> bool:
        """Record a follow and count it on both accounts; False if it existed."""
        state = self._write()
        if any(f.follower_id == follower_id and f.followee_id == followee_id for f in state.follows):
            return False
        state.follows.append(Follow(new_id(), follower_id, followee_id, utcnow()))
        self._count_follow(follower_id, followee_id, +1)
        return True

    async def remove_follow(self, follower_id: str, followee_id: str) -> bool:
        """Remove a follow and uncount it; False if there was none."""
        state = self._write()
        kept = [f for f in state.follows if (f.follower_id, f.followee_id) != (follower_id, followee_id)]
        if len(kept) == len(state.follows):
            return False
        state.follows = kept
        self._count_follow(follower_id, followee_id, -1)
        return True

    async def followers(self, user_id: str, page: PageRequest) -> Page[UserPublic]:
        """Accounts following `user_id`, newest follow first."""
        return self._follow_page(lambda f: f.followee_id == user_id, lambda f: f.follower_id, page)

    async def following(self, user_id: str, page: PageRequest) -> Page[UserPublic]:
        """Accounts `user_id` follows, newest follow first."""
        return self._follow_page(lambda f: f.follower_id == user_id, lambda f: f.followee_id, page)

    def _follow_page(
        self, matches: Callable[[Follow], bool], other: Callable[[Follow], str], page: PageRequest
    ) -> Page[UserPublic]:
        users = self._read().users
        rows = sorted(
            (
                (f.id, users[other(f)])
                for f in self._read().follows
                if matches(f) and other(f) in users and (page.cursor is None or f.id < page.cursor)
            ),
            key=lambda row: row[0],
            reverse=True,
        )[: page.limit + 1]
        kept = rows[: page.limit]
        cursor = kept[-1][0] if len(rows) > page.limit else None
        return Page(items=[user.public() for _, user in kept], next_cursor=cursor)

    def _count_follow(self, follower_id: str, followee_id: str, delta: int) -> None:
        users = self._write().users
        if follower_id in users:
            follower = users[follower_id]
            users[follower_id] = follower.model_copy(
                update={"following_count": follower.following_count + delta}
            )
        if followee_id in users:
            followee = users[followee_id]
            users[followee_id] = followee.model_copy(
                update={"followers_count": followee.followers_count + delta}
            )


class FakeUserStore(FakeStore[UserState, FakeUserTransaction]):
    """The users store in memory, with one signing key generated up front."""

    def __init__(self) -> None:
        super().__init__(UserState(), FakeUserTransaction)
        self._signing_key = SigningKey(new_id(), Ed25519PrivateKey.generate())

    async def signing_key(self) -> SigningKey:
        """The one signing key of this store."""
        return self._signing_key

    def record(self, handle: str) -> UserRecord:
        """The committed account with `handle`, as stored (for assertions)."""
        return next(u for u in self.state.users.values() if u.handle == handle)
