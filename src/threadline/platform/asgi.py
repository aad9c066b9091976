"""Straight through ASGI, for code outside FastAPI's routes: whole request bodies, API.md answers."""

import logging
from typing import Any

import orjson
from fastapi.responses import Response
from starlette.types import Receive, Send

from threadline.platform.errors import ServiceError, error_body

__all__ = ["UNEXPECTED_ERROR", "JsonResponse", "read_body", "send_error", "send_failure", "send_json"]

log = logging.getLogger(__name__)

UNEXPECTED_ERROR = "an unexpected error occurred; it has been logged"


class JsonResponse(Response):
    """A JSON response rendered with orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """Serialize `content`."""
        return orjson.dumps(content)


async def send_json(send: Send, status: int, body: Any) -> None:
    """Answer with `body` as JSON, straight through ASGI `send`."""
    response = JsonResponse(body, status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


async def send_error(send: Send, status: int, code: str, message: str) -> None:
    """Answer with an API.md error body, straight through ASGI `send`."""
    await send_json(send, status, error_body(code, message))


async def send_failure(send: Send, exc: Exception, doing: str) -> None:
    """Answer what `doing` raised: a ServiceError in its own shape, anything else logged and a 500."""
    if isinstance(exc, ServiceError):
        await send_json(send, exc.status, exc.body())
        return
    log.error("%s failed", doing, exc_info=exc)
    await send_error(send, 500, "internal_error", UNEXPECTED_ERROR)


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the caller disconnected before sending all of it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
