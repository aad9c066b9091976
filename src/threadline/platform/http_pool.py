"""Keep-alive HTTP/1.1 connections to other services, pooled per origin, parsed by httptools.

Why not a general-purpose client: measured here (2026-11-26, sequential GETs of a small JSON
answer over loopback, CPU time of the calling process), aiohttp's client spent ~180 µs per call
and this pool ~60 µs; httpx was slower than aiohttp. On a service-to-service hop that difference
is most of what the hop costs the caller. The pool can be this small because it only ever talks
to Threadline's own services: plain HTTP/1.1, no TLS (that belongs to the network or a mesh), no
redirects, no cookies, no HEAD requests, answers framed by Content-Length or chunked. The parser
is httptools (llhttp), the one uvicorn parses requests with.
"""

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import quote, urlsplit

import httptools

__all__ = ["IDEMPOTENT_METHODS", "ConnectionClosed", "HttpAnswer", "HttpSession", "Origin"]

DEFAULT_LIMIT_PER_ORIGIN = 100
# Idle connections are dropped before the servers' own keep-alive timeout (uvicorn's default,
# which the services keep, is 5 s), so a request rarely meets a connection being closed.
DEFAULT_IDLE_SECONDS = 4.0


# Characters an encoded query may carry as they are; anything else (spaces, line breaks, '#',
# non-ASCII) is percent-encoded so that it cannot break the request line.
_QUERY_SAFE = "!$%&'()*+,-./:;=?@_~"


IDEMPOTENT_METHODS = frozenset({"GET", "PUT", "DELETE"})
"""Methods whose request may be sent twice with the effect of once (HEAD is not supported)."""
_FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


class ConnectionClosed(ConnectionError):
    """The connection ended, or carried something that is not HTTP, before the answer was whole."""


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """A complete answer: status and body (headers are not kept: no caller needs them)."""

    status: int
    body: bytes


class _Connection(asyncio.Protocol):
    """One connection, one request at a time; httptools calls the `on_*` methods while parsing."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[HttpAnswer] | None = None
        self._body: list[bytes] = []
        self._status = 0
        self.closed = False
        self.reusable = False
        self.received_any = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport to write requests to."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Feed the parser; anything but a well-formed answer to the pending request ends the connection."""
        if self._answer is None:
            self._fail(ConnectionClosed("the server sent bytes nobody asked for"))
            return
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(ConnectionClosed(f"the answer is not valid HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail the pending request, if any: no answer is framed by the end of the connection."""
        self.closed = True
        self._fail(ConnectionClosed("the connection closed before the answer was complete"))

    def on_message_begin(self) -> None:
        """An answer starts: refuse one nobody asked for, such as a second answer in the same read."""
        if self._answer is None:
            raise ConnectionClosed("the server sent an answer nobody asked for")

    def on_headers_complete(self) -> None:
        """The status line and headers are in."""
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        """A piece of the body (de-chunked by the parser)."""
        self._body.append(body)

    def on_message_complete(self) -> None:
        """The whole answer is in: hand it over and say whether the connection may be reused."""
        if 100 <= self._status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the final one follows.
            self._body.clear()
            return
        self.reusable = self._parser.should_keep_alive()
        answer, self._answer = self._answer, None
        body = b"".join(self._body)
        self._body.clear()
        if answer is not None and not answer.done():
            answer.set_result(HttpAnswer(self._status, body))

    async def exchange(self, request: bytes) -> HttpAnswer:
        """Send one request and wait for its whole answer."""
        if self.closed or self._transport is None:
            raise ConnectionClosed("the connection is closed")
        self.reusable = False
        self.received_any = False
        self._answer = self._loop.create_future()
        self._transport.write(request)
        return await self._answer

    def close(self) -> None:
        """Close the connection now; a request in flight fails."""
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _fail(self, exc: Exception) -> None:
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_exception(exc)
        self.reusable = False
        if not self.closed:
            self.close()


class Origin:
    """Pooled keep-alive connections to one http://host:port, at most `limit` at once."""

    def __init__(self, host: str, port: int, *, limit: int, idle_seconds: float) -> None:
        self.host = host
        self.port = port
        bracketed = f"[{host}]" if ":" in host else host  # an IPv6 address
        self._host_header = f"Host: {bracketed}:{port}\r\n".encode()
        self._idle_seconds = idle_seconds
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._slots = asyncio.Semaphore(limit)

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout_seconds: float,
    ) -> HttpAnswer:
        """Send one request and return its answer; raises TimeoutError or ConnectionError.

        `path` is quoted here, so pass its parts as they are; `query` is sent as it is, already
        encoded, with anything that may not stand in a request line quoted. An idempotent
        request (GET, PUT, DELETE) that finds a pooled connection closed under it before any
        answer arrived is sent once more on a new connection: the server most likely closed it
        idle as the request was on its way. Others are not, as the server may have seen them.
        """
        request = self._encode(method, path, query, headers, body)
        async with asyncio.timeout(timeout_seconds), self._slots:
            connection = self._take_idle()
            reused = connection is not None
            if connection is None:
                connection = await self._connect()
            try:
                answer = await self._exchange(connection, request)
            except ConnectionClosed:
                if not reused or connection.received_any or method not in IDEMPOTENT_METHODS:
                    raise
                connection = await self._connect()
                answer = await self._exchange(connection, request)
            if connection.reusable and not connection.closed:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
            else:
                connection.close()
            return answer

    def close(self) -> None:
        """Close every connection, idle or busy."""
        for connection in [*self._idle, *self._busy]:
            connection.close()
        self._idle.clear()
        self._busy.clear()

    async def _exchange(self, connection: _Connection, request: bytes) -> HttpAnswer:
        self._busy.add(connection)
        try:
            return await connection.exchange(request)
        except BaseException:
            # Cancelled or failed mid-answer: what is left on the wire would confuse the next request.
            connection.close()
            raise
        finally:
            self._busy.discard(connection)

    def _take_idle(self) -> _Connection | None:
        expired_before = time.monotonic() - self._idle_seconds
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and connection.idle_since >= expired_before:
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(lambda: _Connection(loop), self.host, self.port)
        return connection

    def _encode(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str] | None,
        body: bytes | None,
    ) -> bytes:
        if method == "HEAD":
            raise ValueError("HEAD requests are not supported: their answers are framed differently")
        if not (method.isalpha() and method.isascii() and method.isupper()):
            raise ValueError(f"{method!r} is not an HTTP method")
        target = quote(path, safe="/")
        if query:
            target += "?" + quote(query, safe=_QUERY_SAFE)
        lines = [f"{method} {target} HTTP/1.1\r\n"]
        for name, value in (headers or {}).items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
                raise ValueError(f"header {name!r} cannot be sent: it contains a line break or colon")
            if name.lower() in _FRAMING_HEADERS:
                raise ValueError(f"header {name!r} is set by the pool itself")
            lines.append(f"{name}: {value}\r\n")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}\r\n")
        head = "".join(lines).encode("latin-1") + self._host_header + b"\r\n"
        return head if body is None else head + body


class HttpSession:
    """Every origin this process calls, each with its own pool of connections."""

    def __init__(
        self, *, limit_per_origin: int = DEFAULT_LIMIT_PER_ORIGIN, idle_seconds: float = DEFAULT_IDLE_SECONDS
    ) -> None:
        self._limit = limit_per_origin
        self._idle_seconds = idle_seconds
        self._origins: dict[str, Origin] = {}

    def origin(self, base_url: str) -> Origin:
        """The pool for `base_url`, which must be http://host[:port]."""
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None or parts.path not in ("", "/") or parts.query:
            raise ValueError(f"{base_url!r}: only http://host:port URLs are supported between services")
        key = f"{parts.hostname}:{parts.port or 80}"
        found = self._origins.get(key)
        if found is None:
            port = parts.port or 80
            found = Origin(parts.hostname, port, limit=self._limit, idle_seconds=self._idle_seconds)
            self._origins[key] = found
        return found

    async def close(self) -> None:
        """Close every pooled connection; later requests open new ones."""
        for origin in self._origins.values():
            origin.close()
