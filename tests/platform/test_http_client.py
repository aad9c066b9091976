"""The service-to-service HTTP client against a real server: retries, error mapping, deadlines, breaker."""

import asyncio
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError

from tests.support.polling import eventually
from tests.support.servers import serving
from threadline.platform.deadlines import deadline_scope, remaining_seconds
from threadline.platform.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    PaymentRequired,
    ServiceError,
    ServiceUnavailable,
    Unauthorized,
)
from threadline.platform.http_client import CircuitBreaker, RetryBudget, ServiceClient
from threadline.platform.http_pool import HttpSession
from threadline.platform.kept_json import ItemsByJson

HANG_CAP_SECONDS = 20.0


def error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status)


class Item(BaseModel):
    """An answer model for `ServiceClient.call_for`."""

    id: str
    created_at: datetime
    tags: list[str]


class Tag(BaseModel):
    """A frozen item of a listing."""

    model_config = ConfigDict(frozen=True)

    name: str
    uses: int


class Tags(BaseModel):
    """An answer listing frozen items, for `call_for` with remembered items."""

    items: list[Tag]
    next_cursor: str | None


class Flaky(BaseModel):
    """What /flaky answers."""

    ok: bool
    method: str


ITEM_ANSWER = b'{"id": "i1", "created_at": "2024-05-06T07:08:09Z", "tags": ["a", "b"]}'
TAGS_ANSWER = b'{"items": [{"name": "a", "uses": 2}, {"name": "b", "uses": 1}], "next_cursor": "b"}'
# Answers a caller cannot take as an Item: the wrong shape, not JSON at all, and no body.
UNFIT_ANSWERS = {
    "wrong-shape": b'{"id": 1, "tags": "a"}',
    "not-json": b"<html>oops</html>",
    "not-an-object": b"[]",
    "empty": b"",
}


class Remote:
    """A callee that counts every call, fails on demand in the API error shape, or hangs."""

    def __init__(self) -> None:
        self.url = ""
        self.calls: Counter[str] = Counter()
        self.unavailable_left = 0
        self.healthy = True
        self.deadline_headers: list[str | None] = []
        self.release = asyncio.Event()

    def app(self) -> FastAPI:
        app = FastAPI()
        methods = ["GET", "PUT", "DELETE", "POST", "PATCH"]

        @app.api_route("/flaky", methods=methods)
        async def flaky(request: Request) -> Response:
            self.calls["flaky"] += 1
            if self.unavailable_left > 0:
                self.unavailable_left -= 1
                return error(503, "service_unavailable", "posts is unavailable: warming up")
            return JSONResponse({"ok": True, "method": request.method})

        @app.api_route("/toggle", methods=methods)
        async def toggle() -> Response:
            self.calls["toggle"] += 1
            if not self.healthy:
                return error(503, "service_unavailable", "posts is unavailable: sick")
            return JSONResponse({"ok": True})

        @app.get("/bare-503")
        async def bare_503() -> Response:
            self.calls["bare-503"] += 1
            return Response("upstream gone", status_code=503, media_type="text/plain")

        @app.api_route("/status/{status}", methods=methods)
        async def status(status: int) -> Response:
            self.calls[f"status-{status}"] += 1
            if status == 422:
                fields = [{"field": "text", "message": "too long"}]
                return error(422, "invalid_request", "invalid request: text: too long", fields=fields)
            return error(status, f"remote_{status}", f"the remote said {status}")

        @app.post("/echo")
        async def echo(request: Request) -> Response:
            self.calls["echo"] += 1
            return JSONResponse(
                {
                    "body": await request.json(),
                    "params": dict(request.query_params),
                    "authorization": request.headers.get("authorization"),
                    "trace": request.headers.get("x-trace"),
                }
            )

        @app.get("/raw/{name}")
        async def raw(name: str) -> Response:
            self.calls[f"raw-{name}"] += 1
            answers = {"item": ITEM_ANSWER, "tags": TAGS_ANSWER, **UNFIT_ANSWERS}
            return Response(answers[name], media_type="application/json")

        @app.delete("/empty")
        async def empty() -> Response:
            self.calls["empty"] += 1
            return Response(status_code=204)

        @app.api_route("/hang", methods=methods)
        async def hang(request: Request) -> Response:
            self.calls["hang"] += 1
            self.deadline_headers.append(request.headers.get("x-threadline-timeout-ms"))
            await asyncio.wait_for(self.release.wait(), HANG_CAP_SECONDS)
            return JSONResponse({"ok": True})

        return app


@pytest.fixture
async def remote() -> AsyncIterator[Remote]:
    remote = Remote()
    async with serving(remote.app()) as url:
        remote.url = url
        try:
            yield remote
        finally:
            remote.release.set()


@asynccontextmanager
async def serving_on(sock: socket.socket, app: FastAPI) -> AsyncIterator[None]:
    """Start listening on an already bound socket and serve `app` there."""
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield
    finally:
        server.should_exit = True
        await task


class ObservedBreaker(CircuitBreaker):
    """The real breaker, also counting the failures it is told about."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.failures_seen = 0

    def record_failure(self) -> None:
        self.failures_seen += 1
        super().record_failure()


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_an_idempotent_call_is_retried_on_503_until_the_server_recovers(
    remote: Remote, session: HttpSession, method: str
) -> None:
    """GET, PUT and DELETE answered 503 twice are retried and return the third, good answer."""
    remote.unavailable_left = 2
    client = ServiceClient("posts", remote.url, session, retries=2)
    assert await client.call(method, "/flaky") == {"ok": True, "method": method}
    assert remote.calls["flaky"] == 3
    assert not client.circuit_open


async def test_an_idempotent_call_gives_up_after_its_retries(remote: Remote, session: HttpSession) -> None:
    """A GET that keeps getting 503 is tried 1 + retries times, then raises ServiceUnavailable."""
    remote.unavailable_left = 100
    client = ServiceClient("posts", remote.url, session, retries=2)
    with pytest.raises(ServiceUnavailable) as unavailable:
        await client.call("GET", "/flaky")
    assert remote.calls["flaky"] == 3
    assert unavailable.value.service == "posts"
    assert unavailable.value.message == "posts is unavailable: warming up"


async def test_a_503_without_the_error_shape_names_the_service_and_status(
    remote: Remote, session: HttpSession
) -> None:
    """A bare 503 (say, from a proxy) still becomes ServiceUnavailable naming the callee."""
    client = ServiceClient("posts", remote.url, session, retries=0)
    with pytest.raises(ServiceUnavailable, match=r"^posts is unavailable: HTTP 503$"):
        await client.call("GET", "/bare-503")


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_a_non_idempotent_call_is_never_retried(
    remote: Remote, session: HttpSession, method: str
) -> None:
    """A POST or PATCH answered 503 reaches the server exactly once and raises ServiceUnavailable."""
    remote.unavailable_left = 1
    client = ServiceClient("payments", remote.url, session, retries=3)
    with pytest.raises(ServiceUnavailable):
        await client.call(method, "/flaky")
    assert remote.calls["flaky"] == 1


async def test_a_post_marked_idempotent_is_retried(remote: Remote, session: HttpSession) -> None:
    """A POST the caller declares idempotent (it carries an idempotency key) is retried like a GET."""
    remote.unavailable_left = 2
    client = ServiceClient("payments", remote.url, session, retries=2)
    result = await client.call("POST", "/flaky", json={"amount": 5}, idempotent=True)
    assert result == {"ok": True, "method": "POST"}
    assert remote.calls["flaky"] == 3


async def test_a_get_marked_not_idempotent_is_not_retried(remote: Remote, session: HttpSession) -> None:
    """`idempotent=False` turns retries off even for a GET."""
    remote.unavailable_left = 1
    client = ServiceClient("posts", remote.url, session, retries=2)
    with pytest.raises(ServiceUnavailable):
        await client.call("GET", "/flaky", idempotent=False)
    assert remote.calls["flaky"] == 1


async def test_a_refused_connection_raises_service_unavailable_naming_the_service(
    unused_socket: socket.socket, session: HttpSession
) -> None:
    """Calling a port nobody listens on raises ServiceUnavailable whose message names the callee."""
    port = unused_socket.getsockname()[1]
    client = ServiceClient("timeline", f"http://127.0.0.1:{port}", session, retries=0)
    with pytest.raises(ServiceUnavailable) as unavailable:
        await client.call("GET", "/anything")
    assert unavailable.value.service == "timeline"
    assert unavailable.value.message.startswith("timeline is unavailable")
    assert unavailable.value.status == 503
    assert unavailable.value.code == "service_unavailable"


async def test_an_idempotent_call_is_retried_after_a_refused_connection(
    unused_socket: socket.socket, session: HttpSession
) -> None:
    """A GET refused on its first attempt succeeds once the callee starts listening during the backoff."""
    remote = Remote()
    port = unused_socket.getsockname()[1]
    client = ServiceClient("posts", f"http://127.0.0.1:{port}", session, retries=4)
    breaker = ObservedBreaker()
    client._breaker = breaker
    call = asyncio.create_task(client.call("GET", "/flaky"))
    try:

        async def first_attempt_refused() -> None:
            assert breaker.failures_seen >= 1
            assert not call.done(), call

        await eventually(first_attempt_refused, within=10, interval=0.005)
        async with serving_on(unused_socket, remote.app()):
            assert await asyncio.wait_for(call, 10) == {"ok": True, "method": "GET"}
    finally:
        call.cancel()
    assert remote.calls["flaky"] == 1
    assert breaker.failures_seen >= 1
    assert not client.circuit_open


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (401, Unauthorized),
        (402, PaymentRequired),
        (403, Forbidden),
        (404, NotFound),
        (409, Conflict),
    ],
)
async def test_remote_errors_come_back_as_the_matching_exception(
    remote: Remote, session: HttpSession, status: int, kind: type[ServiceError]
) -> None:
    """A remote 401/402/403/404/409 raises the chassis class with the remote's status, code and message."""
    client = ServiceClient("users", remote.url, session)
    with pytest.raises(kind) as raised:
        await client.call("GET", f"/status/{status}")
    assert type(raised.value) is kind
    assert raised.value.status == status
    assert raised.value.code == f"remote_{status}"
    assert raised.value.message == f"the remote said {status}"
    assert raised.value.body() == {
        "error": {"code": f"remote_{status}", "message": f"the remote said {status}"}
    }
    assert remote.calls[f"status-{status}"] == 1


async def test_a_remote_422_keeps_its_fields(remote: Remote, session: HttpSession) -> None:
    """A remote invalid_request comes back as InvalidRequest with the offending fields."""
    client = ServiceClient("posts", remote.url, session)
    with pytest.raises(InvalidRequest) as raised:
        await client.call("POST", "/status/422", json={"text": "x" * 600})
    assert raised.value.status == 422
    assert raised.value.code == "invalid_request"
    assert raised.value.message == "invalid request: text: too long"
    assert raised.value.fields == [{"field": "text", "message": "too long"}]
    assert raised.value.body()["error"]["fields"] == [{"field": "text", "message": "too long"}]


async def test_a_remote_500_is_not_retried_and_keeps_its_status(remote: Remote, session: HttpSession) -> None:
    """An answered 500 is an error of the callee, not an outage: raised once with status 500, no retry."""
    client = ServiceClient("posts", remote.url, session, retries=2)
    with pytest.raises(ServiceError) as raised:
        await client.call("GET", "/status/500")
    assert not isinstance(raised.value, ServiceUnavailable)
    assert raised.value.status == 500
    assert raised.value.code == "remote_500"
    assert remote.calls["status-500"] == 1


async def test_a_404_without_the_error_shape_is_not_found_naming_the_service(
    remote: Remote, session: HttpSession
) -> None:
    """A 404 for an unknown path (no error shape) is NotFound whose message names the callee and status."""
    client = ServiceClient("posts", remote.url, session)
    with pytest.raises(NotFound) as raised:
        await client.call("GET", "/no/such/route")
    assert raised.value.code == "not_found"
    assert raised.value.message == "posts answered HTTP 404"


async def test_a_call_sends_json_params_token_and_headers_and_decodes_the_answer(
    remote: Remote, session: HttpSession
) -> None:
    """The JSON body, query parameters, bearer token and extra headers arrive; the JSON answer is returned."""
    client = ServiceClient("posts", remote.url + "/", session)
    answer = await client.call(
        "POST",
        "/echo",
        json={"text": "héllo", "n": [1, 2]},
        params={"limit": 5, "cursor": "abc"},
        token="tok-123",
        headers={"x-trace": "t1"},
    )
    assert answer == {
        "body": {"text": "héllo", "n": [1, 2]},
        "params": {"limit": "5", "cursor": "abc"},
        "authorization": "Bearer tok-123",
        "trace": "t1",
    }


async def test_an_empty_answer_is_none(remote: Remote, session: HttpSession) -> None:
    """A 204 with no body returns None."""
    client = ServiceClient("posts", remote.url, session)
    assert await client.call("DELETE", "/empty") is None
    assert remote.calls["empty"] == 1


async def test_a_typed_call_validates_the_answer_from_its_bytes(
    remote: Remote, session: HttpSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`call_for` hands the answer's raw bytes to `model_validate_json`, never decoding them first."""
    validated: list[bytes] = []
    from_json = Item.model_validate_json

    def recording(cls: type[Item], data: bytes) -> Item:
        validated.append(data)
        return from_json(data)

    def undecoded(cls: type[Item], data: Any) -> Item:
        raise AssertionError(f"validated from a decoded answer: {data!r}")

    monkeypatch.setattr(Item, "model_validate_json", classmethod(recording))
    monkeypatch.setattr(Item, "model_validate", classmethod(undecoded))
    monkeypatch.setattr("threadline.platform.http_client.orjson.loads", undecoded)
    client = ServiceClient("posts", remote.url, session)
    item = await client.call_for(Item, "GET", "/raw/item")
    assert item == Item(id="i1", created_at=datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC), tags=["a", "b"])
    assert validated == [ITEM_ANSWER]


async def test_a_typed_call_with_remembered_items_hands_out_an_item_seen_before(
    remote: Remote, session: HttpSession
) -> None:
    """With `items`, the same item in a later answer is the object parsed the first time."""
    client = ServiceClient("posts", remote.url, session)
    remembered = ItemsByJson(size=10)
    first = await client.call_for(Tags, "GET", "/raw/tags", items=remembered)
    again = await client.call_for(Tags, "GET", "/raw/tags", items=remembered)
    assert first == again == await client.call_for(Tags, "GET", "/raw/tags")
    assert first.items[0] is again.items[0]
    assert first.items[1] is again.items[1]
    assert again.next_cursor == "b"
    with pytest.raises(ValidationError):
        await client.call_for(Tags, "GET", "/raw/wrong-shape", items=remembered)


@pytest.mark.parametrize("name", sorted(UNFIT_ANSWERS))
async def test_a_typed_call_whose_answer_does_not_fit_raises_a_validation_error(
    remote: Remote, session: HttpSession, name: str
) -> None:
    """A 200 that is not an Item (wrong shape, not JSON, an array, empty) raises ValidationError."""
    client = ServiceClient("posts", remote.url, session)
    with pytest.raises(ValidationError) as raised:
        await client.call_for(Item, "GET", f"/raw/{name}")
    assert raised.value.title == "Item"
    assert raised.value.errors()
    assert remote.calls[f"raw-{name}"] == 1


async def test_a_typed_call_is_retried_and_its_errors_mapped_as_call_does(
    remote: Remote, session: HttpSession
) -> None:
    """`call_for` shares the request path of `call`: a 503 is retried, a remote 404 raises NotFound."""
    remote.unavailable_left = 1
    client = ServiceClient("posts", remote.url, session, retries=2)
    assert await client.call_for(Flaky, "GET", "/flaky") == Flaky(ok=True, method="GET")
    assert remote.calls["flaky"] == 2
    with pytest.raises(NotFound) as raised:
        await client.call_for(Flaky, "GET", "/status/404")
    assert raised.value.code == "remote_404"


async def test_a_hanging_call_is_cut_off_by_the_client_timeout(remote: Remote, session: HttpSession) -> None:
    """A callee that never answers is abandoned after timeout_seconds, and was told that budget."""
    client = ServiceClient("slow", remote.url, session, timeout_seconds=0.5, retries=0)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as unavailable:
        await client.call("GET", "/hang")
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 3.0
    assert unavailable.value.service == "slow"
    assert remote.calls["hang"] == 1
    [header] = remote.deadline_headers
    assert header is not None
    assert 0 < int(header) <= 500


async def test_an_enclosing_deadline_bounds_the_whole_call_and_travels_in_the_header(
    remote: Remote, session: HttpSession
) -> None:
    """In deadline_scope(0.6) a hanging GET, retries and all, ends by the deadline; callee saw ≤ 600 ms."""
    client = ServiceClient("slow", remote.url, session, timeout_seconds=5.0, retries=2)
    started = time.monotonic()
    with deadline_scope(0.6), pytest.raises(ServiceUnavailable):
        await client.call("GET", "/hang")
    elapsed = time.monotonic() - started
    assert 0.55 <= elapsed < 3.0
    assert remote.deadline_headers, "the callee was never reached"
    assert all(header is not None and 0 < int(header) <= 600 for header in remote.deadline_headers)


async def test_an_exhausted_deadline_fails_the_call_without_reaching_the_server(
    remote: Remote, session: HttpSession
) -> None:
    """When the caller's deadline has already passed, no request is sent."""
    client = ServiceClient("posts", remote.url, session)
    with deadline_scope(0.0), pytest.raises(ServiceUnavailable, match="deadline exceeded"):
        await client.call("GET", "/flaky")
    assert remote.calls["flaky"] == 0


def test_an_inner_deadline_scope_cannot_extend_the_outer_one() -> None:
    """Nested scopes keep the tighter deadline; leaving a scope restores the one around it."""
    assert remaining_seconds(7.0) == 7.0
    with deadline_scope(1.0):
        assert remaining_seconds(7.0) <= 1.0
        with deadline_scope(100.0):
            assert remaining_seconds(7.0) <= 1.0
        with deadline_scope(0.2):
            assert remaining_seconds(7.0) <= 0.2
        with deadline_scope(None):
            assert remaining_seconds(7.0) <= 1.0
        assert 0.2 < remaining_seconds(7.0) <= 1.0
        assert remaining_seconds(0.1) == 0.1
    assert remaining_seconds(7.0) == 7.0


async def test_the_circuit_opens_after_repeated_failures_and_then_fails_fast(
    remote: Remote, session: HttpSession
) -> None:
    """After five failed calls the breaker opens: further calls fail at once, without reaching the server."""
    remote.healthy = False
    client = ServiceClient("posts", remote.url, session, retries=0)
    client._breaker = CircuitBreaker(failure_threshold=5, reset_seconds=60.0)
    for _ in range(5):
        with pytest.raises(ServiceUnavailable):
            await client.call("GET", "/toggle")
    assert remote.calls["toggle"] == 5
    assert client.circuit_open
    remote.healthy = True
    for _ in range(10):
        with pytest.raises(ServiceUnavailable, match="circuit open"):
            await client.call("GET", "/toggle")
    assert remote.calls["toggle"] == 5


async def test_the_circuit_lets_one_trial_through_after_the_reset_period_and_closes_on_success(
    remote: Remote, session: HttpSession
) -> None:
    """Once open, a trial call after reset_seconds that fails reopens it; one that succeeds closes it."""
    remote.healthy = False
    client = ServiceClient("posts", remote.url, session, retries=0)
    client._breaker = CircuitBreaker(failure_threshold=3, reset_seconds=0.2)
    for _ in range(3):
        with pytest.raises(ServiceUnavailable):
            await client.call("GET", "/toggle")
    assert client.circuit_open
    assert remote.calls["toggle"] == 3

    async def a_trial_reached_the_server() -> None:
        with pytest.raises(ServiceUnavailable):
            await client.call("GET", "/toggle")
        assert remote.calls["toggle"] == 4

    await eventually(a_trial_reached_the_server, within=10, interval=0.02)
    assert client.circuit_open

    remote.healthy = True

    async def closed_again() -> None:
        try:
            assert await client.call("GET", "/toggle") == {"ok": True}
        except ServiceUnavailable as refused:
            raise AssertionError(refused.message) from refused

    await eventually(closed_again, within=10, interval=0.02)
    assert not client.circuit_open
    before = remote.calls["toggle"]
    for _ in range(5):
        assert await client.call("GET", "/toggle") == {"ok": True}
    assert remote.calls["toggle"] == before + 5


async def test_answered_client_errors_do_not_open_the_circuit(remote: Remote, session: HttpSession) -> None:
    """4xx answers show the callee is up: many of them leave the breaker closed."""
    client = ServiceClient("posts", remote.url, session, retries=0)
    for _ in range(10):
        with pytest.raises(NotFound):
            await client.call("GET", "/status/404")
    assert not client.circuit_open
    assert remote.calls["status-404"] == 10


async def test_refused_connections_open_the_circuit(
    unused_socket: socket.socket, session: HttpSession
) -> None:
    """Five refused connections open the breaker, after which the call fails fast as circuit open."""
    port = unused_socket.getsockname()[1]
    client = ServiceClient("posts", f"http://127.0.0.1:{port}", session, retries=0)
    for _ in range(5):
        with pytest.raises(ServiceUnavailable):
            await client.call("GET", "/x")
    assert client.circuit_open
    with pytest.raises(ServiceUnavailable, match="circuit open"):
        await client.call("GET", "/x")


def test_the_retry_budget_allows_its_floor_then_a_fraction_of_calls() -> None:
    """A fresh budget holds `floor` retries; then each call earns `ratio` of one, capped at the floor."""
    budget = RetryBudget(ratio=0.25, floor=3.0)
    assert [budget.take() for _ in range(4)] == [True, True, True, False]
    for _ in range(3):
        budget.on_call()
    assert not budget.take()
    budget.on_call()
    assert budget.take()
    assert not budget.take()
    for _ in range(100):
        budget.on_call()
    assert [budget.take() for _ in range(4)] == [True, True, True, False]


async def test_an_exhausted_retry_budget_stops_retries(remote: Remote, session: HttpSession) -> None:
    """With the retry budget spent, a failing GET reaches the server once instead of 1 + retries times."""
    remote.unavailable_left = 100
    client = ServiceClient("posts", remote.url, session, retries=2)
    client._breaker = CircuitBreaker(failure_threshold=1000)
    client._budget = RetryBudget(ratio=0.0, floor=1.0)
    with pytest.raises(ServiceUnavailable):
        await client.call("GET", "/flaky")
    assert remote.calls["flaky"] == 2
    with pytest.raises(ServiceUnavailable):
        await client.call("GET", "/flaky")
    assert remote.calls["flaky"] == 3


async def test_the_session_reopens_after_close(remote: Remote) -> None:
    """A closed HttpSession opens new connections on next use, so a client keeps working."""
    session = HttpSession(limit_per_origin=4)
    client = ServiceClient("posts", remote.url, session)
    try:
        assert await client.call("GET", "/flaky") == {"ok": True, "method": "GET"}
        await session.close()
        assert await client.call("GET", "/flaky") == {"ok": True, "method": "GET"}
    finally:
        await session.close()
