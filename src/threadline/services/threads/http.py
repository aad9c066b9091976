"""The threads service over HTTP: its internal route, and the client adapter for other processes."""

from fastapi import APIRouter

from threadline.platform.callers import Viewer
from threadline.platform.http_client import ServiceClient
from threadline.platform.tokens import Identity
from threadline.services.threads.api import SERVICE, ThreadPublic, ThreadsApi

__all__ = ["ThreadsClient", "build_router"]

PREFIX = f"/{SERVICE}"


def build_router(service: ThreadsApi) -> APIRouter:
    """Internal routes, one per ThreadsApi operation."""
    router = APIRouter(prefix=PREFIX)

    @router.get("/threads/{post_id}")
    async def get_thread(viewer: Viewer, post_id: str) -> ThreadPublic:
        return await service.get_thread(post_id, viewer)

    return router


class ThreadsClient(ServiceClient):
    """ThreadsApi for callers in another process."""

    async def get_thread(self, post_id: str, viewer: Identity | None) -> ThreadPublic:
        """The conversation containing `post_id`, as `viewer` sees it."""
        token = None if viewer is None else viewer.token
        return await self.call_for(ThreadPublic, "GET", f"{PREFIX}/threads/{post_id}", token=token)
