"""Waiting for asynchronous effects: poll with a deadline, never sleep a fixed time."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T]], *, within: float = 20.0, interval: float = 0.05) -> T:
    """Call `probe` until it returns without raising AssertionError; re-raise the last one at the deadline."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await probe()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(interval)
