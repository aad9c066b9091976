"""With payments stopped, posting, reading, feed and threads keep working; subscriber posts lock."""

import signal
import uuid
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.e2e.client import Api
from tests.e2e.conftest import System, assert_ledger_balanced, start_system
from tests.e2e.test_bad_input import assert_error
from tests.support.polling import eventually


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """A microservices system of this module's own, since its test stops payments."""
    yield from start_system("microservices", tmp_path_factory.mktemp("payments_down"))


@pytest.fixture
async def api(system: System) -> AsyncIterator[Api]:
    """A client of the gateway."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield Api(system.url, session)
    assert_ledger_balanced(system.data_dir)


async def test_payments_down_degrades_only_subscriber_posts(system: System, api: Api) -> None:
    """Subscriber posts read as locked and degraded; everything public works; payments routes are 503."""
    creator, creator_token = await api.sign_up("creator")
    fan, fan_token = await api.sign_up("fan")
    await api.call("PUT", "/api/v1/me/subscription-price", json={"price_cents": 300}, token=creator_token)
    await api.call("PUT", f"/api/v1/me/following/{creator['handle']}", token=fan_token)
    secret = await api.call(
        "POST", "/api/v1/posts", json={"text": "members", "audience": "subscribers"}, token=creator_token
    )
    subscribed = await api.call(
        "POST",
        "/api/v1/subscriptions",
        json={"creator": creator["handle"], "payment_method": "pm_card_ok"},
        token=fan_token,
        headers={"Idempotency-Key": uuid.uuid4().hex},
    )
    assert subscribed.status == 201
    assert (await api.call("GET", f"/api/v1/posts/{secret.body['id']}", token=fan_token)).body[
        "text"
    ] == "members"

    payments = next(p for p in system.runner.processes if p.spec.name == "payments")
    payments.popen.send_signal(signal.SIGTERM)
    payments.popen.wait(timeout=30)

    public = await api.call("POST", "/api/v1/posts", json={"text": "still posting"}, token=creator_token)
    assert public.status == 201
    reply = await api.call(
        "POST",
        "/api/v1/posts",
        json={"text": "still replying", "reply_to": public.body["id"]},
        token=fan_token,
    )
    assert reply.status == 201

    locked = await api.call("GET", f"/api/v1/posts/{secret.body['id']}", token=fan_token)
    assert locked.status == 200
    assert (locked.body["locked"], locked.body["text"], locked.body["degraded"]) == (True, None, ["payments"])
    own = await api.call("GET", f"/api/v1/posts/{secret.body['id']}", token=creator_token)
    assert (own.body["text"], own.body["degraded"]) == ("members", [])

    async def feed_works() -> None:
        feed = await api.call("GET", "/api/v1/feed", token=fan_token)
        assert feed.status == 200
        by_id = {p["id"]: p for p in feed.body["items"]}
        assert public.body["id"] in by_id
        assert by_id[secret.body["id"]]["locked"] is True
        assert by_id[secret.body["id"]]["text"] is None
        assert "payments" in feed.body["degraded"]

    await eventually(feed_works)

    async def thread_works() -> None:
        thread = await api.call("GET", f"/api/v1/threads/{public.body['id']}", token=fan_token)
        assert thread.status == 200
        assert [r["id"] for r in thread.body["replies"]] == [reply.body["id"]]

    await eventually(thread_works)

    balance = await api.call("GET", "/api/v1/me/balance", token=fan_token)
    assert_error(balance, 503, "service_unavailable")
    assert "payments" in balance.body["error"]["message"]
    status = await api.call("GET", "/api/v1/status")
    assert status.body["services"]["payments"]["status"] == "down"
    assert fan["id"] != creator["id"]
