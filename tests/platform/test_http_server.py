"""The services' HTTP protocol: answers arrive whole and unchanged, head and body in one write."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.servers import serving
from threadline.platform.http_server import CoalescingHttpToolsProtocol

DEADLINE_S = 10.0


class _RecordingTransport:
    """The socket's transport, recording every write that reaches it."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def recording_protocol() -> tuple[type[asyncio.Protocol], list[bytes]]:
    """The protocol under test, and the list of the writes it makes to its sockets."""
    writes: list[bytes] = []

    class Recording(CoalescingHttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(cast(Any, _RecordingTransport(transport, writes)))

    return Recording, writes


class App:
    """A JSON route, an empty answer, and streamed answers, one of them held at a gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    def __call__(self) -> Starlette:
        async def hello(_: Request) -> Response:
            return JSONResponse({"hello": "world"})

        async def empty(_: Request) -> Response:
            return Response(status_code=204)

        async def pieces() -> AsyncIterator[bytes]:
            yield b"first;"
            yield b"second;"
            yield b"third;"

        async def gated() -> AsyncIterator[bytes]:
            yield b"first;"
            yield b"second;"
            await asyncio.wait_for(self.gate.wait(), DEADLINE_S)
            yield b"third;"

        async def stream(_: Request) -> Response:
            return StreamingResponse(pieces(), media_type="text/plain")

        async def gated_stream(_: Request) -> Response:
            return StreamingResponse(gated(), media_type="text/plain")

        return Starlette(
            routes=[
                Route("/hello", hello),
                Route("/empty", empty),
                Route("/stream", stream),
                Route("/gated", gated_stream),
            ]
        )


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw keep-alive connection to the server at `url`."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return await asyncio.open_connection(parts.hostname, parts.port)


def request(path: str, *, close: bool = False) -> bytes:
    """A GET of `path`, asking the server to close the connection after it if `close`."""
    connection = b"Connection: close\r\n" if close else b""
    return b"GET %s HTTP/1.1\r\nHost: test\r\n%s\r\n" % (path.encode(), connection)


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Status line, headers (names lowercased) and body of one answer framed by Content-Length."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
    status, *lines = head[:-4].split(b"\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(b": ") for line in lines)}
    length = int(headers.get(b"content-length", b"0"))
    body = await asyncio.wait_for(reader.readexactly(length), DEADLINE_S)
    return status, headers, body


async def read_until(reader: asyncio.StreamReader, marker: bytes, received: bytearray) -> None:
    """Read into `received` until it holds `marker`; fails after the deadline."""
    async with asyncio.timeout(DEADLINE_S):
        while marker not in received:
            chunk = await reader.read(65536)
            assert chunk, f"the connection ended before {marker!r} arrived: {bytes(received)!r}"
            received += chunk


async def test_an_answer_arrives_unchanged_with_its_head_and_body_in_one_write() -> None:
    """A JSON answer: status, headers and body as the app made them, sent in a single write."""
    protocol, writes = recording_protocol()
    async with serving(App()(), http=protocol) as url:
        reader, writer = await connect(url)
        writer.write(request("/hello"))
        status, headers, body = await read_answer(reader)
        writer.close()
    assert status == b"HTTP/1.1 200 OK"
    assert headers[b"content-type"] == b"application/json"
    assert body == b'{"hello":"world"}'
    assert len(writes) == 1
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert writes[0].endswith(b'\r\n\r\n{"hello":"world"}')


async def test_answers_on_a_kept_alive_connection_each_leave_in_one_write() -> None:
    """Three requests on one connection, an empty 204 among them: three whole answers, three writes."""
    protocol, writes = recording_protocol()
    async with serving(App()(), http=protocol) as url:
        reader, writer = await connect(url)
        answers = []
        for path in ("/hello", "/empty", "/hello"):
            writer.write(request(path))
            answers.append(await read_answer(reader))
        writer.close()
    assert [(status, body) for status, _, body in answers] == [
        (b"HTTP/1.1 200 OK", b'{"hello":"world"}'),
        (b"HTTP/1.1 204 No Content", b""),
        (b"HTTP/1.1 200 OK", b'{"hello":"world"}'),
    ]
    assert len(writes) == 3
    assert [write.split(b"\r\n", 1)[0] for write in writes] == [status for status, _, _ in answers]


async def test_a_streamed_piece_is_sent_without_waiting_for_the_next_one() -> None:
    """A piece the app sent is on the wire while the app waits, before it sends another."""
    app = App()
    async with serving(app(), http=CoalescingHttpToolsProtocol) as url:
        reader, writer = await connect(url)
        writer.write(request("/gated"))
        received = bytearray()
        # Held until the next write, the second piece would never come: the app sends no more
        # until the gate opens.
        await read_until(reader, b"second;", received)
        assert b"third;" not in received
        app.gate.set()
        await read_until(reader, b"0\r\n\r\n", received)
        writer.close()
    assert received.index(b"first;") < received.index(b"second;") < received.index(b"third;")


async def test_what_is_held_is_sent_before_the_connection_closes() -> None:
    """A streamed answer on a connection the caller asked to close ends whole, then the connection does."""
    protocol, writes = recording_protocol()
    async with serving(App()(), http=protocol) as url:
        reader, writer = await connect(url)
        writer.write(request("/stream", close=True))
        received = await asyncio.wait_for(reader.read(), DEADLINE_S)  # until the server closes
        writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"transfer-encoding: chunked" in head.lower()
    # The last write, the chunked answer's terminator alone, was still held when uvicorn closed.
    assert body.endswith(b"0\r\n\r\n")
    assert [piece for piece in (b"first;", b"second;", b"third;") if piece in body] == [
        b"first;",
        b"second;",
        b"third;",
    ]
    assert b"".join(writes) == received
