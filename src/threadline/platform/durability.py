"""Deferred durability: an event consumer's commits reach the disk together, before the event is acknowledged.

A consumer's writes need not each wait for the disk: until the event is acknowledged, it will
be delivered again, and the consumer's dedup makes that harmless. So while a handler runs inside
`deferring(deferral)`, every write that would wait for the disk commits without waiting and
notes its database in the deferral; whoever acknowledges the events (the outbox relay, a bus
consumer) first syncs each noted database once, then acknowledges them all (`SettleWindow`).
On a 2-core VM a disk sync cost a compose's two consumers a third of their CPU.

How long acknowledgments gather (`SettleWindow`'s window) decides how many events share a sync.
"""

import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Generic, Protocol, TypeVar

__all__ = ["SETTLE_AFTER_S", "Deferral", "SettleWindow", "Syncable", "current_deferral", "deferring"]

T = TypeVar("T")

# How long an acknowledgment may wait for the sync it shares with later ones.
SETTLE_AFTER_S = 0.05


class Syncable(Protocol):
    """A database whose commits so far can be waited onto the disk."""

    async def sync(self) -> None:
        """Return once every commit made so far is on the disk."""


class Deferral:
    """The databases that commits made under it left to be synced; closed once it settles."""

    def __init__(self) -> None:
        self._databases: dict[int, Syncable] = {}
        self._open = True

    def defer(self, database: Syncable) -> bool:
        """Note a commit to `database` that will not wait for the disk; False once settling began."""
        if self._open:
            self._databases[id(database)] = database
        return self._open

    def close(self) -> list[Syncable]:
        """The databases to sync; commits under this deferral from now on wait for the disk themselves."""
        self._open = False
        return list(self._databases.values())


_current: ContextVar[Deferral | None] = ContextVar("threadline_deferral", default=None)


@contextmanager
def deferring(deferral: Deferral) -> Iterator[Deferral]:
    """Run the block's writes under `deferral` (tasks it starts inherit it, until it settles)."""
    token = _current.set(deferral)
    try:
        yield deferral
    finally:
        _current.reset(token)


def current_deferral() -> Deferral | None:
    """The deferral the running code writes under, if any."""
    return _current.get()


class SettleWindow(Generic[T]):
    """Acknowledgments held until the writes behind them are synced: once per window, not per event.

    `acknowledge` gets the items in the order they were added, once every database their
    handlers wrote to is on the disk. An item whose handler wrote nothing deferred waits too, so
    that acknowledgments keep their order; `settle_after_s` bounds how long any waits.
    """

    def __init__(
        self,
        acknowledge: Callable[[list[T]], Awaitable[None]],
        *,
        settle_after_s: float,
        most: int,
    ) -> None:
        self._acknowledge = acknowledge
        self._settle_after_s = settle_after_s
        self._most = most
        self._items: list[T] = []
        self._deferrals: list[Deferral] = []
        self._oldest = 0.0

    def add(self, item: T, deferral: Deferral) -> None:
        """Hold `item` until `deferral`'s databases are synced."""
        if not self._items:
            self._oldest = time.monotonic()
        self._items.append(item)
        if not self._deferrals or self._deferrals[-1] is not deferral:
            self._deferrals.append(deferral)

    def newest(self) -> T | None:
        """The item added last of those waiting, if any."""
        return self._items[-1] if self._items else None

    def due_in(self) -> float | None:
        """Seconds until the held items should be settled (0 if now); None if none are held."""
        if not self._items:
            return None
        if len(self._items) >= self._most:
            return 0.0
        return max(0.0, self._oldest + self._settle_after_s - time.monotonic())

    async def settle(self) -> int:
        """Sync what the held items' handlers wrote, then acknowledge them; how many were."""
        if not self._items:
            return 0
        items, deferrals = self._items, self._deferrals
        self._items, self._deferrals = [], []
        try:
            databases = {id(db): db for deferral in deferrals for db in deferral.close()}
            for database in databases.values():
                await database.sync()
            await self._acknowledge(items)
        except BaseException:
            # Not acknowledged: hold them again (ahead of any added meanwhile) for the next try.
            self._items, self._deferrals = items + self._items, deferrals + self._deferrals
            raise
        return len(items)

    async def settle_if_due(self) -> int:
        """Settle when the window is over (or full); how many were acknowledged."""
        due = self.due_in()
        if due is None or due > 0:
            return 0
        return await self.settle()
