"""Answers sent straight through ASGI, in the API.md shape, for code that runs outside FastAPI's routes."""

from typing import Any

import orjson
from fastapi.responses import Response
from starlette.types import Send

from threadline.platform.errors import error_body

__all__ = ["UNEXPECTED_ERROR", "JsonResponse", "send_error", "send_json"]

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
