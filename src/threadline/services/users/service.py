"""The users application layer: implements UsersApi over its store and the signing keys."""

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from threadline.platform.clock import utcnow
from threadline.platform.events import EventPayload
from threadline.platform.ids import new_id
from threadline.platform.pagination import Page, PageRequest
from threadline.platform.tokens import Identity, SigningKey
from threadline.services.users.api import (
    AccessToken,
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

__all__ = ["UserRecord", "UserStore", "UserTransaction", "UsersService"]


class UserRecord(UserPublic):
    """An account as stored, with what only the users service may see."""

    password_hash: str
    version: int

    def public(self) -> UserPublic:
        """The account as anyone may see it."""
        return UserPublic.model_validate(self.model_dump(exclude={"password_hash", "version"}))


class UserTransaction(Protocol):
    """Reads and writes of the users store inside one transaction."""

    async def user_by_id(self, user_id: str) -> UserRecord | None:
        """One account by id."""

    async def user_by_handle(self, handle: str) -> UserRecord | None:
        """One account by handle."""

    async def insert_user(self, user: UserRecord) -> bool:
        """Add an account; False if the handle is taken."""

    async def update_profile(self, user_id: str, display_name: str, bio: str) -> UserRecord:
        """Store a new profile and bump the version."""

    async def add_follow(self, follower_id: str, followee_id: str) -> bool:
        """Record a follow; False if it already existed."""

    async def remove_follow(self, follower_id: str, followee_id: str) -> bool:
        """Remove a follow; False if there was none."""

    async def followers(self, user_id: str, page: PageRequest) -> Page[UserPublic]:
        """Accounts following `user_id`, newest follow first."""

    async def following(self, user_id: str, page: PageRequest) -> Page[UserPublic]:
        """Accounts `user_id` follows, newest follow first."""

    async def emit(self, payload: EventPayload) -> object:
        """Publish an event when (and only if) this transaction commits."""


class UserStore(Protocol):
    """The users service's persistence port."""

    def write(self) -> AbstractAsyncContextManager[UserTransaction]:
        """A write transaction."""

    def read(self) -> AbstractAsyncContextManager[UserTransaction]:
        """A read-only transaction."""

    async def signing_key(self) -> SigningKey:
        """The current token-signing key, created on first use."""


class UsersService:
    """Accounts, logins, profiles and the follow graph."""

    def __init__(
        self,
        store: UserStore,
        *,
        token_ttl_seconds: int = 900,
        hasher: PasswordHasher | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._store = store
        self._token_ttl = token_ttl_seconds
        # RFC 9106's second recommended argon2id profile (t=2, m=19 MiB): about 20 ms a hash here.
        self._hasher = hasher or PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
        self._dummy_hash: str | None = None
        self._clock: Callable[[], datetime] = now or utcnow

    async def register(self, data: UserCreate) -> UserPublic:
        """Create an account with an argon2id password hash."""
        password_hash = await asyncio.to_thread(self._hasher.hash, data.password)
        now = self._clock()
        user = UserRecord(
            id=new_id(),
            handle=data.handle,
            display_name=data.display_name or data.handle,
            bio="",
            created_at=now,
            followers_count=0,
            following_count=0,
            password_hash=password_hash,
            version=1,
        )
        async with self._store.write() as tx:
            if not await tx.insert_user(user):
                raise HandleTaken(f"the handle {data.handle!r} is taken")
            await tx.emit(
                UserRegistered(id=user.id, handle=user.handle, display_name=user.display_name, created_at=now)
            )
        return user.public()

    async def login(self, data: Credentials) -> AccessToken:
        """Check a password and sign an access token."""
        async with self._store.read() as tx:
            user = await tx.user_by_handle(data.handle)
        if user is None:
            # Hash anyway so a wrong handle takes as long as a wrong password.
            await asyncio.to_thread(self._verify, await self._dummy(), data.password)
            raise InvalidCredentials("wrong handle or password")
        if not await asyncio.to_thread(self._verify, user.password_hash, data.password):
            raise InvalidCredentials("wrong handle or password")
        key = await self._store.signing_key()
        token = key.sign(
            user_id=user.id, handle=user.handle, display_name=user.display_name, ttl_seconds=self._token_ttl
        )
        return AccessToken(access_token=token, expires_in=self._token_ttl)

    async def get_user(self, user_id: str) -> UserPublic:
        """One account by id."""
        async with self._store.read() as tx:
            user = await tx.user_by_id(user_id)
        if user is None:
            raise UserNotFound(f"no user with id {user_id!r}")
        return user.public()

    async def get_by_handle(self, handle: str) -> UserPublic:
        """One account by handle."""
        async with self._store.read() as tx:
            return (await _existing(tx, handle)).public()

    async def update_profile(self, identity: Identity, data: ProfileUpdate) -> UserPublic:
        """Change the caller's profile and announce it."""
        async with self._store.write() as tx:
            user = await tx.user_by_id(identity.user_id)
            if user is None:
                raise UserNotFound("the account of this token no longer exists")
            updated = await tx.update_profile(
                user.id,
                display_name=data.display_name if data.display_name is not None else user.display_name,
                bio=data.bio if data.bio is not None else user.bio,
            )
            await tx.emit(
                UserUpdated(
                    id=updated.id,
                    handle=updated.handle,
                    display_name=updated.display_name,
                    bio=updated.bio,
                    version=updated.version,
                )
            )
        return updated.public()

    async def follow(self, identity: Identity, handle: str) -> None:
        """Follow an account; following twice changes nothing."""
        async with self._store.write() as tx:
            followee = await _existing(tx, handle)
            if followee.id == identity.user_id:
                raise CannotFollowSelf("you cannot follow yourself")
            if await tx.add_follow(identity.user_id, followee.id):
                await tx.emit(UserFollowed(follower_id=identity.user_id, followee_id=followee.id))

    async def unfollow(self, identity: Identity, handle: str) -> None:
        """Stop following an account; unfollowing twice changes nothing."""
        async with self._store.write() as tx:
            followee = await _existing(tx, handle)
            if await tx.remove_follow(identity.user_id, followee.id):
                await tx.emit(UserUnfollowed(follower_id=identity.user_id, followee_id=followee.id))

    async def followers(self, handle: str, page: PageRequest) -> Page[UserPublic]:
        """Who follows `handle`."""
        async with self._store.read() as tx:
            return await tx.followers((await _existing(tx, handle)).id, page)

    async def following(self, handle: str, page: PageRequest) -> Page[UserPublic]:
        """Whom `handle` follows."""
        async with self._store.read() as tx:
            return await tx.following((await _existing(tx, handle)).id, page)

    async def jwks(self) -> dict[str, Any]:
        """The token-verification keys."""
        key = await self._store.signing_key()
        return {"keys": [key.public_jwk()]}

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return bool(self._hasher.verify(password_hash, password))
        except (VerificationError, InvalidHashError):
            return False

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = await asyncio.to_thread(self._hasher.hash, "not-a-real-password")
        return self._dummy_hash


async def _existing(tx: UserTransaction, handle: str) -> UserRecord:
    user = await tx.user_by_handle(handle)
    if user is None:
        raise UserNotFound(f"no user with handle {handle!r}")
    return user
