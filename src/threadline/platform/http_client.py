"""Calls to another service over HTTP: JSON, deadlines, retries, circuit breaking, error mapping.

Connections are pooled by `threadline.platform.http_pool` (why it is not aiohttp is written there).
"""

import asyncio
import random
import time
from collections.abc import Mapping
from typing import Any, TypeVar
from urllib.parse import urlencode

import orjson
from pydantic import BaseModel

from threadline.platform.deadlines import DEADLINE_HEADER, remaining_seconds
from threadline.platform.errors import (
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    PaymentRequired,
    ServiceError,
    ServiceUnavailable,
    Unauthorized,
)
from threadline.platform.http_pool import IDEMPOTENT_METHODS, HttpAnswer, HttpSession
from threadline.platform.kept_json import ItemsByJson

__all__ = ["CircuitBreaker", "RetryBudget", "ServiceClient"]

_DEADLINE_HEADER = DEADLINE_HEADER.decode()
_RETRYABLE_STATUSES = frozenset({502, 503, 504})
_ERRORS_BY_STATUS: dict[int, type[ServiceError]] = {
    401: Unauthorized,
    402: PaymentRequired,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
}

ModelT = TypeVar("ModelT", bound=BaseModel)


class CircuitBreaker:
    """Opens after consecutive failures; lets one trial call through after a cool-down."""

    def __init__(self, *, failure_threshold: int = 5, reset_seconds: float = 2.0) -> None:
        self._failure_threshold = failure_threshold
        self._reset_seconds = reset_seconds
        self._failures = 0
        self._opened_at: float | None = None

    def allow(self) -> bool:
        """Whether a call may be attempted now."""
        if self._opened_at is None:
            return True
        if time.monotonic() - self._opened_at >= self._reset_seconds:
            self._opened_at = time.monotonic()  # half-open: one trial per cool-down
            return True
        return False

    def record_success(self) -> None:
        """A call got an answer: close the circuit."""
        self._failures = 0
        self._opened_at = None

    def record_failure(self) -> None:
        """A call got no answer."""
        self._failures += 1
        if self._failures >= self._failure_threshold:
            self._opened_at = time.monotonic()

    @property
    def is_open(self) -> bool:
        """Whether calls are currently refused."""
        return self._opened_at is not None


class RetryBudget:
    """Retries may add at most `ratio` of the calls made (plus a small floor), so they never storm."""

    def __init__(self, *, ratio: float = 0.2, floor: float = 10.0) -> None:
        self._ratio = ratio
        self._tokens = floor
        self._cap = floor

    def on_call(self) -> None:
        """Every first attempt earns a fraction of a retry."""
        self._tokens = min(self._cap, self._tokens + self._ratio)

    def take(self) -> bool:
        """Spend one retry if the budget has one."""
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


class ServiceClient:
    """The base of every HTTP adapter: JSON calls to one service, errors mapped back to raises."""

    def __init__(
        self,
        service: str,
        base_url: str,
        session: HttpSession,
        *,
        timeout_seconds: float = 5.0,
        retries: int = 2,
    ) -> None:
        self.service = service
        self._origin = session.origin(base_url)
        self._timeout = timeout_seconds
        self._retries = retries
        self._breaker = CircuitBreaker()
        self._budget = RetryBudget()

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str | int] | None = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
    ) -> Any:
        """Make one logical call; retries only idempotent ones. Returns the decoded JSON or None."""
        body = await self._answer_body(method, path, json, params, token, headers, idempotent)
        return orjson.loads(body) if body else None

    async def call_for(
        self,
        model: type[ModelT],
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str | int] | None = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        items: ItemsByJson | None = None,
    ) -> ModelT:
        """Make one logical call as `call` does; its answer validated as `model` straight from the bytes.

        With `items`, an answer listing frozen models takes each item seen before from there.
        An answer that does not fit `model` (or is not JSON) raises pydantic's ValidationError.
        """
        body = await self._answer_body(method, path, json, params, token, headers, idempotent)
        if items is not None:
            return items.parse(model, body)
        # From the bytes: a tenth less CPU than decoding the JSON first and validating the objects.
        return model.model_validate_json(body)

    async def _answer_body(
        self,
        method: str,
        path: str,
        json: Any,
        params: Mapping[str, str | int] | None,
        token: str | None,
        headers: Mapping[str, str] | None,
        idempotent: bool | None,
    ) -> bytes:
        request_headers = dict(headers or {})
        if token is not None:
            request_headers["Authorization"] = f"Bearer {token}"
        answer = await self.forward(
            method,
            path,
            query=urlencode(params) if params else "",
            body=None if json is None else orjson.dumps(json),
            headers=request_headers,
            idempotent=idempotent,
        )
        if answer.status >= 400:
            raise _remote_error(self.service, answer.status, answer.body, unavailable=False)
        return answer.body

    async def forward(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        body: bytes | None = None,
        headers: dict[str, str],
        idempotent: bool | None = None,
    ) -> HttpAnswer:
        """Make one logical call with a JSON `body` already encoded, and return the answer as it is.

        Retries idempotent calls, as `call` does; raises ServiceUnavailable when the service gives
        no answer or says it is unavailable. Any other answer, errors included, is returned.
        `headers` gains the deadline (and a content type with a body).
        """
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        if body is not None:
            headers["Content-Type"] = "application/json"
        self._budget.on_call()
        attempt = 0
        while True:
            try:
                return await self._attempt(method, path, query, body, headers)
            except ServiceUnavailable:
                attempt += 1
                if not idempotent or attempt > self._retries or not self._budget.take():
                    raise
                backoff = min(0.05 * 2**attempt, 0.5) * random.uniform(0.5, 1.5)
                if remaining_seconds(self._timeout) <= backoff:
                    raise
                await asyncio.sleep(backoff)

    async def _attempt(
        self, method: str, path: str, query: str, body: bytes | None, headers: dict[str, str]
    ) -> HttpAnswer:
        if not self._breaker.allow():
            raise ServiceUnavailable(self.service, "circuit open after repeated failures")
        budget = remaining_seconds(self._timeout)
        if budget <= 0:
            raise ServiceUnavailable(self.service, "deadline exceeded before the call")
        headers[_DEADLINE_HEADER] = str(int(budget * 1000))
        try:
            answer = await self._origin.request(
                method, path, query=query, headers=headers, body=body, timeout_seconds=budget
            )
        except (TimeoutError, OSError) as exc:
            self._breaker.record_failure()
            raise ServiceUnavailable(self.service, type(exc).__name__) from exc
        if answer.status in _RETRYABLE_STATUSES:
            self._breaker.record_failure()
            raise _remote_error(self.service, answer.status, answer.body, unavailable=True)
        self._breaker.record_success()
        return answer

    @property
    def circuit_open(self) -> bool:
        """Whether the breaker currently refuses calls to this service."""
        return self._breaker.is_open


def _remote_error(service: str, status: int, raw: bytes, *, unavailable: bool) -> ServiceError:
    try:
        error = orjson.loads(raw)["error"]
        code, message = str(error["code"]), str(error["message"])
        fields = error.get("fields", [])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        code, message, fields = "", "", []
    if unavailable:
        if code == "service_unavailable":
            failure = ServiceUnavailable(service, message)
            failure.message = message
            return failure
        return ServiceUnavailable(service, f"HTTP {status}")
    if status == 422 and code == "invalid_request":
        return InvalidRequest(message, fields)
    kind = _ERRORS_BY_STATUS.get(status, ServiceError)
    return kind(message or f"{service} answered HTTP {status}", code=code or None, status=status)
