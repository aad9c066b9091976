"""Edge routes answered by forwarding the request, as bytes, to the service whose answer it is.

Where an edge route's answer is exactly a service's internal answer (same status, same JSON),
decoding that answer into models and encoding it again, as an ordinary route does, is work
for nothing: measured here it was most of what the gateway spent on a feed read. A forwarded
route skips the gateway's routing, validation and encoding; the service validates the request
and the caller's token itself, with the same models and the same error shape, so the caller
cannot tell the difference. Deadlines, body limits and metrics still apply: this middleware
runs inside the app's edge middleware. Only requests to a service in another process are
forwarded; the edge route stays declared for the API documentation and the monolith.
A route whose target needs what its path does not hold (an author page names a handle, posts
wants an account id) gets it from its `rewrite`, which may decline: the app then answers.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from threadline.platform.asgi import read_body, send_failure
from threadline.platform.http_client import ServiceClient

__all__ = ["Forward", "Forwarding", "PathValues", "Rewrite"]

# Headers a service needs from the caller; the client adds the deadline and content type.
_FORWARDED_HEADERS = frozenset({b"authorization", b"idempotency-key"})


PathValues = Mapping[str, str]
Rewrite = Callable[[PathValues], PathValues | None]
"""Gives the target's parameters from the path's, or None to leave the request to the app."""


@dataclass(frozen=True)
class Forward:
    """An edge route whose answer is a service's internal route's answer, byte for byte.

    `path` and `target` are templates whose `{name}` segments match one path segment each;
    every name in `target` must appear in `path`, or, with `rewrite`, in what it returns.
    """

    method: str
    path: str
    service: str
    target: str
    idempotent: bool | None = None
    """Whether it may be retried; None: by its method, as `ServiceClient.call` decides."""
    rewrite: Rewrite | None = None
    """Turns the path's parameters into the target's, without I/O: it runs on every match."""

    def __post_init__(self) -> None:
        for template in (self.path, self.target):
            for segment in template.split("/"):
                braced = "{" in segment or "}" in segment
                if braced and not (_is_name(segment) and segment[1:-1].isidentifier()):
                    raise ValueError(f"{template}: a parameter must be a whole segment, as {{name}}")
        missing = set(_names(self.target)) - set(_names(self.path))
        if missing and self.rewrite is None:
            raise ValueError(f"{self.target}: {sorted(missing)} do not appear in {self.path}")


@dataclass(frozen=True)
class _Route:
    forward: Forward
    client: ServiceClient
    segments: tuple[str | None, ...]  # None where `path` has a {name}
    names: tuple[str, ...]

    def target_for(self, parts: list[str]) -> str | None:
        values: dict[str, str] = {}
        names = iter(self.names)
        for segment, part in zip(self.segments, parts, strict=True):
            if segment is None:
                if not part:
                    return None
                values[next(names)] = part
            elif segment != part:
                return None
        rewrite = self.forward.rewrite
        if rewrite is None:
            return self.forward.target.format_map(values)
        rewritten = rewrite(values)
        return None if rewritten is None else self.forward.target.format_map(rewritten)


class Forwarding:
    """ASGI middleware: requests matching a Forward go to its service; all others to `app`."""

    def __init__(
        self, app: ASGIApp, *, forwards: Sequence[Forward], clients: Mapping[str, ServiceClient]
    ) -> None:
        self.app = app
        self._routes: dict[tuple[str, int], list[_Route]] = {}
        for forward in forwards:
            segments = tuple(None if _is_name(part) else part for part in forward.path.split("/"))
            route = _Route(forward, clients[forward.service], segments, _names(forward.path))
            self._routes.setdefault((forward.method, len(segments)), []).append(route)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward a matching request; hand any other to the app."""
        if scope["type"] == "http":
            parts = scope["path"].split("/")
            for route in self._routes.get((scope["method"], len(parts)), ()):
                target = route.target_for(parts)
                if target is not None:
                    scope["route"] = route.forward
                    await self._forward(route, target, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _forward(self, route: _Route, target: str, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        if body is None:
            return  # the caller went away before sending the whole request: nothing to do for it
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in _FORWARDED_HEADERS:
                # The first of repeated headers, as FastAPI's Header() reads them.
                headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        try:
            answer = await route.client.forward(
                scope["method"],
                target,
                query=scope["query_string"].decode("latin-1"),
                body=body or None,
                headers=headers,
                idempotent=route.forward.idempotent,
            )
        except Exception as exc:
            await send_failure(send, exc, f"forwarding {scope['method']} {scope['path']}")
            return
        content: list[tuple[bytes, bytes]] = []  # 204: no content, so no content headers
        if answer.status != 204:
            content = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer.body))]
        await send({"type": "http.response.start", "status": answer.status, "headers": content})
        await send({"type": "http.response.body", "body": answer.body})


def _is_name(segment: str) -> bool:
    return segment.startswith("{") and segment.endswith("}")


def _names(template: str) -> tuple[str, ...]:
    return tuple(part[1:-1] for part in template.split("/") if _is_name(part))
