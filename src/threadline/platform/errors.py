"""Errors every service raises, each carrying the HTTP status and machine-readable code of API.md."""

from collections.abc import Sequence
from typing import Any, ClassVar

__all__ = [
    "Conflict",
    "FieldError",
    "Forbidden",
    "InvalidRequest",
    "NotFound",
    "PaymentRequired",
    "ServiceError",
    "ServiceUnavailable",
    "Unauthorized",
    "error_body",
]


class FieldError(dict[str, str]):
    """One invalid input field: `{"field": ..., "message": ...}`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field=field, message=message)


class ServiceError(Exception):
    """An error meant for the caller: it has an HTTP status, a snake_case code and a message."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]
        if status is not None:
            self.status = status  # type: ignore[misc]

    def body(self) -> dict[str, Any]:
        """The API.md error body for this error."""
        return error_body(self.code, self.message)


class InvalidRequest(ServiceError):
    """Input that breaks a rule of the API (422)."""

    status = 422
    code = "invalid_request"

    def __init__(self, message: str, fields: Sequence[FieldError] = (), **kw: Any) -> None:
        super().__init__(message, **kw)
        self.fields = list(fields)

    def body(self) -> dict[str, Any]:
        """The error body, with the offending fields where known."""
        body = super().body()
        if self.fields:
            body["error"]["fields"] = self.fields
        return body


class Unauthorized(ServiceError):
    """No valid credentials (401)."""

    status = 401
    code = "unauthorized"


class PaymentRequired(ServiceError):
    """A payment could not be made (402)."""

    status = 402
    code = "payment_required"


class Forbidden(ServiceError):
    """Valid credentials without the right (403)."""

    status = 403
    code = "forbidden"


class NotFound(ServiceError):
    """An unknown thing (404)."""

    status = 404
    code = "not_found"


class Conflict(ServiceError):
    """A request that clashes with the current state (409)."""

    status = 409
    code = "conflict"


class ServiceUnavailable(ServiceError):
    """A required service is down (503); the message names the service."""

    status = 503
    code = "service_unavailable"

    def __init__(self, service: str, detail: str = "") -> None:
        message = f"{service} is unavailable" + (f": {detail}" if detail else "")
        super().__init__(message)
        self.service = service


def error_body(code: str, message: str) -> dict[str, Any]:
    """Build the API.md error shape."""
    return {"error": {"code": code, "message": message}}
