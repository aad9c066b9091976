"""Deadlines that travel with a request across every service it touches."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["DEADLINE_HEADER", "deadline_scope", "remaining_seconds"]

# Milliseconds the caller is still willing to wait, sent on every service-to-service call.
DEADLINE_HEADER = b"x-threadline-timeout-ms"

_deadline: ContextVar[float | None] = ContextVar("threadline_deadline", default=None)


@contextmanager
def deadline_scope(seconds: float | None) -> Iterator[None]:
    """Within this block, no call may outlive `seconds` from now (or the enclosing deadline)."""
    if seconds is None:
        yield
        return
    new = time.monotonic() + seconds
    current = _deadline.get()
    token = _deadline.set(new if current is None else min(current, new))
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining_seconds(default: float) -> float:
    """Time left before the current deadline, at most `default`; may be zero or less."""
    deadline = _deadline.get()
    if deadline is None:
        return default
    return min(default, deadline - time.monotonic())
