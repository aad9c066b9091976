"""The posts service over HTTP: its internal routes, and the client adapter for other processes."""

from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from threadline.platform.callers import Caller, Viewer
from threadline.platform.http_client import ServiceClient
from threadline.platform.http_pool import HttpSession
from threadline.platform.kept_json import ItemsByJson
from threadline.platform.pagination import PageRequest, Paging
from threadline.platform.tokens import Identity
from threadline.services.posts.api import (
    MAX_BATCH,
    SERVICE,
    PostAnswer,
    PostCreate,
    PostPage,
    PostPublic,
    PostRead,
    PostsApi,
    PostsRead,
)

__all__ = ["PostsClient", "build_router"]

PREFIX = f"/{SERVICE}"
# Posts a caller keeps parsed, by their JSON: a feed reads twenty a page, most of them read before.
# About 2 KB each with the JSON kept for them.
SEEN_POSTS = 10_000


class PostBatch(BaseModel):
    """The ids of a batch read."""

    ids: list[str] = Field(max_length=MAX_BATCH)


def build_router(service: PostsApi) -> APIRouter:
    """Internal routes, one per PostsApi operation."""
    router = APIRouter(prefix=PREFIX)

    @router.post("/posts", status_code=201)
    async def create_post(identity: Caller, data: PostCreate) -> PostPublic:
        return await service.create_post(identity, data)

    @router.post("/posts/batch")
    async def get_posts(viewer: Viewer, batch: PostBatch) -> PostsRead:
        return await service.get_posts(batch.ids, viewer)

    @router.get("/posts/{post_id}")
    async def get_post(viewer: Viewer, post_id: str) -> PostAnswer:
        return PostAnswer.of(await service.get_post(post_id, viewer))

    @router.delete("/posts/{post_id}", status_code=204)
    async def delete_post(identity: Caller, post_id: str) -> Response:
        await service.delete_post(identity, post_id)
        return Response(status_code=204)

    @router.put("/posts/{post_id}/like", status_code=204)
    async def like(identity: Caller, post_id: str) -> Response:
        await service.like(identity, post_id)
        return Response(status_code=204)

    @router.delete("/posts/{post_id}/like", status_code=204)
    async def unlike(identity: Caller, post_id: str) -> Response:
        await service.unlike(identity, post_id)
        return Response(status_code=204)

    @router.get("/authors/{author_id}/posts")
    async def posts_by_author(viewer: Viewer, author_id: str, page: Paging) -> PostPage:
        return await service.posts_by_author(author_id, page, viewer)

    return router


class PostsClient(ServiceClient):
    """PostsApi for callers in another process; a post seen before in the same JSON is not parsed again."""

    def __init__(self, service: str, base_url: str, session: HttpSession, **options: Any) -> None:
        super().__init__(service, base_url, session, **options)
        self._seen_posts = ItemsByJson(size=SEEN_POSTS)

    async def create_post(self, identity: Identity, data: PostCreate) -> PostPublic:
        """Publish a post or reply."""
        return await self.call_for(
            PostPublic, "POST", f"{PREFIX}/posts", json=data.model_dump(), token=identity.token
        )

    async def get_post(self, post_id: str, viewer: Identity | None) -> PostRead:
        """One post as `viewer` sees it."""
        answer = await self.call_for(PostAnswer, "GET", f"{PREFIX}/posts/{post_id}", token=_token(viewer))
        return answer.read()

    async def get_posts(self, post_ids: list[str], viewer: Identity | None) -> PostsRead:
        """Several posts in one call."""
        return await self.call_for(
            PostsRead,
            "POST",
            f"{PREFIX}/posts/batch",
            json={"ids": post_ids},
            token=_token(viewer),
            idempotent=True,
            items=self._seen_posts,
        )

    async def delete_post(self, identity: Identity, post_id: str) -> None:
        """Delete one's own post."""
        await self.call("DELETE", f"{PREFIX}/posts/{post_id}", token=identity.token)

    async def like(self, identity: Identity, post_id: str) -> None:
        """Like a post."""
        await self.call("PUT", f"{PREFIX}/posts/{post_id}/like", token=identity.token)

    async def unlike(self, identity: Identity, post_id: str) -> None:
        """Take a like back."""
        await self.call("DELETE", f"{PREFIX}/posts/{post_id}/like", token=identity.token)

    async def posts_by_author(self, author_id: str, page: PageRequest, viewer: Identity | None) -> PostPage:
        """An author's posts, newest first."""
        return await self.call_for(
            PostPage,
            "GET",
            f"{PREFIX}/authors/{author_id}/posts",
            params=page.model_dump(exclude_none=True),
            token=_token(viewer),
            items=self._seen_posts,
        )


def _token(viewer: Identity | None) -> str | None:
    return None if viewer is None else viewer.token
