"""Rows that a process read from a database only it writes, kept until one of its writes changes them.

A read served from memory skips the query, the driver's row and the conversion into a record:
for the twenty posts of a feed page that was a third of the read's CPU in one process.

Two rules keep it from serving a row older than the database's. A write transaction names every
row it changes, and those rows are forgotten as soon as it ends (committed or not): a read that
begins after the write answered sees the new row. And a read transaction remembers the rows it
read only if nothing was forgotten since it began, since its snapshot may be older than a write
that committed meanwhile. Both need every writer of the database to be this process, which is
how Threadline runs each service; replicas sharing a database would have to tell each other what
they changed.
"""

from collections.abc import Iterable
from typing import Generic, TypeVar

from threadline.platform.lru import LruCache

__all__ = ["RowCache"]

K = TypeVar("K")
V = TypeVar("V")


class RowCache(Generic[K, V]):
    """The `size` most recently used rows, by key; see the module for when a row may be kept."""

    def __init__(self, size: int) -> None:
        self._rows: LruCache[K, V] = LruCache(size)
        self._forgettings = 0

    def version(self) -> int:
        """Taken when a read transaction begins, and given back to `remember` for what it read."""
        return self._forgettings

    def get(self, key: K) -> V | None:
        """The remembered row of `key`, if any."""
        return self._rows.get(key)

    def remember(self, key: K, row: V, *, read_since: int) -> None:
        """Keep `row`, read by a transaction begun at version `read_since`, unless rows went since."""
        if read_since == self._forgettings:
            self._rows.put(key, row)

    def forget(self, keys: Iterable[K]) -> None:
        """Drop the rows a write transaction changed, once it ended."""
        self._forgettings += 1
        for key in keys:
            self._rows.forget(key)

    def forget_all(self) -> None:
        """Drop every row: a write changed something that many rows were built from."""
        self._forgettings += 1
        self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)
