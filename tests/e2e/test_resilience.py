"""With the users service killed, everything that does not need it keeps working."""

import signal
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.e2e.client import Api
from tests.e2e.conftest import System, start_system
from tests.e2e.test_bad_input import assert_error


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """A microservices system of this module's own, since its tests kill a service."""
    yield from start_system("microservices", tmp_path_factory.mktemp("resilience"))


@pytest.fixture
async def api(system: System) -> AsyncIterator[Api]:
    """A client of the gateway."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield Api(system.url, session)


async def test_users_down_leaves_posting_and_reading_working(system: System, api: Api) -> None:
    """Tokens verify from cached keys; posts and known authors' pages work; users' own routes are 503."""
    alice, token = await api.sign_up("alice")
    first = await api.call("POST", "/api/v1/posts", json={"text": "while all is well"}, token=token)
    assert first.status == 201
    assert (await api.call("GET", f"/api/v1/users/{alice['handle']}/posts")).status == 200
    # The gateway checks tokens itself only on the routes it does not forward: this one, while
    # users is up, proves it holds the signing keys.
    assert (await api.call("GET", "/api/v1/me", token=token)).status == 200

    users = next(p for p in system.runner.processes if p.spec.name == "users")
    users.popen.send_signal(signal.SIGKILL)
    users.popen.wait(timeout=30)

    second = await api.call("POST", "/api/v1/posts", json={"text": "users is down"}, token=token)
    assert second.status == 201, second
    assert second.body["author"]["handle"] == alice["handle"]
    reply = await api.call(
        "POST", "/api/v1/posts", json={"text": "still replying", "reply_to": first.body["id"]}, token=token
    )
    assert reply.status == 201, reply
    read = await api.call("GET", f"/api/v1/posts/{first.body['id']}", token=token)
    assert (read.status, read.body["reply_count"]) == (200, 1)
    assert (await api.call("PUT", f"/api/v1/posts/{first.body['id']}/like", token=token)).status == 204
    page = await api.call("GET", f"/api/v1/users/{alice['handle']}/posts")
    assert page.status == 200, page
    assert {post["id"] for post in page.body["items"]} >= {first.body["id"], second.body["id"]}

    for method, path, body in (
        ("GET", "/api/v1/me", None),
        ("GET", f"/api/v1/users/{alice['handle']}", None),
        ("GET", "/api/v1/users/never_looked_up/posts", None),
        ("POST", "/api/v1/sessions", {"handle": alice["handle"], "password": "a good password"}),
    ):
        reply = await api.call(method, path, json=body, token=token)
        assert_error(reply, 503, "service_unavailable")
        assert "users" in reply.body["error"]["message"]

    status = await api.call("GET", "/api/v1/status")
    assert status.status == 200
    assert status.body["services"]["users"]["status"] == "down"
    assert status.body["services"]["posts"]["status"] == "up"
