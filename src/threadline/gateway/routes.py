"""The public API (API.md) over the services' Protocols, whichever adapter implements them."""

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Header, Response
from pydantic import BaseModel

from threadline.platform.callers import Caller, Viewer
from threadline.platform.forwarding import Forward, PathValues
from threadline.platform.lru import LruCache
from threadline.platform.pagination import Page, Paging
from threadline.services.feed.api import SERVICE as FEED
from threadline.services.feed.api import FeedApi, FeedPage
from threadline.services.payments.api import SERVICE as PAYMENTS
from threadline.services.payments.api import (
    Balance,
    IdempotencyKey,
    Party,
    PaymentsApi,
    PriceSet,
    SubscriptionCreate,
    SubscriptionPublic,
    TipCreate,
    TipPublic,
)
from threadline.services.posts.api import SERVICE as POSTS
from threadline.services.posts.api import PostAnswer, PostCreate, PostPage, PostPublic, PostsApi
from threadline.services.threads.api import SERVICE as THREADS
from threadline.services.threads.api import ThreadPublic, ThreadsApi
from threadline.services.users.api import SERVICE as USERS
from threadline.services.users.api import (
    AccessToken,
    Credentials,
    ProfileUpdate,
    UserCreate,
    UserPublic,
    UsersApi,
)

__all__ = [
    "FORWARDED",
    "AccountIds",
    "ServiceState",
    "ServiceStatus",
    "StatusAnswer",
    "build_router",
    "forwards",
]

FORWARDED = (
    Forward("POST", "/api/v1/users", USERS, "/users/accounts"),
    Forward("POST", "/api/v1/sessions", USERS, "/users/sessions", idempotent=True),
    Forward("GET", "/api/v1/users/{handle}", USERS, "/users/handles/{handle}"),
    Forward("GET", "/api/v1/me", USERS, "/users/me"),
    Forward("PATCH", "/api/v1/me", USERS, "/users/me"),
    Forward("PUT", "/api/v1/me/following/{handle}", USERS, "/users/me/following/{handle}"),
    Forward("DELETE", "/api/v1/me/following/{handle}", USERS, "/users/me/following/{handle}"),
    Forward("GET", "/api/v1/users/{handle}/followers", USERS, "/users/handles/{handle}/followers"),
    Forward("GET", "/api/v1/users/{handle}/following", USERS, "/users/handles/{handle}/following"),
    Forward("POST", "/api/v1/posts", POSTS, "/posts/posts"),
    Forward("GET", "/api/v1/posts/{post_id}", POSTS, "/posts/posts/{post_id}"),
    Forward("DELETE", "/api/v1/posts/{post_id}", POSTS, "/posts/posts/{post_id}"),
    Forward("PUT", "/api/v1/posts/{post_id}/like", POSTS, "/posts/posts/{post_id}/like"),
    Forward("DELETE", "/api/v1/posts/{post_id}/like", POSTS, "/posts/posts/{post_id}/like"),
    Forward("GET", "/api/v1/threads/{post_id}", THREADS, "/threads/threads/{post_id}"),
    Forward("GET", "/api/v1/feed", FEED, "/feed/home"),
    Forward("PUT", "/api/v1/me/subscription-price", PAYMENTS, "/payments/me/price"),
    Forward(
        "DELETE",
        "/api/v1/subscriptions/{subscription_id}",
        PAYMENTS,
        "/payments/subscriptions/{subscription_id}",
    ),
    Forward("GET", "/api/v1/me/subscriptions", PAYMENTS, "/payments/me/subscriptions"),
    Forward("GET", "/api/v1/me/balance", PAYMENTS, "/payments/me/balance"),
)
"""The routes whose answer is the owning service's own: forwarded as bytes when it runs elsewhere.

Each is also declared below, for the API documentation and for a service in the gateway's process.
The others need the gateway to turn a handle into an account id (subscribe, tip; author pages
too, which `forwards` adds for handles it knows).
"""


class ServiceState(BaseModel):
    """Whether one service answers, and how many replicas it runs."""

    status: str
    replicas: int


class StatusAnswer(BaseModel):
    """The answer of /api/v1/status."""

    topology: str
    services: dict[str, ServiceState]


ServiceStatus = Callable[[], Awaitable[dict[str, ServiceState]]]


IdempotencyHeader = Annotated[IdempotencyKey, Header(alias="Idempotency-Key")]


class AccountIds:
    """Account ids by handle, remembered (most recently used kept).

    A handle never changes owner (it cannot be edited and accounts are not deleted), so an entry
    never goes stale. Author pages, subscriptions and tips then skip a call to users, and keep
    working for known handles while users is down. Unknown handles are not remembered: one may
    be registered at any time.
    """

    def __init__(self, users: UsersApi, *, size: int = 100_000) -> None:
        self._users = users
        self._ids: LruCache[str, str] = LruCache(size)

    async def id_of(self, handle: str) -> str:
        """The id of the account with `handle`; raises users' not-found or unavailable errors."""
        known = self._ids.get(handle)
        if known is not None:
            return known
        account_id = (await self._users.get_by_handle(handle)).id
        self._ids.put(handle, account_id)
        return account_id

    def known(self, handle: str) -> str | None:
        """The id of the account with `handle` if it is remembered; never calls users."""
        return self._ids.get(handle)


def forwards(account_ids: AccountIds) -> tuple[Forward, ...]:
    """Every edge route that may be forwarded: FORWARDED, and author pages of known handles.

    An author page is posts' answer for the author's account id. Only a handle already
    remembered is forwarded: for any other the edge route answers, checking the caller's token
    and page before looking the handle up, so errors come in the same order in every topology.
    """

    def author_of(values: PathValues) -> PathValues | None:
        account_id = account_ids.known(values["handle"])
        return None if account_id is None else {"author_id": account_id}

    author_page = Forward(
        "GET", "/api/v1/users/{handle}/posts", POSTS, "/posts/authors/{author_id}/posts", rewrite=author_of
    )
    return (*FORWARDED, author_page)


def build_router(
    *,
    users: UsersApi,
    posts: PostsApi,
    threads: ThreadsApi,
    feed: FeedApi,
    payments: PaymentsApi,
    topology: str,
    status: ServiceStatus,
    account_ids: AccountIds,
) -> APIRouter:
    """The /api/v1 routes; `account_ids` must be the one `forwards` was given."""
    router = APIRouter(prefix="/api/v1")

    async def party(handle: str) -> Party:
        return Party(id=await account_ids.id_of(handle), handle=handle)

    @router.post("/users", status_code=201)
    async def register(data: UserCreate) -> UserPublic:
        return await users.register(data)

    @router.post("/sessions")
    async def login(data: Credentials) -> AccessToken:
        return await users.login(data)

    @router.get("/users/{handle}")
    async def get_user(handle: str) -> UserPublic:
        return await users.get_by_handle(handle)

    @router.get("/me")
    async def me(identity: Caller) -> UserPublic:
        return await users.get_user(identity.user_id)

    @router.patch("/me")
    async def update_me(identity: Caller, data: ProfileUpdate) -> UserPublic:
        return await users.update_profile(identity, data)

    @router.put("/me/following/{handle}", status_code=204)
    async def follow(identity: Caller, handle: str) -> Response:
        await users.follow(identity, handle)
        return Response(status_code=204)

    @router.delete("/me/following/{handle}", status_code=204)
    async def unfollow(identity: Caller, handle: str) -> Response:
        await users.unfollow(identity, handle)
        return Response(status_code=204)

    @router.get("/users/{handle}/followers")
    async def followers(handle: str, page: Paging) -> Page[UserPublic]:
        return await users.followers(handle, page)

    @router.get("/users/{handle}/following")
    async def following(handle: str, page: Paging) -> Page[UserPublic]:
        return await users.following(handle, page)

    @router.get("/users/{handle}/posts")
    async def posts_by_author(viewer: Viewer, handle: str, page: Paging) -> PostPage:
        return await posts.posts_by_author(await account_ids.id_of(handle), page, viewer)

    @router.post("/posts", status_code=201)
    async def create_post(identity: Caller, data: PostCreate) -> PostPublic:
        return await posts.create_post(identity, data)

    @router.get("/posts/{post_id}")
    async def get_post(viewer: Viewer, post_id: str) -> PostAnswer:
        return PostAnswer.of(await posts.get_post(post_id, viewer))

    @router.delete("/posts/{post_id}", status_code=204)
    async def delete_post(identity: Caller, post_id: str) -> Response:
        await posts.delete_post(identity, post_id)
        return Response(status_code=204)

    @router.put("/posts/{post_id}/like", status_code=204)
    async def like(identity: Caller, post_id: str) -> Response:
        await posts.like(identity, post_id)
        return Response(status_code=204)

    @router.delete("/posts/{post_id}/like", status_code=204)
    async def unlike(identity: Caller, post_id: str) -> Response:
        await posts.unlike(identity, post_id)
        return Response(status_code=204)

    @router.get("/threads/{post_id}")
    async def get_thread(viewer: Viewer, post_id: str) -> ThreadPublic:
        return await threads.get_thread(post_id, viewer)

    @router.get("/feed")
    async def home_feed(identity: Caller, page: Paging) -> FeedPage:
        return await feed.home(identity, page)

    @router.put("/me/subscription-price")
    async def set_price(identity: Caller, data: PriceSet) -> PriceSet:
        return await payments.set_price(identity, data)

    @router.post("/subscriptions", status_code=201)
    async def subscribe(
        identity: Caller, data: SubscriptionCreate, idempotency_key: IdempotencyHeader
    ) -> SubscriptionPublic:
        return await payments.subscribe(identity, await party(data.creator), data, idempotency_key)

    @router.delete("/subscriptions/{subscription_id}")
    async def cancel(identity: Caller, subscription_id: str) -> SubscriptionPublic:
        return await payments.cancel(identity, subscription_id)

    @router.get("/me/subscriptions")
    async def my_subscriptions(identity: Caller, page: Paging) -> Page[SubscriptionPublic]:
        return await payments.my_subscriptions(identity, page)

    @router.post("/tips", status_code=201)
    async def tip(identity: Caller, data: TipCreate, idempotency_key: IdempotencyHeader) -> TipPublic:
        return await payments.tip(identity, await party(data.to), data, idempotency_key)

    @router.get("/me/balance")
    async def balance(identity: Caller) -> Balance:
        return await payments.balance(identity)

    @router.get("/status")
    async def get_status() -> StatusAnswer:
        return StatusAnswer(topology=topology, services=await status())

    return router
