"""Bad input of every kind gets a 4xx in the API.md error shape, never a 500 or a partial write."""

import base64
import sqlite3
import time
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.e2e.client import Api, Reply
from tests.e2e.conftest import System
from threadline.platform.settings import DEFAULT_SECRET_KEY

LONG = "x" * 501


def assert_error(reply: Reply, status: int, code: str | None = None) -> None:
    """The reply is `status` with an API.md error body (and `code`, when given)."""
    assert reply.status == status, reply
    assert isinstance(reply.body, dict), reply
    assert set(reply.body) == {"error"}, reply
    assert isinstance(reply.body["error"]["code"], str), reply
    assert isinstance(reply.body["error"]["message"], str), reply
    assert reply.body["error"]["message"], reply
    if code is not None:
        assert reply.body["error"]["code"] == code, reply


INVALID_REQUESTS: list[tuple[str, str, Any]] = [
    ("POST", "/api/v1/users", {}),
    ("POST", "/api/v1/users", []),
    ("POST", "/api/v1/users", "just a string"),
    ("POST", "/api/v1/users", {"handle": 12345, "password": "a good password"}),
    ("POST", "/api/v1/users", {"handle": "UPPER", "password": "a good password"}),
    ("POST", "/api/v1/users", {"handle": "ab", "password": "a good password"}),
    ("POST", "/api/v1/users", {"handle": "a" * 31, "password": "a good password"}),
    ("POST", "/api/v1/users", {"handle": "bad-handle!", "password": "a good password"}),
    ("POST", "/api/v1/users", {"handle": "fine_handle", "password": "short"}),
    ("POST", "/api/v1/users", {"handle": "fine_handle", "password": "p" * 129}),
    (
        "POST",
        "/api/v1/users",
        {"handle": "fine_handle", "password": "a good password", "display_name": "d" * 51},
    ),
    ("POST", "/api/v1/users", {"handle": "fine_handle", "password": "a good password", "admin": True}),
    ("POST", "/api/v1/sessions", {}),
    ("POST", "/api/v1/sessions", {"handle": 1, "password": 2}),
    ("GET", "/api/v1/users/someone/posts?limit=0", None),
    ("GET", "/api/v1/users/someone/posts?limit=101", None),
    ("GET", "/api/v1/users/someone/followers?limit=many", None),
]


@pytest.mark.parametrize(("method", "path", "body"), INVALID_REQUESTS)
async def test_invalid_public_input_is_422(api: Api, method: str, path: str, body: Any) -> None:
    """Wrong types, missing fields, bad handles and out-of-range values are 422 invalid_request."""
    assert_error(await api.call(method, path, json=body), 422, "invalid_request")


async def test_an_author_page_refuses_a_bad_page_or_token_alike_before_and_after_its_handle_is_known(
    api: Api,
) -> None:
    """422 for a bad page, 401 for a bad token, whether the gateway answers or forwards the page."""
    author, _ = await api.sign_up("paged")
    path = f"/api/v1/users/{author['handle']}/posts"
    for _ in range(2):  # the first read that succeeds teaches the gateway the handle
        for query in ("?limit=0", "?limit=101", "?limit=many", "?cursor=" + "c" * 65):
            assert_error(await api.call("GET", path + query), 422, "invalid_request")
        assert_error(await api.call("GET", path, headers={"Authorization": "Bearer not.a.token"}), 401)
        assert (await api.call("GET", path)).body == {"items": [], "next_cursor": None, "degraded": []}


async def test_invalid_registration_writes_nothing(api: Api) -> None:
    """A refused registration leaves no account behind."""
    reply = await api.call("POST", "/api/v1/users", json={"handle": "never_made", "password": "short"})
    assert_error(reply, 422, "invalid_request")
    assert {f["field"] for f in reply.body["error"]["fields"]} == {"password"}
    assert_error(await api.call("GET", "/api/v1/users/never_made"), 404)


async def test_malformed_and_empty_bodies(api: Api) -> None:
    """Malformed JSON and an empty body are 422, whatever content type was declared."""
    for data, content_type in (
        (b"{bad json", "application/json"),
        (b"", "application/json"),
        (b"handle=x", "application/x-www-form-urlencoded"),
    ):
        reply = await api.call("POST", "/api/v1/users", data=data, headers={"Content-Type": content_type})
        assert_error(reply, 422, "invalid_request")


async def test_oversized_body_is_413(api: Api) -> None:
    """A body over the limit is refused before it is read."""
    reply = await api.call("POST", "/api/v1/posts", data=b'{"text": "' + b"a" * 200_000 + b'"}')
    assert_error(reply, 413, "payload_too_large")


async def test_unknown_route_and_wrong_method(api: Api) -> None:
    """An unknown route is 404 and a wrong method 405, both in the error shape."""
    assert_error(await api.call("GET", "/api/v1/no-such-thing"), 404, "not_found")
    assert_error(await api.call("GET", "/nowhere"), 404, "not_found")
    assert_error(await api.call("PUT", "/api/v1/users"), 405, "method_not_allowed")
    assert_error(await api.call("DELETE", "/api/v1/sessions"), 405, "method_not_allowed")


async def test_post_and_profile_rules(api: Api) -> None:
    """Over-long or empty text, bad audience, bad types and over-long bios are 422; nothing is written."""
    author, token = await api.sign_up("rules")
    for body in (
        {"text": ""},
        {"text": LONG},
        {"text": 5},
        {},
        {"text": "ok", "audience": "friends"},
        {"text": "ok", "reply_to": 123},
    ):
        assert_error(await api.call("POST", "/api/v1/posts", json=body, token=token), 422, "invalid_request")
    page = await api.call("GET", f"/api/v1/users/{author['handle']}/posts")
    assert page.body["items"] == []
    for body in ({"bio": "b" * 301}, {"display_name": ""}, {"display_name": 7}):
        assert_error(await api.call("PATCH", "/api/v1/me", json=body, token=token), 422, "invalid_request")
    me = await api.call("GET", "/api/v1/me", token=token)
    assert (me.body["bio"], me.body["display_name"]) == ("", author["display_name"])
    assert_error(
        await api.call("PUT", f"/api/v1/me/following/{author['handle']}", token=token), 422, "invalid_request"
    )


async def test_unknown_ids_are_404(api: Api) -> None:
    """Unknown posts and users are 404 on every route that names them."""
    _, token = await api.sign_up("seeker")
    missing_post = "01a20000-0000-7000-8000-000000000000"
    for method, path in (
        ("GET", f"/api/v1/posts/{missing_post}"),
        ("DELETE", f"/api/v1/posts/{missing_post}"),
        ("PUT", f"/api/v1/posts/{missing_post}/like"),
        ("DELETE", f"/api/v1/posts/{missing_post}/like"),
        ("GET", "/api/v1/users/nobody_here"),
        ("GET", "/api/v1/users/nobody_here/posts"),
        ("GET", "/api/v1/users/nobody_here/followers"),
        ("GET", "/api/v1/users/nobody_here/following"),
        ("PUT", "/api/v1/me/following/nobody_here"),
        ("DELETE", "/api/v1/me/following/nobody_here"),
    ):
        assert_error(await api.call(method, path, token=token), 404)
    reply = await api.call("POST", "/api/v1/posts", json={"text": "x", "reply_to": missing_post}, token=token)
    assert_error(reply, 404)


async def test_wrong_credentials_are_401(api: Api) -> None:
    """A wrong password is 401 invalid_credentials."""
    author, _ = await api.sign_up("locked_out")
    reply = await api.call(
        "POST", "/api/v1/sessions", json={"handle": author["handle"], "password": "wrong one"}
    )
    assert_error(reply, 401, "invalid_credentials")


def _signing_key(system: System) -> tuple[str, Ed25519PrivateKey]:
    with sqlite3.connect(system.data_dir / "users.db") as db:
        kid, pem = db.execute("SELECT kid, private_key FROM signing_keys").fetchone()
    key = serialization.load_pem_private_key(pem, password=DEFAULT_SECRET_KEY.encode())
    assert isinstance(key, Ed25519PrivateKey)
    return kid, key


def _claims(user: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "threadline",
        "aud": "threadline",
        "sub": user["id"],
        "handle": user["handle"],
        "iat": now,
        "exp": now + 600,
    }
    return {**claims, **overrides}


async def test_bad_tokens_are_401(system: System, api: Api) -> None:
    """Absent, malformed, tampered, expired and foreign tokens are all 401 on protected routes."""
    user, token = await api.sign_up("tokens")
    other, _ = await api.sign_up("victim")
    kid, key = _signing_key(system)
    assert (
        await api.call("GET", "/api/v1/me", token=jwt.encode(_claims(user), key, "EdDSA", {"kid": kid}))
    ).status == 200

    header, payload, signature = token.split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = other["id"]
    forged_payload = base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=").decode()
    tampered = f"{header}.{forged_payload}.{signature}"
    expired = jwt.encode(
        _claims(user, iat=int(time.time()) - 7200, exp=int(time.time()) - 3600), key, "EdDSA", {"kid": kid}
    )
    foreign = jwt.encode(_claims(user), Ed25519PrivateKey.generate(), "EdDSA", {"kid": kid})
    unknown_kid = jwt.encode(_claims(user), Ed25519PrivateKey.generate(), "EdDSA", {"kid": "not-a-key"})
    symmetric = jwt.encode(_claims(user), "a shared secret of at least 32 bytes!!", "HS256", {"kid": kid})

    cases = {
        "absent": {},
        "garbage": {"Authorization": "Bearer not.a.token"},
        "no scheme": {"Authorization": token},
        "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
        "tampered": {"Authorization": f"Bearer {tampered}"},
        "expired": {"Authorization": f"Bearer {expired}"},
        "foreign": {"Authorization": f"Bearer {foreign}"},
        "unknown key": {"Authorization": f"Bearer {unknown_kid}"},
        "hs256": {"Authorization": f"Bearer {symmetric}"},
    }
    for name, headers in cases.items():
        for method, path, body in (
            ("GET", "/api/v1/me", None),
            ("POST", "/api/v1/posts", {"text": f"as {name}"}),
            ("PATCH", "/api/v1/me", {"bio": name}),
        ):
            reply = await api.call(method, path, json=body, headers=headers)
            assert_error(reply, 401)
    assert (await api.call("GET", f"/api/v1/users/{other['handle']}/posts")).body["items"] == []
    assert (await api.call("GET", f"/api/v1/users/{user['handle']}/posts")).body["items"] == []
    expired_reply = await api.call("GET", "/api/v1/me", headers={"Authorization": f"Bearer {expired}"})
    assert expired_reply.error_code == "token_expired"
