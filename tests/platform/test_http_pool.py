"""The keep-alive HTTP/1.1 pool against real sockets: reuse, limits, framing, failures, cancellation."""

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlencode

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response

from tests.support.polling import eventually
from tests.support.servers import serving
from threadline.platform.http_pool import ConnectionClosed, HttpAnswer, HttpSession, Origin

# Deadline for anything that should succeed: generous, so a busy machine only makes a test slower.
DEADLINE = 20.0
# How long a route left waiting holds its request if a test forgets to release it.
HANG_CAP_SECONDS = 60.0


def ok(body: bytes, *extra_headers: str) -> bytes:
    """A 200 answer framed by Content-Length, with any extra header lines."""
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{line}\r\n" for line in extra_headers)
    return (head + "\r\n").encode() + body


# --- a raw TCP server, for what a well-behaved ASGI server never does -------------------------------


@dataclass(eq=False)
class RawConnection:
    """One accepted connection: its number in accept order, the client's port and the heads it got."""

    number: int
    port: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[bytes] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def next_request(self) -> bytes | None:
        """The next request head (requests are bodiless), or None once the client closed its side."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.ended.set()
            return None
        self.requests.append(head)
        return head

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


Handler = Callable[[RawConnection], Awaitable[None]]


class RawServer:
    """Runs `handler` for every connection; the connection is closed when the handler returns."""

    def __init__(self, handler: Handler) -> None:
        self.url = ""
        self.connections: list[RawConnection] = []
        self.errors: list[BaseException] = []
        self._handler = handler
        self._tasks: set[asyncio.Task[None]] = set()

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection = RawConnection(
            len(self.connections), writer.get_extra_info("peername")[1], reader, writer
        )
        self.connections.append(connection)
        try:
            await self._handler(connection)
        except Exception as exc:
            self.errors.append(exc)
        finally:
            writer.close()

    async def stop(self) -> None:
        """Close every connection (a handler waiting to read gets EOF) and wait for the handlers."""
        for connection in self.connections:
            connection.writer.close()
        if self._tasks:
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), DEADLINE)


@asynccontextmanager
async def raw_server(handler: Handler, host: str = "127.0.0.1") -> AsyncIterator[RawServer]:
    """Serve `handler` on a free port of `host` chosen now; stop it and every handler afterwards."""
    raw = RawServer(handler)
    server = await asyncio.start_server(raw.accept, host, 0)
    port = server.sockets[0].getsockname()[1]
    raw.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    try:
        yield raw
    finally:
        server.close()
        await raw.stop()
        await server.wait_closed()
    assert not raw.errors, raw.errors


async def answer_every_request(connection: RawConnection) -> None:
    """Keep-alive: answer each request with the numbers of its connection and of the request on it."""
    while await connection.next_request() is not None:
        await connection.send(
            ok(f"connection {connection.number} request {len(connection.requests)}".encode())
        )


async def ended(connection: RawConnection) -> None:
    """Wait, with a deadline, until the client closes `connection`."""
    await asyncio.wait_for(connection.ended.wait(), DEADLINE)


def assert_only_request(server: RawServer, request_line: bytes) -> None:
    """The server saw one connection carrying exactly one request, starting with `request_line`."""
    [connection] = server.connections
    [head] = connection.requests
    assert head.startswith(request_line + b"\r\n"), head


# --- a FastAPI app, for what a real server sees ------------------------------------------------------


def peer_port(request: Request) -> int:
    assert request.client is not None
    return request.client.port


class Remote:
    """A callee reporting the client port it sees; `/wait` holds requests until `release` is set."""

    def __init__(self) -> None:
        self.url = ""
        self.port_calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.waiting_ports: list[int] = []
        self.content_lengths: list[str | None] = []
        self.release = asyncio.Event()

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/port")
        async def port(request: Request) -> dict[str, int]:
            self.port_calls += 1
            return {"port": peer_port(request)}

        @app.get("/wait")
        async def wait(request: Request) -> dict[str, int]:
            self.waiting_ports.append(peer_port(request))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.wait_for(self.release.wait(), HANG_CAP_SECONDS)
            finally:
                self.in_flight -= 1
            return {"port": peer_port(request)}

        @app.get("/echo-path/{rest:path}")
        async def echo_path(rest: str) -> dict[str, str]:
            return {"rest": rest}

        @app.get("/params")
        async def params(request: Request) -> dict[str, str]:
            return dict(request.query_params)

        @app.post("/echo-body")
        async def echo_body(request: Request) -> Response:
            self.content_lengths.append(request.headers.get("content-length"))
            return Response(await request.body(), media_type="application/octet-stream")

        @app.delete("/empty")
        async def empty() -> Response:
            return Response(status_code=204)

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


async def client_port(origin: Origin) -> int:
    """The client port the server saw for one GET /port."""
    answer = await origin.request("GET", "/port", timeout_seconds=DEADLINE)
    assert answer.status == 200, answer
    port = json.loads(answer.body)["port"]
    assert isinstance(port, int)
    return port


def text(answer: HttpAnswer) -> str:
    assert answer.status == 200, answer
    return answer.body.decode()


# --- reuse and limits --------------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(remote: Remote, session: HttpSession) -> None:
    """Five requests in a row to one origin all travel over the same connection (same client port)."""
    origin = session.origin(remote.url)
    ports = [await client_port(origin) for _ in range(5)]
    assert len(set(ports)) == 1, ports


async def test_concurrent_requests_never_exceed_the_limit_per_origin(remote: Remote) -> None:
    """With limit 2, five concurrent requests all succeed over two connections, never more than 2 at once."""
    session = HttpSession(limit_per_origin=2, idle_seconds=60.0)
    origin = session.origin(remote.url)
    calls = [asyncio.create_task(origin.request("GET", "/wait", timeout_seconds=DEADLINE)) for _ in range(5)]
    try:

        async def two_in_flight() -> None:
            assert remote.in_flight == 2

        await eventually(two_in_flight, within=DEADLINE, interval=0.01)
        assert not any(call.done() for call in calls)
        remote.release.set()
        answers = await asyncio.wait_for(asyncio.gather(*calls), DEADLINE)
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await session.close()
    assert [answer.status for answer in answers] == [200] * 5
    assert remote.max_in_flight == 2
    assert len(remote.waiting_ports) == 5
    assert len(set(remote.waiting_ports)) == 2, remote.waiting_ports


async def test_waiting_for_a_free_connection_counts_against_the_timeout(remote: Remote) -> None:
    """With limit 1 and the one connection busy, a second request times out without being sent."""
    session = HttpSession(limit_per_origin=1)
    origin = session.origin(remote.url)
    busy = asyncio.create_task(origin.request("GET", "/wait", timeout_seconds=DEADLINE))
    try:

        async def one_in_flight() -> None:
            assert remote.in_flight == 1

        await eventually(one_in_flight, within=DEADLINE, interval=0.01)
        with pytest.raises(TimeoutError):
            await origin.request("GET", "/port", timeout_seconds=0.2)
        assert remote.port_calls == 0
        remote.release.set()
        assert (await asyncio.wait_for(busy, DEADLINE)).status == 200
        await client_port(origin)
        assert remote.port_calls == 1
    finally:
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)
        await session.close()


async def test_an_answer_saying_connection_close_is_not_reused(session: HttpSession) -> None:
    """After an answer with `Connection: close` the pool closes that connection and opens a new one."""

    async def answer_with_close_but_stay_open(connection: RawConnection) -> None:
        while await connection.next_request() is not None:
            await connection.send(ok(b"bye", "Connection: close"))

    async with raw_server(answer_with_close_but_stay_open) as server:
        origin = session.origin(server.url)
        assert text(await origin.request("GET", "/a", timeout_seconds=DEADLINE)) == "bye"
        assert text(await origin.request("GET", "/b", timeout_seconds=DEADLINE)) == "bye"
        await ended(server.connections[0])
        assert [len(connection.requests) for connection in server.connections] == [1, 1]
        assert server.connections[0].port != server.connections[1].port


async def test_an_expired_idle_connection_is_not_reused(remote: Remote) -> None:
    """With idle_seconds=0 every request opens a new connection (a new client port each time)."""
    session = HttpSession(idle_seconds=0)
    try:
        origin = session.origin(remote.url)
        ports = [await client_port(origin) for _ in range(3)]
    finally:
        await session.close()
    assert len(set(ports)) == 3, ports


# --- connections that end ----------------------------------------------------------------------------


async def answer_once_then_close(connection: RawConnection) -> None:
    """Answer a connection's first request; on its second, close without answering."""
    if await connection.next_request() is None:
        return
    await connection.send(ok(f"connection {connection.number}".encode()))
    await connection.next_request()


async def test_a_pooled_connection_closed_under_a_request_is_retried_once_on_a_new_one(
    session: HttpSession,
) -> None:
    """A reused connection the server closes on the next request, unanswered, is retried on a new one."""

    async with raw_server(answer_once_then_close) as server:
        origin = session.origin(server.url)
        assert text(await origin.request("GET", "/first", timeout_seconds=DEADLINE)) == "connection 0"
        assert text(await origin.request("GET", "/second", timeout_seconds=DEADLINE)) == "connection 1"
        assert len(server.connections) == 2
        assert [len(connection.requests) for connection in server.connections] == [2, 1]
        assert server.connections[1].requests[0].startswith(b"GET /second HTTP/1.1\r\n")


async def test_a_pooled_connection_that_ends_mid_answer_is_not_retried(session: HttpSession) -> None:
    """A reused connection closed after part of an answer raises ConnectionClosed, without a second try."""

    async def answer_once_then_break_off(connection: RawConnection) -> None:
        if await connection.next_request() is None:
            return
        await connection.send(ok(b"fine"))
        if await connection.next_request() is not None:
            await connection.send(b"HTTP/1.1 200 OK\r\nContent-Len")

    async with raw_server(answer_once_then_break_off) as server:
        origin = session.origin(server.url)
        assert text(await origin.request("GET", "/first", timeout_seconds=DEADLINE)) == "fine"
        with pytest.raises(ConnectionClosed):
            await origin.request("GET", "/second", timeout_seconds=DEADLINE)
        assert len(server.connections) == 1


async def test_a_new_connection_closed_before_any_answer_raises_connection_closed(
    session: HttpSession,
) -> None:
    """A fresh connection the server closes on receiving the request raises ConnectionClosed, no retry."""

    async def close_on_receipt(connection: RawConnection) -> None:
        await connection.next_request()

    async with raw_server(close_on_receipt) as server:
        origin = session.origin(server.url)
        with pytest.raises(ConnectionClosed):
            await origin.request("GET", "/x", timeout_seconds=DEADLINE)
        assert len(server.connections) == 1
        assert len(server.connections[0].requests) == 1


async def test_garbage_instead_of_http_raises_connection_closed(session: HttpSession) -> None:
    """Bytes that are not an HTTP answer raise ConnectionClosed and the pool closes that connection."""

    async def answer_garbage_and_stay_open(connection: RawConnection) -> None:
        if await connection.next_request() is not None:
            await connection.send(b"not http\r\n\r\n")
            await connection.next_request()

    async with raw_server(answer_garbage_and_stay_open) as server:
        origin = session.origin(server.url)
        with pytest.raises(ConnectionClosed):
            await origin.request("GET", "/x", timeout_seconds=DEADLINE)
        await ended(server.connections[0])
        assert len(server.connections) == 1


async def test_session_close_closes_idle_connections_and_the_session_keeps_working(
    session: HttpSession,
) -> None:
    """HttpSession.close() ends idle connections (the server reads EOF); the next request opens a new one."""
    async with raw_server(answer_every_request) as server:
        origin = session.origin(server.url)
        assert text(await origin.request("GET", "/a", timeout_seconds=DEADLINE)) == "connection 0 request 1"
        await session.close()
        await ended(server.connections[0])
        assert text(await origin.request("GET", "/b", timeout_seconds=DEADLINE)) == "connection 1 request 1"
        assert len(server.connections) == 2


# --- framing -----------------------------------------------------------------------------------------


async def test_a_chunked_answer_comes_back_whole_and_de_chunked(session: HttpSession) -> None:
    """An answer in three chunks, written separately, is returned joined; the connection stays reusable."""
    chunks = [b"hello, ", b"x" * 300, b", world \r\n0\r\n"]

    async def answer_chunked(connection: RawConnection) -> None:
        while await connection.next_request() is not None:
            await connection.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for chunk in chunks:
                await connection.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await connection.send(b"0\r\n\r\n")

    async with raw_server(answer_chunked) as server:
        origin = session.origin(server.url)
        for _ in range(2):
            answer = await origin.request("GET", "/chunked", timeout_seconds=DEADLINE)
            assert answer == HttpAnswer(200, b"".join(chunks))
        assert [len(connection.requests) for connection in server.connections] == [2]


async def test_a_post_body_arrives_with_its_content_length(remote: Remote, session: HttpSession) -> None:
    """POST bodies (empty, binary with CRLFs, 1 MiB) arrive whole with the right Content-Length."""
    origin = session.origin(remote.url)
    bodies = [b"", b"\x00\xff\r\n\r\nGET / HTTP/1.1\r\n", bytes(range(256)) * 4096]
    for body in bodies:
        answer = await origin.request("POST", "/echo-body", body=body, timeout_seconds=DEADLINE)
        assert answer == HttpAnswer(200, body)
    assert remote.content_lengths == [str(len(body)) for body in bodies]


async def test_an_empty_204_answer(remote: Remote, session: HttpSession) -> None:
    """A 204 without a body comes back as HttpAnswer(204, b""), and the connection is reused afterwards."""
    origin = session.origin(remote.url)
    before = await client_port(origin)
    assert await origin.request("DELETE", "/empty", timeout_seconds=DEADLINE) == HttpAnswer(204, b"")
    assert await client_port(origin) == before


async def test_the_request_head_is_well_formed_http_1_1(session: HttpSession) -> None:
    """The wire carries `METHOD quoted-path?query HTTP/1.1`, the given headers and `Host: host:port`."""
    async with raw_server(answer_every_request) as server:
        origin = session.origin(server.url)
        port = server.url.rsplit(":", 1)[1]
        await origin.request(
            "GET", "/a b", query="x=1+2&y=%C3%A9", headers={"X-Trace": "t1"}, timeout_seconds=DEADLINE
        )
        assert server.connections[0].requests == [
            f"GET /a%20b?x=1+2&y=%C3%A9 HTTP/1.1\r\nX-Trace: t1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        ]


async def test_a_query_with_line_breaks_cannot_break_the_request_line(session: HttpSession) -> None:
    """CR, LF, space and '#' in a query are percent-encoded, so the request line stays one line."""
    async with raw_server(answer_every_request) as server:
        origin = session.origin(server.url)
        await origin.request("GET", "/p", query="x=1 2\r\nInjected: 1#f", timeout_seconds=DEADLINE)
        assert_only_request(server, b"GET /p?x=1%202%0D%0AInjected:%201%23f HTTP/1.1")


# --- cancellation and timeouts -----------------------------------------------------------------------


async def test_a_request_cancelled_mid_answer_closes_its_connection(session: HttpSession) -> None:
    """Cancelling a request whose answer is half sent closes that connection; the next uses a new one."""
    half_sent = asyncio.Event()

    async def first_connection_answers_half(connection: RawConnection) -> None:
        if connection.number > 0:
            await answer_every_request(connection)
            return
        if await connection.next_request() is not None:
            await connection.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            half_sent.set()
            await connection.next_request()

    async with raw_server(first_connection_answers_half) as server:
        origin = session.origin(server.url)
        call = asyncio.create_task(origin.request("GET", "/half", timeout_seconds=DEADLINE))
        try:
            await asyncio.wait_for(half_sent.wait(), DEADLINE)
            assert not call.done()
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        finally:
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
        await ended(server.connections[0])
        assert (
            text(await origin.request("GET", "/next", timeout_seconds=DEADLINE)) == "connection 1 request 1"
        )
        assert len(server.connections) == 2


async def test_a_timed_out_request_raises_timeout_error_and_the_next_one_works(
    remote: Remote, session: HttpSession
) -> None:
    """A request held past timeout_seconds=0.2 raises TimeoutError; the next one uses a new connection."""
    origin = session.origin(remote.url)
    warm = await client_port(origin)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await origin.request("GET", "/wait", timeout_seconds=0.2)
    elapsed = time.monotonic() - started
    assert 0.19 <= elapsed < 10.0

    async def the_server_got_it() -> None:
        assert remote.waiting_ports == [warm]

    await eventually(the_server_got_it, within=DEADLINE, interval=0.01)
    assert await client_port(origin) != warm


# --- what is refused ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Evil\r\nInjected", "1"),
        ("X-Evil\n", "1"),
        ("X-Evil", "1\r\nInjected: 1"),
        ("X-Evil", "1\nInjected: 1"),
        ("X-Evil", "1\rInjected: 1"),
    ],
)
async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(
    session: HttpSession, name: str, value: str
) -> None:
    """A header name or value containing CR or LF raises ValueError and nothing reaches the server."""
    async with raw_server(answer_every_request) as server:
        origin = session.origin(server.url)
        with pytest.raises(ValueError, match="line break"):
            await origin.request("GET", "/evil", headers={name: value}, timeout_seconds=DEADLINE)
        await origin.request("GET", "/good", timeout_seconds=DEADLINE)
        assert_only_request(server, b"GET /good HTTP/1.1")


async def test_a_head_request_is_refused(session: HttpSession) -> None:
    """HEAD raises ValueError and nothing reaches the server."""
    async with raw_server(answer_every_request) as server:
        origin = session.origin(server.url)
        with pytest.raises(ValueError, match="HEAD"):
            await origin.request("HEAD", "/x", timeout_seconds=DEADLINE)
        await origin.request("GET", "/good", timeout_seconds=DEADLINE)
        assert_only_request(server, b"GET /good HTTP/1.1")


@pytest.mark.parametrize(
    "rest",
    [
        "plain",
        "with space",
        "100%",
        "100%25 already quoted",
        "what?x=1&y=2",
        "frag#ment",
        "a+b;c=d:e@f",
        "héllo/ünïcode/日本語",
        "all of it/ a%b ?c #d é",
    ],
)
async def test_the_path_is_quoted_so_it_arrives_as_given(
    remote: Remote, session: HttpSession, rest: str
) -> None:
    """A path with spaces, %, ?, # and non-ASCII characters reaches the route as the same path."""
    origin = session.origin(remote.url)
    answer = await origin.request("GET", f"/echo-path/{rest}", timeout_seconds=DEADLINE)
    assert answer.status == 200, answer
    assert json.loads(answer.body) == {"rest": rest}


async def test_an_encoded_query_arrives_decoded_as_given(remote: Remote, session: HttpSession) -> None:
    """A urlencoded query with spaces, &, =, ?, #, % and non-ASCII characters arrives decoded as given."""
    origin = session.origin(remote.url)
    params = {"q": "a b&c=d", "n": "5", "é": "ü?#/%+", "empty": ""}
    answer = await origin.request("GET", "/params", query=urlencode(params), timeout_seconds=DEADLINE)
    assert answer.status == 200, answer
    assert json.loads(answer.body) == params


async def test_characters_that_cannot_stand_in_a_query_are_quoted(
    remote: Remote, session: HttpSession
) -> None:
    """A query with a raw space, '#' and non-ASCII text still arrives as written."""
    origin = session.origin(remote.url)
    answer = await origin.request("GET", "/params", query="q=a b#c é&r=x", timeout_seconds=DEADLINE)
    assert answer.status == 200, answer
    assert json.loads(answer.body) == {"q": "a b#c é", "r": "x"}


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:8443",
        "http://127.0.0.1:8080/api",
        "http://127.0.0.1:8080/?q=1",
        "http://127.0.0.1:8080?q=1",
        "ftp://127.0.0.1:21",
        "127.0.0.1:8080",
        "http://:8080",
    ],
)
def test_origin_refuses_anything_but_http_host_port(url: str) -> None:
    """https URLs, URLs with a path or query, other schemes and URLs without a host raise ValueError."""
    with pytest.raises(ValueError, match="only http://host:port"):
        HttpSession().origin(url)


def test_origin_is_one_object_per_host_and_port() -> None:
    """The same host:port (with or without a trailing slash or default port) gives the same Origin."""
    session = HttpSession()
    origin = session.origin("http://127.0.0.1:8080")
    assert session.origin("http://127.0.0.1:8080/") is origin
    assert (origin.host, origin.port) == ("127.0.0.1", 8080)
    assert session.origin("http://127.0.0.1:8081") is not origin
    assert session.origin("http://localhost") is session.origin("http://localhost:80")
    assert HttpSession().origin("http://127.0.0.1:8080") is not origin


# --- interim answers and IPv6 -------------------------------------------------------------------------


async def test_an_interim_1xx_answer_is_skipped_for_the_final_one(session: HttpSession) -> None:
    """A `100 Continue` before the final answer is skipped (RFC 9110 §15.2): the caller gets the 200."""

    async def continue_then_answer(connection: RawConnection) -> None:
        while await connection.next_request() is not None:
            await connection.send(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final"))

    async with raw_server(continue_then_answer) as server:
        origin = session.origin(server.url)
        assert await origin.request("GET", "/x", timeout_seconds=DEADLINE) == HttpAnswer(200, b"final")


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback here")
async def test_an_ipv6_origin_sends_a_bracketed_host_header(session: HttpSession) -> None:
    """For http://[::1]:port the Host header is `[::1]:port` (RFC 3986 IP-literal), not `::1:port`."""
    async with raw_server(answer_every_request, host="::1") as server:
        origin = session.origin(server.url)
        assert text(await origin.request("GET", "/x", timeout_seconds=DEADLINE)) == "connection 0 request 1"
        port = server.url.rsplit(":", 1)[1]
        [head] = server.connections[0].requests
        assert f"\r\nHost: [::1]:{port}\r\n".encode() in head, head


# --- requests that must not be sent twice, or at all ------------------------------------------------


@pytest.mark.parametrize(("method", "body"), [("POST", b'{"n": 1}'), ("POST", None), ("PATCH", b"{}")])
async def test_a_non_idempotent_request_on_a_pooled_connection_closed_under_it_is_not_retried(
    session: HttpSession, method: str, body: bytes | None
) -> None:
    """A POST or PATCH on a reused connection closed unanswered raises ConnectionClosed, not retried."""

    async with raw_server(answer_once_then_close) as server:
        origin = session.origin(server.url)
        assert text(await origin.request("GET", "/first", timeout_seconds=DEADLINE)) == "connection 0"
        with pytest.raises(ConnectionClosed):
            await origin.request(method, "/second", body=body, timeout_seconds=DEADLINE)
        assert len(server.connections) == 1
        [first, second] = server.connections[0].requests
        assert first.startswith(b"GET /first HTTP/1.1\r\n")
        assert second.startswith(f"{method} /second HTTP/1.1\r\n".encode())


@pytest.mark.parametrize(
    "method", ["get", "Get", "GE T", "GET\r\n", "GET /x HTTP/1.1\r\nX:", "", "GÉT", "G-T"]
)
async def test_a_method_that_is_not_upper_case_ascii_letters_is_refused_before_anything_is_sent(
    session: HttpSession, method: str
) -> None:
    """A method with lower case, spaces, line breaks, punctuation or non-ASCII letters raises ValueError."""
    async with raw_server(answer_every_request) as server:
        origin = session.origin(server.url)
        with pytest.raises(ValueError, match="not an HTTP method"):
            await origin.request(method, "/evil", timeout_seconds=DEADLINE)
        await origin.request("GET", "/good", timeout_seconds=DEADLINE)
        assert_only_request(server, b"GET /good HTTP/1.1")


@pytest.mark.parametrize(
    "name",
    [
        "Host",
        "host",
        "Content-Length",
        "content-LENGTH",
        "Transfer-Encoding",
        "TRANSFER-ENCODING",
        "Connection",
    ],
)
async def test_a_header_the_pool_frames_itself_is_refused_before_anything_is_sent(
    session: HttpSession, name: str
) -> None:
    """Host, Content-Length, Transfer-Encoding or Connection, any case: ValueError, nothing sent."""
    async with raw_server(answer_every_request) as server:
        origin = session.origin(server.url)
        with pytest.raises(ValueError, match="set by the pool"):
            await origin.request(
                "POST", "/evil", headers={"X-Fine": "1", name: "0"}, body=b"", timeout_seconds=DEADLINE
            )
        await origin.request("GET", "/good", timeout_seconds=DEADLINE)
        assert_only_request(server, b"GET /good HTTP/1.1")


# --- answers nobody asked for ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stray",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTALE",
        # Announces more than it carries: on a reused connection the next answer would complete it.
        b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\nSTALE",
    ],
)
async def test_a_second_answer_in_the_same_write_closes_the_connection(
    session: HttpSession, stray: bytes
) -> None:
    """An answer followed, in one write, by an answer nobody asked for: that connection is not reused."""

    async def answer_the_first_request_twice(connection: RawConnection) -> None:
        while await connection.next_request() is not None:
            answer = ok(f"connection {connection.number} request {len(connection.requests)}".encode())
            if connection.number == 0 and len(connection.requests) == 1:
                answer += stray
            await connection.send(answer)

    async with raw_server(answer_the_first_request_twice) as server:
        origin = session.origin(server.url)
        first = await origin.request("GET", "/a", timeout_seconds=DEADLINE)
        assert first == HttpAnswer(200, b"connection 0 request 1")
        second = await origin.request("GET", "/b", timeout_seconds=DEADLINE)
        assert b"STALE" not in second.body, second
        assert second == HttpAnswer(200, b"connection 1 request 1")
        await ended(server.connections[0])
        assert len(server.connections) == 2
        assert [len(connection.requests) for connection in server.connections] == [1, 1]
        assert server.connections[1].requests[0].startswith(b"GET /b HTTP/1.1\r\n")
