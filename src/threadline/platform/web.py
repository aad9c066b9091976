"""The app factory: health, readiness, metrics, deadlines, body limits and the API.md error shape."""

import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from threadline.platform.asgi import UNEXPECTED_ERROR, JsonResponse, send_error, send_failure
from threadline.platform.deadlines import DEADLINE_HEADER, deadline_scope
from threadline.platform.direct import DirectRoutes
from threadline.platform.errors import FieldError, InvalidRequest, ServiceError, error_body
from threadline.platform.in_flight import serving_a_request
from threadline.platform.tokens import TokenVerifier

__all__ = ["ReadinessCheck", "create_app"]

ReadinessCheck = Callable[[], Awaitable[bool]]

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
}


def create_app(
    *,
    title: str,
    routers: Sequence[APIRouter],
    readiness: Mapping[str, ReadinessCheck],
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    token_verifier: TokenVerifier,
    max_body_bytes: int = 64 * 1024,
    middleware: Sequence[Middleware] = (),
    direct_routes: bool = True,
) -> FastAPI:
    """Build an ASGI app serving `routers` plus /healthz, /readyz and /metrics.

    `middleware` runs inside the edge layer (body limits, deadlines, metrics), outermost first;
    both run ahead of FastAPI's own layers, and an error either raises is answered by the edge.
    With `direct_routes`, the routes `DirectRoutes` can answer skip FastAPI's per-request work
    (off only to compare the two).
    """
    app = _ServedApp(
        title=title,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.token_verifier = token_verifier
    metrics = _Metrics()

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        checks = {name: await check() for name, check in readiness.items()}
        ready = all(checks.values())
        return JsonResponse(
            {"status": "ready" if ready else "not_ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render())

    # In the order the app matches them: its own routes, then each router's.
    routes = [*app.router.routes, *(route for router in routers for route in router.routes)]
    for router in routers:
        app.include_router(router)

    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    front: ASGIApp = app.behind_front
    if direct_routes:
        front = DirectRoutes(front, routes=routes, verifier=token_verifier)
    for inner in reversed(middleware):
        front = inner.cls(front, *inner.args, **inner.kwargs)
    app.front = _EdgeMiddleware(front, max_body_bytes=max_body_bytes, metrics=metrics)
    return app


class _ServedApp(FastAPI):
    """A FastAPI app whose HTTP requests pass Threadline's own layers (`front`) before FastAPI's.

    FastAPI wraps every request in several layers of its own (telemetry, checking whether
    telemetry is configured, an error catcher, a body limit), which took a tenth of a monolith's
    feed read; the routes `DirectRoutes` answers need none of them, so the edge, the given
    middleware and `DirectRoutes` come first, and FastAPI's stack only behind them.
    """

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """HTTP through `front`; lifespan and anything else straight to FastAPI."""
        if scope["type"] == "http" and self.front is not None:
            await self.front(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def behind_front(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI's own handling of a request, for what `front` hands on."""
        await super().__call__(scope, receive, send)


async def _service_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return JsonResponse(exc.body(), status_code=exc.status)


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    fields = []
    for err in exc.errors():
        location = [str(part) for part in err.get("loc", ()) if part not in ("body", "query", "path")]
        if err.get("type") == "json_invalid":
            return JsonResponse(InvalidRequest("the request body is not valid JSON").body(), status_code=422)
        fields.append(FieldError(".".join(location) or "body", str(err.get("msg", "invalid"))))
    message = "invalid request: " + "; ".join(f"{f['field']}: {f['message']}" for f in fields)
    return JsonResponse(InvalidRequest(message, fields).body(), status_code=422)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, "error")
    detail = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return JsonResponse(error_body(code, detail), status_code=exc.status_code, headers=exc.headers)


async def _unexpected_error(_request: Request, _exc: Exception) -> Response:
    return JsonResponse(error_body("internal_error", UNEXPECTED_ERROR), status_code=500)


# Counted for a request whose caller went away before it was answered (nobody receives it; the
# number is the one proxies such as nginx log for it).
_CLIENT_CLOSED_REQUEST = 499


class _Metrics:
    """Request counts and time per route, in the Prometheus text format."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.seconds: defaultdict[tuple[str, str], float] = defaultdict(float)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests[(method, route, status)] += 1
        self.seconds[(method, route)] += seconds

    def render(self) -> str:
        lines = ["# TYPE http_requests_total counter"]
        for (method, route, status), count in sorted(self.requests.items()):
            lines.append(
                f'http_requests_total{{method="{method}",route="{route}",status="{status}"}} {count}'
            )
        lines.append("# TYPE http_request_seconds_total counter")
        for (method, route), seconds in sorted(self.seconds.items()):
            lines.append(f'http_request_seconds_total{{method="{method}",route="{route}"}} {seconds:.6f}')
        return "\n".join(lines) + "\n"


class _EdgeMiddleware:
    """Refuses oversized bodies, adopts the caller's deadline, and counts requests per route."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: _Metrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        has_body = b"content-length" in headers or b"transfer-encoding" in headers
        if has_body and headers.get(b"content-type", b"").split(b";")[0].strip() != b"application/json":
            # The API is JSON only: read every body as JSON, whatever type the client declared;
            # bodiless requests (most reads) keep their headers untouched, off the hot path.
            headers[b"content-type"] = b"application/json"
            scope = {**scope, "headers": list(headers.items())}
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await send_error(send, 413, "payload_too_large", self._too_large_message())
            return
        status = 500
        answered = caller_left = False
        received = 0

        async def limited_receive() -> Message:
            nonlocal received, caller_left
            message = await receive()
            if message["type"] == "http.disconnect" and not answered:
                caller_left = True
            elif message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge(self._too_large_message())
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
            await send(message)

        timeout_ms = headers.get(DEADLINE_HEADER)
        try:
            with deadline_scope(_parse_ms(timeout_ms)), serving_a_request():
                await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            status, answered = 413, True
            await send_error(send, 413, "payload_too_large", self._too_large_message())
        except Exception as exc:
            # What FastAPI's error layer would have made of it, had it been raised inside FastAPI.
            if answered:
                raise
            await send_failure(send, exc, f"answering {scope['method']} {scope['path']}")
            status, answered = (exc.status if isinstance(exc, ServiceError) else 500), True
        finally:
            if caller_left or not answered:
                # Whatever the app made of it (FastAPI answers a body cut short with a 400), the
                # request ended because its caller left; an exception that left no answer is a 500.
                status = _CLIENT_CLOSED_REQUEST if caller_left else 500
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.observe(scope["method"], path, status, time.perf_counter() - started)

    def _too_large_message(self) -> str:
        return f"the request body is larger than {self.max_body_bytes} bytes"


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, message: str) -> None:
        super().__init__(413, message)


def _parse_ms(raw: bytes | None) -> float | None:
    if raw is None or not raw.isdigit():
        return None
    return int(raw) / 1000
