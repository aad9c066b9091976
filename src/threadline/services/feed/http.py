"""The feed service over HTTP: its internal route, and the client adapter for other processes."""

from fastapi import APIRouter

from threadline.platform.callers import Caller
from threadline.platform.http_client import ServiceClient
from threadline.platform.pagination import PageRequest, Paging
from threadline.platform.tokens import Identity
from threadline.services.feed.api import SERVICE, FeedApi, FeedPage

__all__ = ["FeedClient", "build_router"]

PREFIX = f"/{SERVICE}"


def build_router(service: FeedApi) -> APIRouter:
    """Internal routes, one per FeedApi operation."""
    router = APIRouter(prefix=PREFIX)

    @router.get("/home")
    async def home(identity: Caller, page: Paging) -> FeedPage:
        return await service.home(identity, page)

    return router


class FeedClient(ServiceClient):
    """FeedApi for callers in another process."""

    async def home(self, identity: Identity, page: PageRequest) -> FeedPage:
        """The caller's home timeline, newest first."""
        return await self.call_for(
            FeedPage, "GET", f"{PREFIX}/home", params=page.model_dump(exclude_none=True), token=identity.token
        )
