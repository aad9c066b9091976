"""How many requests this process is serving: work that could hold up the event loop asks first.

A commit that waits for the disk on the loop's thread costs less CPU than one handed to a
thread and back, but every request the loop has in hand would wait behind it; so it is done
there only when there is none besides the committer's own.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["other_requests_in_flight", "serving_a_request"]

_serving: ContextVar[bool] = ContextVar("serving_a_request", default=False)


class _Tally:
    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


_in_flight = _Tally()


@contextmanager
def serving_a_request() -> Iterator[None]:
    """Count a request as in flight until the block ends; one nested in it is the same request."""
    if _serving.get():
        yield
        return
    token = _serving.set(True)
    _in_flight.count += 1
    try:
        yield
    finally:
        _in_flight.count -= 1
        _serving.reset(token)


def other_requests_in_flight() -> int:
    """How many requests this process is serving besides the one the caller serves, if any."""
    return _in_flight.count - _serving.get()
