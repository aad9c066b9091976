"""What every fake store shares: copy-on-write transactions, an outbox and the consumer guard.

A write transaction works on a deep copy of the state and swaps it in only when its block ends
without an exception, so a rolled-back transaction changes nothing and emits nothing, as with
the SQL stores. A read transaction refuses writes instead of silently dropping them.
"""

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from threadline.platform.events import Event, EventPayload

__all__ = ["FakeState", "FakeStore", "FakeTransaction"]


@dataclass
class FakeState:
    """The tables every service has: the consumer guard's processed events."""

    processed_events: set[tuple[str, str]] = field(default_factory=set)


S = TypeVar("S", bound=FakeState)
T = TypeVar("T", bound="FakeTransaction[Any]")
P = TypeVar("P", bound=EventPayload)


class FakeTransaction(Generic[S]):
    """One transaction over a state: its outbox, its consumer guard, and read/write access."""

    def __init__(self, state: S, source: str, *, writable: bool) -> None:
        self._state = state
        self._source = source
        self._writable = writable
        self._open = True
        self.emitted: list[EventPayload] = []

    def close(self) -> None:
        """End the transaction; any later use is a bug in the caller."""
        self._open = False

    def _read(self) -> S:
        if not self._open:
            raise RuntimeError("transaction used after its block ended")
        return self._state

    def _write(self) -> S:
        state = self._read()
        if not self._writable:
            raise RuntimeError("write attempted in a read-only transaction")
        return state

    async def emit(self, payload: EventPayload) -> Event:
        """Queue an event; the store publishes it only if the transaction commits."""
        self._write()
        self.emitted.append(payload)
        return Event.of(self._source, payload)

    async def claim_event(self, consumer: str, event_id: str) -> bool:
        """Record that `consumer` handles `event_id`; False if it already did."""
        key = (consumer, event_id)
        if key in self._read().processed_events:
            return False
        self._write().processed_events.add(key)
        return True


class FakeStore(Generic[S, T]):
    """An in-memory store: `state` is what is committed, `events` what was published, in order."""

    def __init__(self, state: S, transaction: Callable[[S, bool], T]) -> None:
        self.state = state
        self.events: list[EventPayload] = []
        self._transaction = transaction
        self._write_lock = asyncio.Lock()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[T]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        async with self._write_lock:
            draft = copy.deepcopy(self.state)
            tx = self._transaction(draft, True)
            try:
                yield tx
            finally:
                tx.close()
            self.state = draft
            self.events.extend(tx.emitted)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[T]:
        """A read-only transaction over the committed state."""
        tx = self._transaction(self.state, False)
        try:
            yield tx
        finally:
            tx.close()

    def events_of(self, kind: type[P]) -> list[P]:
        """The published events of one type, oldest first."""
        return [event for event in self.events if isinstance(event, kind)]
