"""Direct routes on real sockets: answered as FastAPI answers them, and only when their inputs are valid."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import aiohttp
import pytest
from fastapi import APIRouter, Body, Depends, FastAPI, Header
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.support.polling import eventually
from tests.support.servers import serving
from tests.support.tokens import Signer
from threadline.platform.callers import Caller, Viewer
from threadline.platform.direct import DirectRoutes, is_direct
from threadline.platform.errors import NotFound
from threadline.platform.pagination import Page, Paging
from threadline.platform.tokens import TokenVerifier
from threadline.platform.web import create_app


class Item(BaseModel):
    """What the test routes answer."""

    id: str
    seen_by: str | None = None
    extra: dict[str, int] = {}


class Label(BaseModel):
    """An immutable item, the same objects in every answer: rendered once, then kept."""

    model_config = ConfigDict(frozen=True)

    id: str
    text: str | None
    at: datetime


class Shelf(Page[Label]):
    """A page of labels with a field of its own after the list."""

    degraded: list[str] = []


LABELS = [
    Label(id="l1", text='a "quoted" é ✓', at=datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=UTC)),
    Label(id="l2", text=None, at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
]


class Note(BaseModel):
    """A body the test routes take."""

    text: str = Field(max_length=10)


@dataclass
class Marks:
    """What the test routes' writes recorded."""

    marked: list[tuple[str, str]] = field(default_factory=list)
    noted: list[str] = field(default_factory=list)


def build_router(marks: Marks) -> APIRouter:
    """Routes of every kind DirectRoutes tells apart, in an order where some shadow others."""
    router = APIRouter(prefix="/items")

    @router.get("")
    async def list_items(caller: Caller, page: Paging) -> Page[Item]:
        items = [Item(id=f"{caller.handle}-{n}", extra={"limit": page.limit}) for n in range(2)]
        return Page(items=items, next_cursor=page.cursor)

    @router.get("/fixed")
    async def fixed(x_tag: Annotated[str, Header()]) -> Item:
        return Item(id="fixed", seen_by=x_tag)

    @router.get("/shelf")
    async def shelf(page: Paging) -> Shelf:
        return Shelf(
            items=LABELS[: page.limit], next_cursor=page.cursor, degraded=["x"] if page.cursor else []
        )

    @router.get("/{item_id}")
    async def get_item(viewer: Viewer, item_id: str) -> Item:
        if item_id == "missing":
            raise NotFound("no such item")
        if item_id == "boom":
            raise RuntimeError("a secret detail")
        if item_id == "misfit":
            return {"no": "id"}  # type: ignore[return-value]
        return Item(id=item_id, seen_by=viewer.handle if viewer else None)

    @router.get("/{item_id}/text")
    async def text(item_id: str) -> PlainTextResponse:
        return PlainTextResponse(f"item {item_id}")

    @router.post("/notes", status_code=201)
    async def write_note(caller: Caller, note: Note) -> Note:
        marks.noted.append(note.text)
        return note

    @router.post("/notes/embedded")
    async def embedded_note(note: Annotated[Note, Body(embed=True)]) -> Note:
        return note

    @router.put("/{item_id}/mark", status_code=204)
    async def mark(caller: Caller, item_id: str) -> Response:
        marks.marked.append((caller.handle, item_id))
        return Response(status_code=204)

    return router


class Recorder:
    """ASGI app in front of another that records which requests reached it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.paths.append(
                scope["path"] + ("?" + scope["query_string"].decode() if scope["query_string"] else "")
            )
        await self.app(scope, receive, send)


@dataclass
class Pair:
    """The same routes served with and without direct routes, and a token signer they both trust."""

    direct_url: str
    plain_url: str
    signer: Signer
    http: aiohttp.ClientSession
    marks: Marks
    app: FastAPI

    def auth(self, handle: str = "ada") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.signer.token('user-1', handle)}"}

    async def both(
        self, method: str, path: str, headers: dict[str, str] | None = None, data: bytes | None = None
    ) -> tuple[Any, Any]:
        """The answer of each app: status, body bytes and the content headers."""
        answers = []
        for url in (self.direct_url, self.plain_url):
            async with self.http.request(
                method, url + path, headers=headers, data=data, allow_redirects=False
            ) as response:
                body = await response.read()
                content = (response.headers.get("content-type"), response.headers.get("content-length"))
                answers.append((response.status, body, content))
        return answers[0], answers[1]


def _app(signer: Signer, marks: Marks, *, direct: bool) -> FastAPI:
    return create_app(
        title="direct test",
        routers=[build_router(marks)],
        readiness={},
        token_verifier=TokenVerifier(signer.jwks),
        direct_routes=direct,
    )


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    signer, marks = Signer(), Marks()
    direct, plain = _app(signer, marks, direct=True), _app(signer, marks, direct=False)
    async with serving(direct) as direct_url, serving(plain) as plain_url, aiohttp.ClientSession() as http:
        yield Pair(direct_url, plain_url, signer, http, marks, direct)


async def test_direct_routes_answer_every_request_as_the_app_does(pair: Pair) -> None:
    """Good and bad tokens, pages and paths: the same status, body and content headers with and without."""
    expired = {"Authorization": f"Bearer {pair.signer.token('user-1', 'ada', ttl_seconds=-60)}"}
    cases: list[tuple[str, str, dict[str, str] | None]] = [
        ("GET", "/items", pair.auth()),
        ("GET", "/items?limit=5&cursor=abc", pair.auth()),
        ("GET", "/items?limit=5&limit=7", pair.auth()),
        ("GET", "/items?limit=0", pair.auth()),
        ("GET", "/items?limit=abc", pair.auth()),
        ("GET", "/items?limit=101", pair.auth()),
        ("GET", "/items?cursor=" + "x" * 65, pair.auth()),
        ("GET", "/items?unknown=1&limit=", pair.auth()),
        ("GET", "/items?other=2", pair.auth()),
        ("GET", "/items", None),
        ("GET", "/items", {"Authorization": "Basic abc"}),
        ("GET", "/items", {"Authorization": "Bearer not-a-token"}),
        ("GET", "/items", expired),
        ("GET", "/items?limit=0", None),
        ("GET", "/items?limit=0", {"Authorization": "Bearer nope"}),
        ("GET", "/items/", pair.auth()),
        ("HEAD", "/items", pair.auth()),
        ("POST", "/items", pair.auth()),
        ("GET", "/items/abc", None),
        ("GET", "/items/abc", pair.auth("bob")),
        ("GET", "/items/a%20b", pair.auth()),
        ("GET", "/items/abc", {"Authorization": "Bearer nope"}),
        ("GET", "/items/missing", None),
        ("GET", "/items/boom", None),
        ("GET", "/items/misfit", None),
        ("GET", "/items/fixed", {"X-Tag": "t"}),
        ("GET", "/items/fixed", None),
        ("GET", "/items/shelf", None),
        ("GET", "/items/shelf", None),
        ("GET", "/items/shelf?limit=1&cursor=c", None),
        ("GET", "/items/abc/text", None),
        ("PUT", "/items/abc/mark", None),
        ("PUT", "/items/abc/mark", pair.auth()),
        ("GET", "/healthz", None),
        ("GET", "/nowhere", None),
    ]
    for method, path, headers in cases:
        direct, plain = await pair.both(method, path, headers)
        assert direct == plain, (method, path, headers)
    assert pair.marks.marked == [("ada", "abc"), ("ada", "abc")]


async def test_direct_routes_answer_every_body_as_the_app_does(pair: Pair) -> None:
    """Good and bad JSON bodies, with and without a token: the same answers with and without direct routes."""
    json = {**pair.auth(), "Content-Type": "application/json"}
    cases: list[tuple[str, dict[str, str] | None, bytes | None]] = [
        ("/items/notes", json, b'{"text": "hi"}'),
        ("/items/notes", json, b'{"text": "hi", "unknown": 1}'),
        ("/items/notes", {**pair.auth(), "Content-Type": "text/plain"}, b'{"text": "plain"}'),
        ("/items/notes", pair.auth(), b'{"text": "untyped"}'),
        ("/items/notes", json, b'{"text": "far too long a note"}'),
        ("/items/notes", json, b'{"text": 5}'),
        ("/items/notes", json, b'{"text": "a", "text": "b"}'),
        ("/items/notes", json, b'{"text": NaN}'),
        ("/items/notes", json, b'{"text": "\\ud800"}'),
        ("/items/notes", json, b'{"text": '),
        ("/items/notes", json, b"[]"),
        ("/items/notes", json, b""),
        ("/items/notes", json, None),
        ("/items/notes", json, b"x" * (70 * 1024)),
        ("/items/notes", {"Content-Type": "application/json"}, b'{"text": "hi"}'),
        ("/items/notes", {"Content-Type": "application/json"}, b'{"text": '),
        ("/items/notes", {"Content-Type": "application/json"}, b'{"text": 5}'),
        ("/items/notes", {"Content-Type": "application/json"}, b""),
        ("/items/notes/embedded", None, b'{"note": {"text": "hi"}}'),
        ("/items/notes/embedded", None, b'{"text": "hi"}'),
    ]
    for path, headers, data in cases:
        direct, plain = await pair.both("POST", path, headers, data)
        assert direct == plain, (path, headers, data)
    # Each accepted body once per app; a body of any declared type is read as JSON (the edge's rule).
    assert pair.marks.noted == ["hi", "hi", "hi", "hi", "plain", "plain", "untyped", "untyped", "b", "b"]


async def test_only_requests_with_valid_inputs_reach_the_app() -> None:
    """Valid input and refused tokens are answered without the app; bad input and other routes go to it."""
    signer, marks = Signer(), Marks()
    router = build_router(marks)
    plain = create_app(
        title="t",
        routers=[router],
        readiness={},
        token_verifier=TokenVerifier(signer.jwks),
        direct_routes=False,
    )
    recorder = Recorder(plain)
    routes = [*(route for route in plain.router.routes if isinstance(route, Route)), *router.routes]
    app = DirectRoutes(recorder, routes=routes, verifier=TokenVerifier(signer.jwks))
    auth = {"Authorization": f"Bearer {signer.token('user-1', 'ada')}"}
    async with serving(app) as url, aiohttp.ClientSession() as http:

        async def status(
            method: str, path: str, headers: dict[str, str] | None = None, note: dict[str, Any] | None = None
        ) -> int:
            async with http.request(
                method, url + path, headers=headers, json=note, allow_redirects=False
            ) as response:
                answers.append(await response.read())
                return response.status

        answers: list[bytes] = []
        assert await status("GET", "/items?limit=3", auth) == 200
        assert await status("GET", "/items/abc", auth) == 200
        assert await status("GET", "/items/abc") == 200
        assert await status("GET", "/items/missing") == 404
        assert await status("PUT", "/items/abc/mark", auth) == 204
        assert await status("POST", "/items/notes", auth, {"text": "hi"}) == 201
        assert recorder.paths == []
        assert await status("GET", "/items?limit=0", auth) == 422
        assert await status("GET", "/items") == 401
        assert await status("GET", "/items/abc", {"Authorization": "Bearer nope"}) == 401
        assert await status("GET", "/items/fixed", {"X-Tag": "t"}) == 200
        assert await status("GET", "/items/") == 307
        # The body this middleware read reaches the app whole: its answer names the field at fault.
        assert await status("POST", "/items/notes", auth, {"text": "far too long a note"}) == 422
        assert b'"field":"text"' in answers[-1]
    assert recorder.paths == ["/items?limit=0", "/items/fixed", "/items/", "/items/notes"]
    assert marks.marked == [("ada", "abc")]
    assert marks.noted == ["hi"]


async def test_direct_answers_are_counted_under_their_route(pair: Pair) -> None:
    """/metrics counts a directly answered request under its route's template, like any other."""
    async with pair.http.get(pair.direct_url + "/items/abc") as response:
        assert response.status == 200
    async with pair.http.get(pair.direct_url + "/metrics") as response:
        metrics = await response.text()
    assert 'http_requests_total{method="GET",route="/items/{item_id}",status="200"} 1' in metrics


def test_routes_are_direct_only_when_every_input_is_a_token_a_page_or_a_path_segment() -> None:
    """Headers, embedded bodies, sync endpoints, route dependencies, chosen response classes: not direct."""
    router = build_router(Marks())

    async def ping() -> None:
        return None

    @router.post("/body-and-header")
    async def body_and_header(note: Note, x_tag: Annotated[str, Header()]) -> Note:
        return note

    @router.get("/sync")
    def sync_route() -> Item:
        return Item(id="sync")

    @router.get("/guarded", dependencies=[Depends(ping)])
    async def guarded() -> Item:
        return Item(id="guarded")

    @router.get("/chosen", response_class=PlainTextResponse)
    async def chosen() -> str:
        return "text"

    @router.get("/counted/{n}")
    async def counted(n: int) -> Item:
        return Item(id=str(n))

    direct = {route.path: is_direct(route) for route in router.routes}  # type: ignore[attr-defined]
    assert direct == {
        "/items": True,
        "/items/fixed": False,
        "/items/shelf": True,
        "/items/{item_id}": True,
        "/items/{item_id}/text": True,
        "/items/{item_id}/mark": True,
        "/items/notes": True,
        "/items/notes/embedded": False,
        "/items/body-and-header": False,
        "/items/sync": False,
        "/items/guarded": False,
        "/items/chosen": False,
        "/items/counted/{n}": False,
    }


def test_direct_routes_refuse_routes_they_could_not_order() -> None:
    """A mount or a parameter spanning segments could shadow a direct route: refused when built."""
    router = APIRouter()

    @router.get("/files/{rest:path}")
    async def files(rest: str) -> Item:
        return Item(id=rest)

    verifier = TokenVerifier(Signer().jwks)
    with pytest.raises(ValueError, match="single-segment"):
        DirectRoutes(FastAPI(), routes=router.routes, verifier=verifier)
    with pytest.raises(ValueError, match="single-segment"):
        DirectRoutes(FastAPI(), routes=[Mount("/static", app=FastAPI())], verifier=verifier)


async def test_a_caller_leaving_mid_body_is_counted_as_such(pair: Pair) -> None:
    """A body cut short by its caller gets no answer and no 500: /metrics counts it as the caller leaving."""
    host, port = pair.direct_url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    token = pair.auth()["Authorization"]
    writer.write(
        b"POST /items/notes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: {token}\r\nContent-Length: 100\r\n\r\n".encode()
        + b'{"text": '
    )
    await writer.drain()
    writer.close()
    await writer.wait_closed()

    async def counted() -> str:
        async with pair.http.get(pair.direct_url + "/metrics") as response:
            text = await response.text()
        assert 'http_requests_total{method="POST",route="/items/notes",status="499"} 1' in text
        return text

    assert 'status="500"' not in await eventually(counted)
    assert pair.marks.noted == []
