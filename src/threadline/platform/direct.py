"""Routes answered straight from their endpoint, without FastAPI's per-request machinery.

A route whose inputs are only the caller's token (`Caller`, `Viewer`), a page (`Paging`), path
segments and a JSON body of one model needs little of what FastAPI does around an endpoint:
matching the path against each route in turn through nested routers, solving dependencies,
several middleware layers. Measured on the monolith's reads, that work was a fifth to a third
of a request's CPU. This middleware takes such a route's inputs itself, calls the endpoint and
encodes its answer with the route's own response field, as FastAPI does, so status, headers
and bytes are the same.

Errors come in FastAPI's order and shape. Like FastAPI, it decodes the body first, then checks
the token, then the other inputs. A body that is not JSON, a bad page or body, or any route it
does not recognise goes to the app untouched (with the body it read), which answers it as it
always has; a refused token, and any error of the endpoint, are answered here in the shape of
the app's error handlers. The routes stay FastAPI's: declared once, documented in OpenAPI,
matched in the same order, and counted under their route in /metrics. It runs ahead of FastAPI's
own layers (see `web.create_app`), so FastAPI's telemetry (OpenTelemetry, when a provider is
configured; Threadline configures none yet) sees only the requests handed on: whoever adds
tracing gives the ones answered here their spans.
"""

import inspect
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, get_args, get_origin
from urllib.parse import parse_qsl

import orjson
from fastapi import params
from fastapi._compat import ModelField
from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute
from fastapi.utils import is_body_allowed_for_status_code
from pydantic import BaseModel, ValidationError
from starlette.convertors import StringConvertor
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from threadline.platform.asgi import read_body, send_failure
from threadline.platform.callers import BearerToken, first_header
from threadline.platform.errors import ServiceError
from threadline.platform.kept_json import KeptJson, Renderer, leading_list_renderer
from threadline.platform.lru import LruCache
from threadline.platform.pagination import PageQuery, Paging
from threadline.platform.tokens import TokenVerifier

__all__ = ["DirectRoutes", "is_direct"]


class _Declined(Exception):
    """The app, not this middleware, answers this request."""


@dataclass(slots=True)
class _Request:
    """What inputs are taken from; `body` (and its `json`) once read, to hand on if the app must answer."""

    headers: list[tuple[bytes, bytes]]
    query_string: bytes
    path_values: dict[str, str]
    verifier: TokenVerifier
    receive: Receive
    body: bytes | None = None
    json: Any = None

    async def read_body(self) -> None:
        """Read and decode the whole body; decline one that is empty or not JSON (FastAPI's to refuse)."""
        self.body = await read_body(self.receive)
        if self.body is None:
            raise _CallerLeft
        # JSON only (the edge middleware declares every body so); orjson accepts a subset of
        # what FastAPI's json.loads does, with the same values, and declines the rest.
        if not self.body or first_header(self.headers, b"content-type") != "application/json":
            raise _Declined
        try:
            self.json = orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise _Declined from exc

    def replaying(self) -> Receive:
        """`receive` as the app must see it: the body read here first, if any was."""
        body, receive = self.body, self.receive
        if body is None:
            return receive
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        return replay


class _CallerLeft(Exception):
    """The caller went away before sending the whole request: nobody is left to answer."""


_Input = Callable[[_Request], Awaitable[Any]]


def _path_value(name: str) -> _Input:
    async def path_value(request: _Request) -> str:
        return request.path_values[name]

    return path_value


def _identity(token: BearerToken) -> _Input:
    async def identity(request: _Request) -> Any:
        return await token.identify(request.headers, request.verifier)

    return identity


# Most requests ask for the same few pages (`?limit=20`, no cursor): each is parsed once.
_PAGES_KEPT = 256
_pages: LruCache[bytes, PageQuery] = LruCache(_PAGES_KEPT)


async def _page(request: _Request) -> PageQuery:
    page = _pages.get(request.query_string)
    if page is None:
        page = _parsed_page(request.query_string)
        _pages.put(request.query_string, page)
    return page


def _parsed_page(query_string: bytes) -> PageQuery:
    values: dict[str, str] = {}
    # The last of repeated parameters, as Starlette's `QueryParams.get` reads them.
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key in PageQuery.model_fields:
            values[key] = value
    try:
        return PageQuery.model_validate(values)
    except ValidationError as exc:
        raise _Declined from exc


def _body(field: ModelField) -> _Input:
    async def body(request: _Request) -> Any:
        value, errors = field.validate(request.json, {}, loc=("body",))
        if errors:
            raise _Declined
        return value

    return body


def _bearer_token(annotation: Any) -> BearerToken | None:
    if get_origin(annotation) is not Annotated:
        return None
    for meta in get_args(annotation)[1:]:
        if isinstance(meta, params.Depends) and isinstance(meta.dependency, BearerToken):
            return meta.dependency
    return None


def _inputs(route: APIRoute) -> dict[str, _Input] | None:
    """How to take each of the endpoint's arguments, tokens first (as FastAPI); None: it cannot be direct."""
    tokens: dict[str, _Input] = {}
    inputs: dict[str, _Input] = {}
    for name, parameter in inspect.signature(route.endpoint).parameters.items():
        annotation = parameter.annotation
        token = _bearer_token(annotation)
        if token is not None:
            tokens[name] = _identity(token)
        elif annotation == Paging:
            inputs[name] = _page
        elif annotation is str and isinstance(route.param_convertors.get(name), StringConvertor):
            inputs[name] = _path_value(name)
        elif _is_whole_body(route, name, annotation):
            assert route.body_field is not None
            inputs[name] = _body(route.body_field)
        else:
            return None
    return {**tokens, **inputs}


def _is_whole_body(route: APIRoute, name: str, annotation: Any) -> bool:
    # FastAPI validates a lone model parameter against the whole body; it names any other
    # body (several parameters, or one embedded) after the route instead.
    body = route.body_field
    return (
        inspect.isclass(annotation)
        and issubclass(annotation, BaseModel)
        and body is not None
        and body.name == name
        and body.field_info.annotation is annotation
    )


def _answers_itself(route: APIRoute) -> bool:
    annotation = inspect.signature(route.endpoint).return_annotation
    return inspect.isclass(annotation) and issubclass(annotation, Response)


def is_direct(route: BaseRoute) -> bool:
    """Whether `DirectRoutes` answers requests for `route` itself (when their inputs are valid)."""
    return isinstance(route, APIRoute) and _direct(route) is not None


def _direct(route: APIRoute) -> "_Direct | None":
    if route.dependencies or not inspect.iscoroutinefunction(route.endpoint):
        return None
    encoded = (
        route.response_field is not None
        and isinstance(route.response_class, DefaultPlaceholder)
        and is_body_allowed_for_status_code(route.status_code)
    )
    if not (encoded or (route.response_field is None and _answers_itself(route))):
        return None
    inputs = _inputs(route)
    if inputs is None:
        return None
    return _Direct(
        route,
        inputs,
        route.status_code or 200,
        reads_body=route.body_field is not None,
        render_kept=_kept_renderer(route) if encoded else None,
    )


_kept_items = {by_alias: KeptJson(by_alias=by_alias) for by_alias in (True, False)}


def _kept_renderer(route: APIRoute) -> Renderer | None:
    """For an answer listing frozen models first, rendered as FastAPI would with this route's options."""
    model = route.response_model
    plain_options = not (
        route.response_model_include
        or route.response_model_exclude
        or route.response_model_exclude_unset
        or route.response_model_exclude_defaults
        or route.response_model_exclude_none
    )
    if not (plain_options and inspect.isclass(model) and issubclass(model, BaseModel)):
        return None
    return leading_list_renderer(model, _kept_items[route.response_model_by_alias])


@dataclass(frozen=True)
class _Direct:
    route: APIRoute
    inputs: dict[str, _Input]
    status: int
    reads_body: bool
    render_kept: Renderer | None

    async def answer(self, request: _Request, scope: Scope, send: Send) -> None:
        """Answer the request; raises _Declined, having sent nothing, if the app must answer it."""
        if self.reads_body:
            await request.read_body()
        try:
            arguments = {name: await take(request) for name, take in self.inputs.items()}
        except ServiceError as exc:
            await send_failure(send, exc, "checking the token")
            return
        try:
            content = await self.route.endpoint(**arguments)
            if isinstance(content, Response):
                await content(scope, request.receive, send)
                return
            body = self._encode(content)
        except Exception as exc:
            await send_failure(send, exc, f"answering {scope['method']} {scope['path']}")
            return
        headers = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _encode(self, content: Any) -> bytes:
        route, field = self.route, self.route.response_field
        assert field is not None
        if self.render_kept is not None and type(content) is route.response_model:
            rendered = self.render_kept(content)
            if rendered is not None:
                return rendered
        value, errors = field.validate(content, {}, loc=("response",))
        if errors:
            raise TypeError(f"{route.path}: the endpoint's answer does not fit its response model: {errors}")
        encoded: bytes = field.serialize_json(
            value,
            include=route.response_model_include,
            exclude=route.response_model_exclude,
            by_alias=route.response_model_by_alias,
            exclude_unset=route.response_model_exclude_unset,
            exclude_defaults=route.response_model_exclude_defaults,
            exclude_none=route.response_model_exclude_none,
        )
        return encoded


@dataclass(frozen=True)
class _Candidate:
    regex: re.Pattern[str]
    direct: _Direct | None  # None: a route the app answers


class DirectRoutes:
    """ASGI middleware: requests for a direct route are answered here, all others by `app`.

    `routes` are every route of the app in the order the app matches them, so that a request
    goes to the route FastAPI would pick; they may hold only plain routes whose path
    parameters are single segments (no mounts, no `{name:path}`).
    """

    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute], verifier: TokenVerifier) -> None:
        self.app = app
        self._verifier = verifier
        self._candidates: dict[tuple[str, int], list[_Candidate]] = {}
        for route in routes:
            if not isinstance(route, Route) or not all(
                isinstance(convertor, StringConvertor) for convertor in route.param_convertors.values()
            ):
                raise ValueError(f"{route!r}: only routes with single-segment parameters can be matched here")
            direct = _direct(route) if isinstance(route, APIRoute) else None
            for method in route.methods or ():
                # A single-segment parameter holds no "/": only paths of as many segments can match.
                candidates = self._candidates.setdefault((method, route.path.count("/")), [])
                candidates.append(_Candidate(route.path_regex, direct))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a request for a direct route with valid inputs; hand any other to the app."""
        if scope["type"] == "http" and not scope.get("root_path"):
            path: str = scope["path"]
            for candidate in self._candidates.get((scope["method"], path.count("/")), ()):
                match = candidate.regex.match(path)
                if match is None:
                    continue
                direct = candidate.direct
                if direct is None:
                    break
                values = match.groupdict()
                request = _Request(scope["headers"], scope["query_string"], values, self._verifier, receive)
                scope["route"] = direct.route
                try:
                    await direct.answer(request, scope, send)
                except _Declined:
                    del scope["route"]
                    await self.app(scope, request.replaying(), send)
                except _CallerLeft:
                    pass  # nobody to answer; the edge middleware counts it as the caller's leaving
                return
        await self.app(scope, receive, send)
