"""The users service over HTTP: its internal routes, and the client adapter for other processes."""

from typing import Any

from fastapi import APIRouter, Response

from threadline.platform.callers import Caller
from threadline.platform.http_client import ServiceClient
from threadline.platform.pagination import Page, PageRequest, Paging
from threadline.platform.tokens import Identity
from threadline.services.users.api import (
    SERVICE,
    AccessToken,
    Credentials,
    ProfileUpdate,
    UserCreate,
    UserPublic,
    UsersApi,
)

__all__ = ["UsersClient", "build_router"]

PREFIX = f"/{SERVICE}"


def build_router(service: UsersApi) -> APIRouter:
    """Internal routes, one per UsersApi operation, and the caller's own account for the edge's GET /me."""
    router = APIRouter(prefix=PREFIX)

    @router.post("/accounts", status_code=201)
    async def register(data: UserCreate) -> UserPublic:
        return await service.register(data)

    @router.post("/sessions")
    async def login(data: Credentials) -> AccessToken:
        return await service.login(data)

    @router.get("/accounts/{user_id}")
    async def get_user(user_id: str) -> UserPublic:
        return await service.get_user(user_id)

    @router.get("/handles/{handle}")
    async def get_by_handle(handle: str) -> UserPublic:
        return await service.get_by_handle(handle)

    @router.get("/me")
    async def me(identity: Caller) -> UserPublic:
        return await service.get_user(identity.user_id)

    @router.patch("/me")
    async def update_profile(identity: Caller, data: ProfileUpdate) -> UserPublic:
        return await service.update_profile(identity, data)

    @router.put("/me/following/{handle}", status_code=204)
    async def follow(identity: Caller, handle: str) -> Response:
        await service.follow(identity, handle)
        return Response(status_code=204)

    @router.delete("/me/following/{handle}", status_code=204)
    async def unfollow(identity: Caller, handle: str) -> Response:
        await service.unfollow(identity, handle)
        return Response(status_code=204)

    @router.get("/handles/{handle}/followers")
    async def followers(handle: str, page: Paging) -> Page[UserPublic]:
        return await service.followers(handle, page)

    @router.get("/handles/{handle}/following")
    async def following(handle: str, page: Paging) -> Page[UserPublic]:
        return await service.following(handle, page)

    @router.get("/jwks")
    async def jwks() -> dict[str, Any]:
        return await service.jwks()

    return router


class UsersClient(ServiceClient):
    """UsersApi for callers in another process."""

    async def register(self, data: UserCreate) -> UserPublic:
        """Create an account."""
        return await self.call_for(UserPublic, "POST", f"{PREFIX}/accounts", json=data.model_dump())

    async def login(self, data: Credentials) -> AccessToken:
        """Exchange credentials for a token."""
        return await self.call_for(
            AccessToken, "POST", f"{PREFIX}/sessions", json=data.model_dump(), idempotent=True
        )

    async def get_user(self, user_id: str) -> UserPublic:
        """One account by id."""
        return await self.call_for(UserPublic, "GET", f"{PREFIX}/accounts/{user_id}")

    async def get_by_handle(self, handle: str) -> UserPublic:
        """One account by handle."""
        return await self.call_for(UserPublic, "GET", f"{PREFIX}/handles/{handle}")

    async def update_profile(self, identity: Identity, data: ProfileUpdate) -> UserPublic:
        """Change the caller's profile."""
        return await self.call_for(
            UserPublic, "PATCH", f"{PREFIX}/me", json=data.model_dump(exclude_none=True), token=identity.token
        )

    async def follow(self, identity: Identity, handle: str) -> None:
        """Follow an account."""
        await self.call("PUT", f"{PREFIX}/me/following/{handle}", token=identity.token)

    async def unfollow(self, identity: Identity, handle: str) -> None:
        """Stop following an account."""
        await self.call("DELETE", f"{PREFIX}/me/following/{handle}", token=identity.token)

    async def followers(self, handle: str, page: PageRequest) -> Page[UserPublic]:
        """Who follows `handle`."""
        return await self._user_page(f"{PREFIX}/handles/{handle}/followers", page)

    async def following(self, handle: str, page: PageRequest) -> Page[UserPublic]:
        """Whom `handle` follows."""
        return await self._user_page(f"{PREFIX}/handles/{handle}/following", page)

    async def jwks(self) -> dict[str, Any]:
        """The token-verification keys."""
        body: dict[str, Any] = await self.call("GET", f"{PREFIX}/jwks")
        return body

    async def _user_page(self, path: str, page: PageRequest) -> Page[UserPublic]:
        return await self.call_for(Page[UserPublic], "GET", path, params=page.model_dump(exclude_none=True))
