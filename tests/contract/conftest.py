"""Each service's Protocol through both adapters: the same test body runs local and over HTTP."""

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from tests.support.servers import serving
from threadline.bootstrap import Process, build_process, running
from threadline.platform.http_pool import HttpSession
from threadline.platform.settings import Settings
from threadline.platform.tokens import Identity, TokenVerifier
from threadline.services.posts.api import PostsApi
from threadline.services.posts.http import PostsClient
from threadline.services.users.api import Credentials, UserCreate, UserPublic, UsersApi
from threadline.services.users.http import UsersClient


@dataclass
class Adapters:
    """The services as one caller reaches them, through one kind of adapter."""

    kind: str
    users: UsersApi
    posts: PostsApi

    async def account(self, handle: str, display_name: str | None = None) -> tuple[UserPublic, Identity]:
        """Register `handle`, log in, and return the account with its verified identity."""
        user = await self.users.register(
            UserCreate(handle=handle, password="correct horse", display_name=display_name)
        )
        token = await self.users.login(Credentials(handle=handle, password="correct horse"))
        identity = await TokenVerifier(self.users.jwks).verify(token.access_token)
        return user, identity


@pytest.fixture
async def process(monolith_settings: Settings) -> AsyncIterator[Process]:
    """users, posts and payments in one process on fresh databases (SQLite, PostgreSQL), events in-process."""
    async with running(build_process(("users", "posts", "payments"), monolith_settings)) as started:
        yield started


@pytest.fixture(params=["local", "http"])
async def adapters(request: pytest.FixtureRequest, process: Process) -> AsyncIterator[Adapters]:
    """The local adapters (application objects), or the HTTP clients against a real socket."""
    if request.param == "local":
        yield Adapters("local", process.components["users"].service, process.components["posts"].service)
        return
    session = HttpSession()
    async with serving(process.app) as url:
        yield Adapters("http", UsersClient("users", url, session), PostsClient("posts", url, session))
    await session.close()
