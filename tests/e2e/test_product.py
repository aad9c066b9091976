"""The whole product through the gateway in every topology: feed, threads, payments."""

import asyncio
import uuid
from typing import Any

from tests.e2e.client import Api
from tests.e2e.conftest import System
from tests.e2e.test_bad_input import assert_error
from tests.support.polling import eventually


def _key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


async def _balance(api: Api, token: str) -> tuple[int, int]:
    reply = await api.call("GET", "/api/v1/me/balance", token=token)
    assert reply.status == 200, reply
    return reply.body["earned_cents"], reply.body["spent_cents"]


async def test_status_lists_every_service(system: System, api: Api) -> None:
    """/api/v1/status names the topology and shows all five services up."""
    status = await api.call("GET", "/api/v1/status")
    assert status.body["topology"] == system.runner.topology.name
    assert set(status.body["services"]) == {"users", "posts", "threads", "feed", "payments"}
    assert all(s["status"] == "up" for s in status.body["services"].values())


async def test_posts_reach_feeds_and_threads(api: Api) -> None:
    """A post shows in the author's and followers' feeds and in its thread, in depth-first order."""
    author, author_token = await api.sign_up("author")
    fan, fan_token = await api.sign_up("fan")
    stranger, stranger_token = await api.sign_up("stranger")
    assert (await api.call("PUT", f"/api/v1/me/following/{author['handle']}", token=fan_token)).status == 204
    root = (await api.call("POST", "/api/v1/posts", json={"text": "root"}, token=author_token)).body
    first = (
        await api.call("POST", "/api/v1/posts", json={"text": "a", "reply_to": root["id"]}, token=fan_token)
    ).body
    deep = (
        await api.call(
            "POST", "/api/v1/posts", json={"text": "a.1", "reply_to": first["id"]}, token=author_token
        )
    ).body
    second = (
        await api.call(
            "POST", "/api/v1/posts", json={"text": "b", "reply_to": root["id"]}, token=stranger_token
        )
    ).body

    async def in_feeds() -> None:
        for token in (author_token, fan_token):
            feed = await api.call("GET", "/api/v1/feed", token=token)
            assert feed.status == 200, feed
            assert root["id"] in [p["id"] for p in feed.body["items"]]
            assert feed.body["degraded"] == []
        strangers = await api.call("GET", "/api/v1/feed", token=stranger_token)
        assert root["id"] not in [p["id"] for p in strangers.body["items"]]

    await eventually(in_feeds)

    async def in_thread() -> None:
        thread = await api.call("GET", f"/api/v1/threads/{deep['id']}")
        assert thread.status == 200, thread
        assert thread.body["root"]["id"] == root["id"]
        assert [(r["id"], r["depth"]) for r in thread.body["replies"]] == [
            (first["id"], 1),
            (deep["id"], 2),
            (second["id"], 1),
        ]
        assert thread.body["degraded"] == []

    await eventually(in_thread)

    assert (await api.call("DELETE", f"/api/v1/posts/{first['id']}", token=fan_token)).status == 204

    async def gone_from_thread() -> None:
        thread = await api.call("GET", f"/api/v1/threads/{root['id']}")
        assert first["id"] not in [r["id"] for r in thread.body["replies"]]

    await eventually(gone_from_thread)
    assert stranger["id"] != fan["id"]


async def test_follow_backfills_and_unfollow_removes(api: Api) -> None:
    """Following back-fills the followee's recent posts; unfollowing takes them out of the feed."""
    writer, writer_token = await api.sign_up("writer")
    _, reader_token = await api.sign_up("reader")
    earlier = (await api.call("POST", "/api/v1/posts", json={"text": "earlier"}, token=writer_token)).body
    assert (
        await api.call("PUT", f"/api/v1/me/following/{writer['handle']}", token=reader_token)
    ).status == 204

    async def backfilled() -> None:
        feed = await api.call("GET", "/api/v1/feed", token=reader_token)
        assert earlier["id"] in [p["id"] for p in feed.body["items"]]

    await eventually(backfilled)
    assert (
        await api.call("DELETE", f"/api/v1/me/following/{writer['handle']}", token=reader_token)
    ).status == 204

    async def removed() -> None:
        feed = await api.call("GET", "/api/v1/feed", token=reader_token)
        assert earlier["id"] not in [p["id"] for p in feed.body["items"]]

    await eventually(removed)


async def _creator_with_locked_post(api: Api, price: int = 500) -> tuple[dict[str, Any], str, dict[str, Any]]:
    creator, token = await api.sign_up("creator")
    priced = await api.call("PUT", "/api/v1/me/subscription-price", json={"price_cents": price}, token=token)
    assert (priced.status, priced.body) == (200, {"price_cents": price})
    post = await api.call(
        "POST", "/api/v1/posts", json={"text": "for subscribers", "audience": "subscribers"}, token=token
    )
    assert post.status == 201
    return creator, token, post.body


async def test_subscription_unlocks_and_moves_money_once(api: Api) -> None:
    """Declined moves nothing; a paid subscription unlocks at once; a replay returns the same body."""
    creator, creator_token, post = await _creator_with_locked_post(api)
    fan, fan_token = await api.sign_up("subscriber")
    locked = await api.call("GET", f"/api/v1/posts/{post['id']}", token=fan_token)
    assert (locked.body["locked"], locked.body["text"]) == (True, None)

    declined = await api.call(
        "POST",
        "/api/v1/subscriptions",
        json={"creator": creator["handle"], "payment_method": "pm_card_declined"},
        token=fan_token,
        headers=_key(),
    )
    assert_error(declined, 402, "card_declined")
    assert await _balance(api, fan_token) == (0, 0)
    still = await api.call("GET", f"/api/v1/posts/{post['id']}", token=fan_token)
    assert still.body["locked"] is True

    key = _key()
    body = {"creator": creator["handle"], "payment_method": "pm_card_ok"}
    first = await api.call("POST", "/api/v1/subscriptions", json=body, token=fan_token, headers=key)
    assert first.status == 201, first
    assert (
        first.body["creator"],
        first.body["subscriber"],
        first.body["status"],
        first.body["price_cents"],
    ) == (
        creator["handle"],
        fan["handle"],
        "active",
        500,
    )
    unlocked = await api.call("GET", f"/api/v1/posts/{post['id']}", token=fan_token)
    assert (unlocked.body["locked"], unlocked.body["text"]) == (False, "for subscribers")

    replay = await api.call("POST", "/api/v1/subscriptions", json=body, token=fan_token, headers=key)
    assert (replay.status, replay.body) == (201, first.body)
    reused = await api.call(
        "POST",
        "/api/v1/subscriptions",
        json={**body, "payment_method": "pm_card_slow"},
        token=fan_token,
        headers=key,
    )
    assert_error(reused, 409, "idempotency_key_reused")
    again = await api.call("POST", "/api/v1/subscriptions", json=body, token=fan_token, headers=_key())
    assert_error(again, 409, "already_subscribed")
    assert await _balance(api, fan_token) == (0, 500)
    assert await _balance(api, creator_token) == (500, 0)

    mine = await api.call("GET", "/api/v1/me/subscriptions", token=fan_token)
    assert [s["id"] for s in mine.body["items"]] == [first.body["id"]]
    canceled = await api.call("DELETE", f"/api/v1/subscriptions/{first.body['id']}", token=fan_token)
    assert (canceled.status, canceled.body["status"]) == (200, "canceled")
    relocked = await api.call("GET", f"/api/v1/posts/{post['id']}", token=fan_token)
    assert relocked.body["locked"] is True


async def test_subscription_rules(api: Api) -> None:
    """No price, oneself, a missing key and a bad price are refused with clear 4xx answers."""
    creator, creator_token = await api.sign_up("no_price")
    _, fan_token = await api.sign_up("fan")
    body = {"creator": creator["handle"], "payment_method": "pm_card_ok"}
    assert_error(
        await api.call("POST", "/api/v1/subscriptions", json=body, token=fan_token, headers=_key()), 422
    )
    assert_error(
        await api.call("POST", "/api/v1/subscriptions", json=body, token=creator_token, headers=_key()), 422
    )
    assert_error(
        await api.call("POST", "/api/v1/subscriptions", json=body, token=fan_token), 422, "invalid_request"
    )
    for price in (50, 100_001, -1, "100"):
        reply = await api.call(
            "PUT", "/api/v1/me/subscription-price", json={"price_cents": price}, token=fan_token
        )
        assert_error(reply, 422, "invalid_request")
    unknown = {"creator": "nobody_at_all", "payment_method": "pm_card_ok"}
    assert_error(
        await api.call("POST", "/api/v1/subscriptions", json=unknown, token=fan_token, headers=_key()), 404
    )


async def test_concurrent_identical_tips_charge_once(api: Api) -> None:
    """Twenty concurrent tips with one key charge once and all answer the same body."""
    creator, creator_token = await api.sign_up("tipped")
    _, fan_token = await api.sign_up("tipper")
    key = _key()
    body = {"to": creator["handle"], "amount_cents": 250, "payment_method": "pm_card_ok"}
    replies = await asyncio.gather(
        *(api.call("POST", "/api/v1/tips", json=body, token=fan_token, headers=key) for _ in range(20))
    )
    assert {r.status for r in replies} == {201}
    assert len({str(r.body) for r in replies}) == 1
    assert replies[0].body["amount_cents"] == 250
    assert replies[0].body["to"] == creator["handle"]
    assert replies[0].body["status"] == "succeeded"
    assert await _balance(api, creator_token) == (250, 0)
    assert await _balance(api, fan_token) == (0, 250)
    declined = {**body, "payment_method": "pm_card_declined"}
    assert_error(await api.call("POST", "/api/v1/tips", json=declined, token=fan_token, headers=_key()), 402)
    for amount in (99, 100_001):
        bad = {**body, "amount_cents": amount}
        assert_error(await api.call("POST", "/api/v1/tips", json=bad, token=fan_token, headers=_key()), 422)
    assert await _balance(api, fan_token) == (0, 250)
