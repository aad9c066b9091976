"""The users service contract: its operations, models, events and public errors."""

from datetime import datetime
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from threadline.platform.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from threadline.platform.events import EventPayload
from threadline.platform.pagination import Page, PageRequest
from threadline.platform.tokens import Identity

__all__ = [
    "SERVICE",
    "AccessToken",
    "CannotFollowSelf",
    "Credentials",
    "Handle",
    "HandleTaken",
    "InvalidCredentials",
    "ProfileUpdate",
    "UserCreate",
    "UserFollowed",
    "UserNotFound",
    "UserPublic",
    "UserRegistered",
    "UserUnfollowed",
    "UserUpdated",
    "UsersApi",
]

SERVICE = "users"

Handle = Annotated[str, StringConstraints(min_length=3, max_length=30, pattern=r"^[a-z0-9_]+$")]
DisplayName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=50)]
Bio = Annotated[str, StringConstraints(max_length=300)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class UserCreate(_Strict):
    """A registration: a unique handle, a password, and an optional display name."""

    handle: Handle
    password: Annotated[str, StringConstraints(min_length=8, max_length=128)]
    display_name: DisplayName | None = None


class Credentials(_Strict):
    """What a login presents."""

    handle: Annotated[str, StringConstraints(max_length=64)]
    password: Annotated[str, StringConstraints(max_length=128)]


class ProfileUpdate(_Strict):
    """A change to one's own profile; fields left out stay as they are."""

    display_name: DisplayName | None = None
    bio: Bio | None = None


class UserPublic(BaseModel):
    """An account as anyone may see it."""

    id: str
    handle: str
    display_name: str
    bio: str
    created_at: datetime
    followers_count: int = Field(ge=0)
    following_count: int = Field(ge=0)


class AccessToken(BaseModel):
    """A signed, short-lived access token."""

    access_token: str
    token_type: str = "bearer"
    expires_in: int


class UserRegistered(EventPayload):
    """A new account exists."""

    TYPE = "user.registered"
    id: str
    handle: str
    display_name: str
    created_at: datetime


class UserUpdated(EventPayload):
    """An account's profile changed; `version` grows with every change."""

    TYPE = "user.updated"
    id: str
    handle: str
    display_name: str
    bio: str
    version: int


class UserFollowed(EventPayload):
    """`follower_id` now follows `followee_id`."""

    TYPE = "user.followed"
    follower_id: str
    followee_id: str


class UserUnfollowed(EventPayload):
    """`follower_id` no longer follows `followee_id`."""

    TYPE = "user.unfollowed"
    follower_id: str
    followee_id: str


class HandleTaken(Conflict):
    """Registration with a handle someone already has."""

    code = "handle_taken"


class InvalidCredentials(Unauthorized):
    """Login with an unknown handle or a wrong password."""

    code = "invalid_credentials"


class UserNotFound(NotFound):
    """No account with that handle or id."""

    code = "user_not_found"


class CannotFollowSelf(InvalidRequest):
    """Following oneself."""


class UsersApi(Protocol):
    """What the users service offers to the gateway and to other services."""

    async def register(self, data: UserCreate) -> UserPublic:
        """Create an account; raises HandleTaken."""

    async def login(self, data: Credentials) -> AccessToken:
        """Exchange credentials for an access token; raises InvalidCredentials."""

    async def get_user(self, user_id: str) -> UserPublic:
        """One account by id; raises UserNotFound."""

    async def get_by_handle(self, handle: str) -> UserPublic:
        """One account by handle; raises UserNotFound."""

    async def update_profile(self, identity: Identity, data: ProfileUpdate) -> UserPublic:
        """Change the caller's own display name or bio."""

    async def follow(self, identity: Identity, handle: str) -> None:
        """The caller follows `handle` (idempotent); raises UserNotFound, CannotFollowSelf."""

    async def unfollow(self, identity: Identity, handle: str) -> None:
        """The caller stops following `handle` (idempotent); raises UserNotFound."""

    async def followers(self, handle: str, page: PageRequest) -> Page[UserPublic]:
        """Who follows `handle`, most recent first."""

    async def following(self, handle: str, page: PageRequest) -> Page[UserPublic]:
        """Whom `handle` follows, most recent first."""

    async def jwks(self) -> dict[str, Any]:
        """The public keys that verify access tokens, as a JWKS document."""
