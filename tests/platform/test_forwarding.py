"""Edge routes forwarded as bytes to a service, against real sockets: a gateway, an upstream and the wire."""

import asyncio
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest
from aiohttp.typedefs import LooseHeaders
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from multidict import CIMultiDictProxy
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from yarl import URL

from tests.support.polling import eventually
from tests.support.servers import serving
from threadline.platform.forwarding import Forward, Forwarding, PathValues
from threadline.platform.http_client import ServiceClient
from threadline.platform.http_pool import HttpSession
from threadline.platform.tokens import TokenVerifier
from threadline.platform.web import create_app

SERVICE = "store"
MAX_BODY = 1024
RETRIES = 2
# The gateway's budget for one forwarded call, told to the upstream when the caller sets none.
CLIENT_TIMEOUT_SECONDS = 10.0
# Deadline for anything that should succeed: generous, so a busy machine only makes a test slower.
DEADLINE = 20.0

# Names the gateway can turn into item ids without asking anyone; others it leaves to its own route.
KNOWN_NAMES = {"widget": "item 7"}


def item_named(values: PathValues) -> PathValues | None:
    """The target's parameters for a known name; None leaves the request to the gateway's route."""
    item_id = KNOWN_NAMES.get(values["name"])
    return None if item_id is None else {"item_id": item_id}


FORWARDS = [
    Forward("GET", "/api/items/{item_id}", SERVICE, "/internal/items/{item_id}"),
    Forward("GET", "/api/named/{name}", SERVICE, "/internal/items/{item_id}", rewrite=item_named),
    Forward("DELETE", "/api/items/{item_id}", SERVICE, "/internal/items/{item_id}"),
    Forward("POST", "/api/items", SERVICE, "/internal/items"),
    Forward("GET", "/api/pairs/{first}/and/{second}", SERVICE, "/internal/pairs/{second}/{first}"),
    Forward("GET", "/api/errors/{status}", SERVICE, "/internal/errors/{status}"),
    Forward("GET", "/api/flaky", SERVICE, "/internal/flaky"),
    Forward("POST", "/api/flaky", SERVICE, "/internal/flaky"),
    Forward("POST", "/api/sessions", SERVICE, "/internal/sessions", idempotent=True),
]

UNAVAILABLE_BODY = (
    b'{"error": {"code": "service_unavailable", "message": "store is unavailable: warming up"}}'
)

# Error bodies as a service writes them, spaced and ordered so that re-encoding would change them.
ERROR_BODIES = {
    401: b'{"error": {"code": "invalid_token", "message": "the access token is malformed"}}',
    403: b'{"error":{"message":"not yours","code":"forbidden"}}',
    404: b'{"error": {"code": "not_found", "message": "no item \\u00e9 here"}}',
    409: b'{"error": {"code": "conflict", "message": "already there"}}',
    422: (
        b'{"error": {"code": "invalid_request", "message": "invalid request: text: too long",'
        b' "fields": [{"field": "text", "message": "too long"}]}}'
    ),
    500: b'{"error": {"code": "internal_error", "message": "the store broke"}}',
}


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str
    params: dict[str, str]
    query: bytes
    headers: dict[str, str]
    body: bytes


class Upstream:
    """The service behind the gateway: records what reaches it and answers in bytes of its own choosing."""

    def __init__(self) -> None:
        self.url = ""
        self.seen: list[Seen] = []
        self.calls: Counter[str] = Counter()
        self.unavailable_left = 0

    def app(self) -> FastAPI:
        app = FastAPI()

        async def record(request: Request) -> Seen:
            headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers.raw}
            assert len(headers) == len(request.headers.raw), request.headers.raw  # no name twice
            seen = Seen(
                request.method,
                request.url.path,
                dict(request.path_params),
                request.scope["query_string"],
                headers,
                await request.body(),
            )
            self.seen.append(seen)
            return seen

        @app.get("/internal/items/{item_id}")
        async def get_item(request: Request, item_id: str) -> Response:
            await record(request)
            return Response(b'{"from": "upstream",  "item_id": ' + orjson.dumps(item_id) + b', "n": 1.50}')

        @app.delete("/internal/items/{item_id}")
        async def delete_item(request: Request, item_id: str) -> Response:
            await record(request)
            return Response(status_code=204)

        @app.post("/internal/items")
        async def create_item(request: Request) -> Response:
            seen = await record(request)
            return Response(b'{"created": ' + seen.body + b"}", status_code=201)

        @app.get("/internal/pairs/{first}/{second}")
        async def pair(request: Request, first: str, second: str) -> Response:
            await record(request)
            return Response(orjson.dumps([first, second]))

        @app.get("/internal/errors/{status}")
        async def errors(request: Request, status: int) -> Response:
            await record(request)
            return Response(ERROR_BODIES[status], status_code=status, media_type="application/json")

        @app.api_route("/internal/flaky", methods=["GET", "POST"])
        async def flaky(request: Request) -> Response:
            await record(request)
            self.calls[request.method] += 1
            if self.unavailable_left > 0:
                self.unavailable_left -= 1
                return Response(UNAVAILABLE_BODY, status_code=503, media_type="application/json")
            return Response(b'{"ok": true}')

        @app.post("/internal/sessions")
        async def create_session(request: Request) -> Response:
            seen = await record(request)
            self.calls["POST /internal/sessions"] += 1
            if self.unavailable_left > 0:
                self.unavailable_left -= 1
                return Response(UNAVAILABLE_BODY, status_code=503, media_type="application/json")
            return Response(b'{"created": ' + seen.body + b"}", status_code=201)

        return app


def gateway_router(calls: list[str]) -> APIRouter:
    """The gateway's own routes, two at the paths of forwarded ones, each answering as the gateway."""
    router = APIRouter()

    @router.get("/api/items/{item_id}")
    async def get_item(item_id: str) -> dict[str, str]:
        calls.append(f"GET {item_id}")
        return {"from": "gateway", "item_id": item_id}

    @router.post("/api/items/{item_id}")
    async def post_item(item_id: str) -> dict[str, str]:
        calls.append(f"POST {item_id}")
        return {"from": "gateway", "item_id": item_id}

    @router.get("/api/named/{name}")
    async def named(name: str) -> dict[str, str]:
        calls.append(f"GET named {name}")
        return {"from": "gateway", "name": name}

    @router.get("/api/other")
    async def other() -> dict[str, str]:
        calls.append("GET other")
        return {"from": "gateway"}

    @router.post("/api/notes")
    async def post_note(note: dict[str, Any]) -> dict[str, Any]:
        calls.append("POST note")
        return {"from": "gateway", "note": note}

    return router


class ReceiveLog:
    """ASGI middleware: records path, type and `more_body` of every message the app below receives."""

    def __init__(self, app: ASGIApp, *, log: list[tuple[str, str, bool]]) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def logged_receive() -> Message:
            message = await receive()
            self.log.append((scope["path"], message["type"], bool(message.get("more_body", False))))
            return message

        await self.app(scope, logged_receive, send)


async def jwks_never_needed() -> dict[str, Any]:
    raise AssertionError("no request in these tests makes the gateway verify a token")


@dataclass
class Reply:
    """One answer of the gateway, its body as raw bytes."""

    status: int
    body: bytes
    headers: CIMultiDictProxy[str]

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Gateway:
    """A served gateway forwarding to one upstream, with what its own routes were asked."""

    url: str
    http: aiohttp.ClientSession
    own_calls: list[str] = field(default_factory=list)

    async def call(
        self,
        method: str,
        path: str,
        *,
        data: Any = None,
        json: Any = None,
        headers: LooseHeaders | None = None,
    ) -> Reply:
        """Send `path` exactly as written (already encoded) and read the whole answer."""
        url = URL(self.url + path, encoded=True)
        async with self.http.request(
            method, url, data=data, json=json, headers=headers, allow_redirects=False
        ) as response:
            return Reply(response.status, await response.read(), response.headers)

    async def metrics(self) -> dict[tuple[str, str, int], int]:
        """The gateway's request counts by method, route and status."""
        reply = await self.call("GET", "/metrics")
        assert reply.status == 200, reply
        return {
            (method, route, int(status)): int(count)
            for method, route, status, count in re.findall(
                r'^http_requests_total\{method="(\w+)",route="([^"]+)",status="(\d+)"\} (\d+)$',
                reply.body.decode(),
                re.M,
            )
        }


@asynccontextmanager
async def running_gateway(upstream_url: str, *, outer: Sequence[Middleware] = ()) -> AsyncIterator[Gateway]:
    """Serve a gateway forwarding to `upstream_url`, `outer` around its Forwarding; stop it afterwards."""
    session = HttpSession()
    own_calls: list[str] = []
    client = ServiceClient(
        SERVICE, upstream_url, session, timeout_seconds=CLIENT_TIMEOUT_SECONDS, retries=RETRIES
    )
    app = create_app(
        title="gateway under test",
        routers=[gateway_router(own_calls)],
        readiness={},
        token_verifier=TokenVerifier(jwks_never_needed),
        max_body_bytes=MAX_BODY,
        middleware=[*outer, Middleware(Forwarding, forwards=FORWARDS, clients={SERVICE: client})],
    )
    try:
        async with serving(app) as url, aiohttp.ClientSession() as http:
            yield Gateway(url, http, own_calls)
    finally:
        await session.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    upstream = Upstream()
    async with serving(upstream.app()) as url:
        upstream.url = url
        yield upstream


@pytest.fixture
async def gateway(upstream: Upstream) -> AsyncIterator[Gateway]:
    async with running_gateway(upstream.url) as gateway:
        yield gateway


def error_of(reply: Reply) -> dict[str, Any]:
    """The `error` object of an API.md error body, checked for the shape."""
    assert reply.headers["Content-Type"] == "application/json", reply
    body = reply.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    return error


# --- answers -----------------------------------------------------------------------------------------


async def test_a_matching_get_is_answered_by_the_upstream_byte_for_byte(
    upstream: Upstream, gateway: Gateway
) -> None:
    """GET on a forwarded path returns the upstream's 200 and bytes; the gateway's route there is not run."""
    reply = await gateway.call("GET", "/api/items/abc")
    assert reply.status == 200
    assert reply.body == b'{"from": "upstream",  "item_id": "abc", "n": 1.50}'
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.headers["Content-Length"] == str(len(reply.body))
    assert [(seen.method, seen.path) for seen in upstream.seen] == [("GET", "/internal/items/abc")]
    assert gateway.own_calls == []


async def test_a_matching_post_gets_the_upstreams_201_byte_for_byte(
    upstream: Upstream, gateway: Gateway
) -> None:
    """POST on a forwarded path returns the upstream's 201 with its exact bytes."""
    reply = await gateway.call("POST", "/api/items", json={"text": "hi"})
    assert reply.status == 201
    assert reply.body == b'{"created": {"text": "hi"}}'
    assert reply.headers["Content-Type"] == "application/json"
    assert [(seen.method, seen.path) for seen in upstream.seen] == [("POST", "/internal/items")]
    assert gateway.own_calls == []


async def test_a_matching_delete_gets_the_upstreams_204_with_no_body_and_no_content_type(
    upstream: Upstream, gateway: Gateway
) -> None:
    """An upstream 204 reaches the caller as 204 with an empty body and no Content-Type."""
    reply = await gateway.call("DELETE", "/api/items/abc")
    assert reply.status == 204
    assert reply.body == b""
    assert "Content-Type" not in reply.headers
    assert [(seen.method, seen.path) for seen in upstream.seen] == [("DELETE", "/internal/items/abc")]


@pytest.mark.parametrize("status", sorted(ERROR_BODIES))
async def test_the_upstreams_error_answers_pass_through_unchanged(
    upstream: Upstream, gateway: Gateway, status: int
) -> None:
    """Upstream 401/403/404/409/422 (with fields) and 500 reach the caller unchanged, asked once."""
    reply = await gateway.call("GET", f"/api/errors/{status}")
    assert reply.status == status
    assert reply.body == ERROR_BODIES[status]
    assert reply.headers["Content-Type"] == "application/json"
    assert len(upstream.seen) == 1
    assert gateway.own_calls == []


# --- matching ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "with space",
        "100%",
        "100%25",
        "héllo",
        "日本語",
        "a+b;c=d:e@f",
        "what?x=1",
        "frag#ment",
        "{item_id}",
    ],
)
async def test_a_path_parameter_reaches_the_upstream_decoded_as_sent(
    upstream: Upstream, gateway: Gateway, value: str
) -> None:
    """A percent-encoded parameter with spaces, %, ?, #, non-ASCII text or braces arrives as sent."""
    reply = await gateway.call("GET", "/api/items/" + quote(value, safe=""))
    assert reply.status == 200, reply
    assert reply.json() == {"from": "upstream", "item_id": value, "n": 1.5}
    [seen] = upstream.seen
    assert seen.params == {"item_id": value}


async def test_several_path_parameters_are_substituted_by_name(upstream: Upstream, gateway: Gateway) -> None:
    """Each `{name}` of the target gets the segment of the same name, whatever their order."""
    reply = await gateway.call("GET", "/api/pairs/one%20%C3%A9/and/two%25")
    assert reply.status == 200, reply
    assert reply.json() == ["two%", "one é"]
    [seen] = upstream.seen
    assert seen.path == "/internal/pairs/two%/one é"


@pytest.mark.parametrize(
    "path",
    [
        "/api/items/",
        "/api/items/a/b",
        "/api/items/a%2Fb",
        "/api/pairs//and/b",
        "/api/pairs/a/and/",
        "/api/pairs/a/and",
        "/api/pairs/a/and/b/c",
        "/api/pairs/a/or/b",
        "/api/errors",
        "/api/itemsx/a",
    ],
)
async def test_an_empty_segment_or_another_number_of_segments_is_not_forwarded(
    upstream: Upstream, gateway: Gateway, path: str
) -> None:
    """`{name}` never matches an empty segment, nor a template another number of segments: app's 404."""
    reply = await gateway.call("GET", path)
    assert reply.status == 404, reply
    assert error_of(reply)["code"] == "not_found"
    assert upstream.seen == []
    assert gateway.own_calls == []


async def test_a_rewritten_forward_reaches_the_target_its_rewrite_names(
    upstream: Upstream, gateway: Gateway
) -> None:
    """A path parameter the rewrite turns into another reaches the upstream as the target's."""
    reply = await gateway.call("GET", "/api/named/widget?limit=3")
    assert reply.status == 200, reply
    assert reply.json() == {"from": "upstream", "item_id": "item 7", "n": 1.5}
    [seen] = upstream.seen
    assert (seen.path, seen.params, seen.query) == (
        "/internal/items/item 7",
        {"item_id": "item 7"},
        b"limit=3",
    )
    assert gateway.own_calls == []


async def test_a_forward_whose_rewrite_declines_is_answered_by_the_app(
    upstream: Upstream, gateway: Gateway
) -> None:
    """A rewrite that returns None leaves the request to the gateway's own route at that path."""
    reply = await gateway.call("GET", "/api/named/gadget")
    assert (reply.status, reply.json()) == (200, {"from": "gateway", "name": "gadget"})
    assert gateway.own_calls == ["GET named gadget"]
    assert upstream.seen == []


async def test_an_unforwarded_path_reaches_the_app(upstream: Upstream, gateway: Gateway) -> None:
    """A request matching no Forward is answered by the gateway's own route."""
    reply = await gateway.call("GET", "/api/other")
    assert (reply.status, reply.json()) == (200, {"from": "gateway"})
    assert gateway.own_calls == ["GET other"]
    assert upstream.seen == []


async def test_a_get_forward_does_not_catch_another_method_on_its_path(
    upstream: Upstream, gateway: Gateway
) -> None:
    """POST to a path forwarded for GET reaches the gateway's POST route; PUT there gets the app's 405."""
    reply = await gateway.call("POST", "/api/items/abc", json={})
    assert (reply.status, reply.json()) == (200, {"from": "gateway", "item_id": "abc"})
    assert gateway.own_calls == ["POST abc"]
    reply = await gateway.call("PUT", "/api/items/abc", json={})
    assert reply.status == 405, reply
    assert upstream.seen == []


async def test_a_post_forward_does_not_catch_a_get_on_its_path(upstream: Upstream, gateway: Gateway) -> None:
    """GET to a path forwarded only for POST is the app's 404, not a forward."""
    reply = await gateway.call("GET", "/api/items")
    assert reply.status == 404, reply
    assert upstream.seen == []


# --- what the upstream receives ----------------------------------------------------------------------


async def test_the_query_string_arrives_unchanged(upstream: Upstream, gateway: Gateway) -> None:
    """Every byte of an encoded query (repeats, empties, +, %-escapes, / ? : @ and sub-delimiters) arrives."""
    query = "b=2&a=1&a=%C3%A9&sp=a+b%20c&plus=%2B&amp=%26&empty=&flag&path=/x?y:z@w&sub=!$'()*,;="
    reply = await gateway.call("GET", "/api/items/q?" + query)
    assert reply.status == 200, reply
    [seen] = upstream.seen
    assert seen.query == query.encode()
    assert seen.path == "/internal/items/q"


async def test_a_get_carries_authorization_idempotency_key_and_a_deadline_and_nothing_else(
    upstream: Upstream, gateway: Gateway
) -> None:
    """Authorization and Idempotency-Key arrive as sent, with the deadline; X-Other, Cookie etc. do not."""
    headers = {
        "Authorization": "Bearer tok.en-é",
        "Idempotency-Key": "key-1",
        "X-Other": "nope",
        "Cookie": "session=secret",
        "X-Forwarded-For": "10.0.0.1",
        "Accept": "text/html",
    }
    reply = await gateway.call("GET", "/api/items/abc", headers=headers)
    assert reply.status == 200, reply
    [seen] = upstream.seen
    assert set(seen.headers) == {"host", "authorization", "idempotency-key", "x-threadline-timeout-ms"}
    assert seen.headers["authorization"].encode("latin-1") == "Bearer tok.en-é".encode()
    assert seen.headers["idempotency-key"] == "key-1"
    assert seen.body == b""
    assert seen.headers["x-threadline-timeout-ms"] == str(int(CLIENT_TIMEOUT_SECONDS * 1000))


async def test_a_post_body_arrives_byte_for_byte_as_json(upstream: Upstream, gateway: Gateway) -> None:
    """A POST body arrives unchanged, as application/json whatever the caller declared, with its length."""
    body = b'{"text": "h\\u00e9llo \xc3\xa9\\n",   "n": [1, 2.50]}'
    reply = await gateway.call(
        "POST", "/api/items", data=body, headers={"Content-Type": "text/plain", "Authorization": "Bearer t"}
    )
    assert reply.status == 201, reply
    assert reply.body == b'{"created": ' + body + b"}"
    [seen] = upstream.seen
    assert seen.body == body
    assert set(seen.headers) == {
        "host",
        "authorization",
        "content-type",
        "content-length",
        "x-threadline-timeout-ms",
    }
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["content-length"] == str(len(body))


async def test_the_callers_deadline_bounds_the_one_the_upstream_sees(
    upstream: Upstream, gateway: Gateway
) -> None:
    """With x-threadline-timeout-ms: 4000 from the caller, the upstream is given at most 4000 ms."""
    reply = await gateway.call("GET", "/api/items/abc", headers={"x-threadline-timeout-ms": "4000"})
    assert reply.status == 200, reply
    [seen] = upstream.seen
    assert 0 < int(seen.headers["x-threadline-timeout-ms"]) <= 4000


async def test_an_exhausted_deadline_is_503_without_reaching_the_upstream(
    upstream: Upstream, gateway: Gateway
) -> None:
    """With x-threadline-timeout-ms: 0 the gateway answers 503 naming the service and sends nothing."""
    reply = await gateway.call("GET", "/api/items/abc", headers={"x-threadline-timeout-ms": "0"})
    assert reply.status == 503, reply
    error = error_of(reply)
    assert error["code"] == "service_unavailable"
    assert error["message"].startswith(f"{SERVICE} is unavailable")
    assert upstream.seen == []


# --- failures ----------------------------------------------------------------------------------------


async def test_an_upstream_nobody_listens_on_is_503_naming_the_service(unused_socket: socket.socket) -> None:
    """Forwarding to a port nobody listens on answers 503 service_unavailable naming the service."""
    port = unused_socket.getsockname()[1]
    async with running_gateway(f"http://127.0.0.1:{port}") as gateway:
        for method, path in [("GET", "/api/items/abc"), ("POST", "/api/items")]:
            reply = await gateway.call(method, path, json={"x": 1} if method == "POST" else None)
            assert reply.status == 503, reply
            error = error_of(reply)
            assert error["code"] == "service_unavailable"
            assert error["message"].startswith(f"{SERVICE} is unavailable"), error
            assert set(reply.json()) == {"error"}
        assert gateway.own_calls == []


async def test_an_upstream_503_is_retried_for_a_get(upstream: Upstream, gateway: Gateway) -> None:
    """A GET answered 503 once is sent again and the caller gets the second, good answer."""
    upstream.unavailable_left = 1
    reply = await gateway.call("GET", "/api/flaky")
    assert (reply.status, reply.body) == (200, b'{"ok": true}')
    assert upstream.calls["GET"] == 2


async def test_an_upstream_that_stays_503_is_tried_one_plus_retries_times_for_a_get(
    upstream: Upstream, gateway: Gateway
) -> None:
    """A GET always answered 503 reaches the upstream 1 + retries times, then the caller gets its 503."""
    upstream.unavailable_left = 100
    reply = await gateway.call("GET", "/api/flaky")
    assert reply.status == 503, reply
    assert error_of(reply) == {"code": "service_unavailable", "message": "store is unavailable: warming up"}
    assert upstream.calls["GET"] == 1 + RETRIES


async def test_an_upstream_503_is_not_retried_for_a_post(upstream: Upstream, gateway: Gateway) -> None:
    """A POST answered 503 reaches the upstream once, even with an Idempotency-Key; the caller gets 503."""
    upstream.unavailable_left = 1
    reply = await gateway.call("POST", "/api/flaky", json={"x": 1}, headers={"Idempotency-Key": "k"})
    assert reply.status == 503, reply
    assert error_of(reply) == {"code": "service_unavailable", "message": "store is unavailable: warming up"}
    assert upstream.calls["POST"] == 1


async def test_a_body_over_the_limit_is_413_and_never_reaches_the_upstream(
    upstream: Upstream, gateway: Gateway
) -> None:
    """Bodies over max_body_bytes (declared or chunked) get the edge's 413; one of the limit passes."""
    at_limit = b'"' + b"x" * (MAX_BODY - 2) + b'"'
    over = b'"' + b"x" * (MAX_BODY - 1) + b'"'

    async def chunked() -> AsyncIterator[bytes]:
        yield over

    for data in [over, chunked()]:
        reply = await gateway.call("POST", "/api/items", data=data)
        assert reply.status == 413, reply
        error = error_of(reply)
        assert error["code"] == "payload_too_large"
        assert str(MAX_BODY) in error["message"]
    assert upstream.seen == []
    reply = await gateway.call("POST", "/api/items", data=at_limit)
    assert reply.status == 201, reply
    [seen] = upstream.seen
    assert seen.body == at_limit


# --- metrics -----------------------------------------------------------------------------------------


async def test_metrics_count_forwarded_requests_under_the_edge_route_template(
    upstream: Upstream, gateway: Gateway
) -> None:
    """/metrics counts forwarded requests by the Forward's path template and the status the caller got."""
    for item_id in ("a", "b", "c%20d"):
        assert (await gateway.call("GET", f"/api/items/{item_id}")).status == 200
    assert (await gateway.call("GET", "/api/errors/404")).status == 404
    assert (await gateway.call("POST", "/api/items", json={"x": 1})).status == 201
    assert (await gateway.call("DELETE", "/api/items/a")).status == 204
    counts = await gateway.metrics()
    assert counts[("GET", "/api/items/{item_id}", 200)] == 3
    assert counts[("GET", "/api/errors/{status}", 404)] == 1
    assert counts[("POST", "/api/items", 201)] == 1
    assert counts[("DELETE", "/api/items/{item_id}", 204)] == 1
    assert not any(route.startswith("/api/items/") and "{" not in route for _, route, _ in counts)
    assert ("GET", "unmatched", 200) not in counts


async def test_metrics_count_a_forwarded_post_sent_without_a_json_content_type(
    upstream: Upstream, gateway: Gateway
) -> None:
    """A forwarded POST whose caller declared another content type is still counted under its template."""
    reply = await gateway.call("POST", "/api/items", data=b"{}", headers={"Content-Type": "text/plain"})
    assert reply.status == 201, reply
    counts = await gateway.metrics()
    assert counts.get(("POST", "/api/items", 201)) == 1, counts


# --- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/a/{id}", "/b/{other}"),
        ("/a/{id}", "/b/{id}/{other}"),
        ("/a", "/b/{id}"),
    ],
)
def test_forward_refuses_a_target_naming_a_parameter_its_path_lacks(path: str, target: str) -> None:
    """A target `{name}` with no `{name}` segment in the path raises ValueError when the Forward is made."""
    with pytest.raises(ValueError, match="do not appear in"):
        Forward("GET", path, SERVICE, target)


def test_forward_accepts_a_target_using_some_of_its_paths_parameters_in_any_order() -> None:
    """A target may use a subset of the path's parameters, in another order."""
    forward = Forward("GET", "/a/{x}/{y}", SERVICE, "/b/{y}/c/{x}")
    assert forward.target == "/b/{y}/c/{x}"
    Forward("GET", "/a/{x}/{y}", SERVICE, "/b/{y}")


def test_forward_accepts_a_target_naming_parameters_its_rewrite_gives() -> None:
    """With a rewrite, the target's parameters are the rewrite's to give, not the path's."""
    forward = Forward("GET", "/api/named/{name}", SERVICE, "/internal/items/{item_id}", rewrite=item_named)
    assert forward.rewrite is item_named


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/a/{id}", "/b/{other}.json"),
        ("/a/{id}", "/b/v{other}"),
        ("/a/{id}", "/b/{id}{other}"),
        ("/a/{id}", "/b/{id}.json"),
        ("/a/v{id}", "/b/{id}"),
        ("/a/{not an identifier}", "/b"),
    ],
)
def test_forward_refuses_a_parameter_that_is_not_a_whole_segment(path: str, target: str) -> None:
    """A `{name}` must be a whole segment of either template, else substituting it could fail per request."""
    with pytest.raises(ValueError, match="whole segment"):
        Forward("GET", path, SERVICE, target)


# --- callers that go away, limits on every route, repeated headers, declared idempotence -------------


async def send_unfinished_chunked_post(
    gateway: Gateway, path: str, received: list[tuple[str, str, bool]]
) -> None:
    """POST one complete JSON chunk to `path`, never the last chunk, and hang up once it arrived."""
    chunk = b'{"text": "never finished"}'
    url = URL(gateway.url)
    assert url.host is not None
    assert url.port is not None
    _, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n".encode()
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + f"{len(chunk):x}\r\n".encode()
            + chunk
            + b"\r\n"
        )
        await writer.drain()

        async def the_chunk_arrived() -> None:
            assert (path, "http.request", True) in received, received

        await eventually(the_chunk_arrived, within=DEADLINE)
    finally:
        writer.close()
        await writer.wait_closed()

    async def the_gateway_is_done_with_it() -> None:
        # Counted only once the edge middleware returned: after anything the request caused.
        counts = await gateway.metrics()
        assert any((method, route) == ("POST", path) for method, route, _ in counts), counts

    await eventually(the_gateway_is_done_with_it, within=DEADLINE)


async def test_a_caller_gone_before_the_last_chunk_of_its_body_is_not_forwarded(upstream: Upstream) -> None:
    """A chunked POST whose caller disconnects after a chunk, before the last, never reaches the upstream."""
    received: list[tuple[str, str, bool]] = []
    async with running_gateway(upstream.url, outer=[Middleware(ReceiveLog, log=received)]) as gateway:
        await send_unfinished_chunked_post(gateway, "/api/items", received)
        assert [entry for entry in received if entry[0] == "/api/items"] == [
            ("/api/items", "http.request", True),
            ("/api/items", "http.disconnect", False),
        ]
        assert upstream.seen == []
        assert gateway.own_calls == []
        assert [status for method, route, status in await gateway.metrics() if route == "/api/items"] == [
            499
        ], "a request its caller left counts as closed by its caller, not as a server error"


async def test_a_caller_gone_mid_body_counts_as_499_on_an_ordinary_route_too(upstream: Upstream) -> None:
    """FastAPI answers a body cut short with a 400 nobody reads; the metrics say the caller left."""
    received: list[tuple[str, str, bool]] = []
    async with running_gateway(upstream.url, outer=[Middleware(ReceiveLog, log=received)]) as gateway:
        await send_unfinished_chunked_post(gateway, "/api/notes", received)
        assert gateway.own_calls == []
        assert [status for method, route, status in await gateway.metrics() if route == "/api/notes"] == [499]


async def test_an_oversized_chunked_body_gets_the_same_413_on_a_forwarded_and_an_ordinary_route(
    upstream: Upstream, gateway: Gateway
) -> None:
    """A chunked body over the limit gets the same 413 body from a forwarded route and a FastAPI one."""
    over = b'{"text": "' + b"x" * MAX_BODY + b'"}'

    async def chunked() -> AsyncIterator[bytes]:
        yield over

    forwarded = await gateway.call("POST", "/api/items", data=chunked())
    ordinary = await gateway.call("POST", "/api/notes", data=chunked())
    assert (forwarded.status, ordinary.status) == (413, 413), (forwarded, ordinary)
    assert error_of(forwarded) == {
        "code": "payload_too_large",
        "message": f"the request body is larger than {MAX_BODY} bytes",
    }
    assert ordinary.body == forwarded.body
    assert ordinary.headers["Content-Type"] == forwarded.headers["Content-Type"]
    assert upstream.seen == []
    assert gateway.own_calls == []


async def test_of_repeated_authorization_and_idempotency_key_headers_only_the_first_is_forwarded(
    upstream: Upstream, gateway: Gateway
) -> None:
    """Of two Authorization and two Idempotency-Key headers, the upstream gets the first of each, once."""
    headers = [
        ("Authorization", "Bearer first"),
        ("Idempotency-Key", "key-first"),
        ("Authorization", "Bearer second"),
        ("Idempotency-Key", "key-second"),
    ]
    reply = await gateway.call("GET", "/api/items/abc", headers=headers)
    assert reply.status == 200, reply
    # The upstream's record() refuses (500) a request carrying any header name twice.
    [seen] = upstream.seen
    assert seen.headers["authorization"] == "Bearer first"
    assert seen.headers["idempotency-key"] == "key-first"


async def test_an_upstream_503_is_retried_for_a_post_forward_declared_idempotent(
    upstream: Upstream, gateway: Gateway
) -> None:
    """A POST whose Forward says idempotent=True, answered 503 once, is sent again: the caller gets 201."""
    upstream.unavailable_left = 1
    body = b'{"handle": "ada", "password": "pw"}'
    reply = await gateway.call("POST", "/api/sessions", data=body)
    assert (reply.status, reply.body) == (201, b'{"created": ' + body + b"}"), reply
    assert upstream.calls["POST /internal/sessions"] == 2
    assert [seen.body for seen in upstream.seen] == [body, body]
