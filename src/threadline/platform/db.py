"""A service's own database: engines, transactions, migrations (Alembic), outbox and consumer guard.

SQLite (one file per service, WAL) is the embedded default; any SQLAlchemy asyncio URL works too.
"""

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections import namedtuple
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, Protocol, TypeAlias, TypeVar, cast

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from threadline.platform.clock import utcnow
from threadline.platform.durability import current_deferral
from threadline.platform.events import Event, EventPayload
from threadline.platform.in_flight import other_requests_in_flight
from threadline.platform.pagination import PageRequest

__all__ = [
    "PLATFORM_MIGRATIONS",
    "Command",
    "Connection",
    "Database",
    "InsertIgnoringConflicts",
    "Migrations",
    "PagedQuery",
    "Query",
    "SqlStore",
    "Transaction",
    "UtcDateTime",
    "WrappedTransaction",
    "WriterSettings",
    "add_to_counter",
    "insert_ignoring_conflicts",
    "insert_many_ignoring_conflicts",
    "outbox_table",
    "page_of",
    "processed_events_table",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

Result: TypeAlias = sa.CursorResult[*tuple[Any, ...]]


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that always comes back timezone-aware UTC, whatever the database keeps."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use threadline.platform.clock.utcnow")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


chassis_metadata = sa.MetaData()

outbox_table = sa.Table(
    "outbox",
    chassis_metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(36), nullable=False, unique=True),
    sa.Column("type", sa.String(100), nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("sent_at", UtcDateTime, nullable=True),
)

processed_events_table = sa.Table(
    "processed_events",
    chassis_metadata,
    sa.Column("consumer", sa.String(100), primary_key=True),
    sa.Column("event_id", sa.String(36), primary_key=True),
    sa.Column("processed_at", UtcDateTime, nullable=False),
)

sync_marks_table = sa.Table(
    "sync_marks",
    chassis_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("syncs", sa.Integer, nullable=False),
)


class Migrations:
    """A folder of Alembic revisions with the version table that tracks it."""

    def __init__(self, folder: Path, version_table: str = "alembic_version") -> None:
        self.folder = folder
        self.version_table = version_table

    def upgrade(self, connection: sa.Connection) -> None:
        """Apply every revision not yet applied, on a synchronous connection."""
        config = Config()
        config.set_main_option("script_location", str(self.folder))
        script = ScriptDirectory.from_config(config)

        def to_head(revision: Any, _context: Any) -> Any:
            return script._upgrade_revs("head", revision)

        with EnvironmentContext(config, script, fn=to_head, destination_rev="head") as env:
            env.configure(connection=connection, version_table=self.version_table)
            with env.begin_transaction():
                env.run_migrations()


PLATFORM_MIGRATIONS = Migrations(Path(__file__).parent / "migrations", "platform_alembic_version")


class Connection(Protocol):
    """What a store runs its statements on, inside one transaction of its database."""

    events_emitted: int
    """How many events this transaction recorded in the outbox."""

    @property
    def dialect(self) -> sa.Dialect:
        """The SQL dialect, for the few statements that differ between databases."""

    async def execute(self, statement: sa.Executable, parameters: Any = None) -> Result:
        """Run one statement; the result is read before the transaction ends."""

    async def scalar(self, statement: sa.Executable) -> Any:
        """The first column of the first row, or None."""

    async def fetch(self, query: "Query", parameters: Mapping[str, Any]) -> list[Any]:
        """Every row of a prebuilt query, as the query's named tuples."""

    async def run(self, command: "Command", parameters: Mapping[str, Any]) -> int:
        """Run a prebuilt command; how many rows it changed."""

    async def run_many(self, command: "Command", rows: Sequence[Mapping[str, Any]]) -> None:
        """Run a prebuilt command once per parameter set (all with the same keys)."""


class _SyncConnection:
    """A connection whose statements run right away on the event loop's thread, or all on another one.

    SQLite answers from its page cache in microseconds, far less than handing each statement to
    a worker thread and back costs; only the commit, which waits for the disk, may leave the loop.
    A transaction opened `off_loop` (one that may take long) runs every statement on `aside`, so
    the loop keeps serving meanwhile.
    """

    __slots__ = ("_aside", "_conn", "_driver", "dialect", "events_emitted")

    def __init__(
        self, conn: sa.Connection, driver: sqlite3.Connection, aside: ThreadPoolExecutor | None = None
    ) -> None:
        self._conn = conn
        self._driver = driver
        self._aside = aside
        self.dialect = conn.dialect
        self.events_emitted = 0

    async def execute(self, statement: sa.Executable, parameters: Any = None) -> Result:
        """Run one statement."""
        if self._aside is None:
            return self._conn.execute(statement, parameters)
        return await _finished_on(self._aside, lambda: self._conn.execute(statement, parameters))

    async def scalar(self, statement: sa.Executable) -> Any:
        """The first column of the first row, or None."""
        if self._aside is None:
            return self._conn.scalar(statement)
        return await _finished_on(self._aside, lambda: self._conn.scalar(statement))

    # The three below are a request's hot path: each branches itself rather than through a helper.
    async def fetch(self, query: "Query", parameters: Mapping[str, Any]) -> list[Any]:
        """Every row of a prebuilt query, run on the driver itself."""
        if self._aside is None:
            return query.run_on_sqlite(self._driver, self.dialect, parameters)
        return await _finished_on(
            self._aside, lambda: query.run_on_sqlite(self._driver, self.dialect, parameters)
        )

    async def run(self, command: "Command", parameters: Mapping[str, Any]) -> int:
        """Run a prebuilt command on the driver itself."""
        if self._aside is None:
            return command.run_on_sqlite(self._driver, self.dialect, [parameters])
        return await _finished_on(
            self._aside, lambda: command.run_on_sqlite(self._driver, self.dialect, [parameters])
        )

    async def run_many(self, command: "Command", rows: Sequence[Mapping[str, Any]]) -> None:
        """Run a prebuilt command once per parameter set, on the driver itself."""
        if self._aside is None:
            command.run_on_sqlite(self._driver, self.dialect, rows)
            return
        await _finished_on(self._aside, lambda: command.run_on_sqlite(self._driver, self.dialect, rows))


class _AsyncConnection:
    """A connection of an asyncio driver (asyncpg, aiosqlite): every statement is awaited."""

    __slots__ = ("_conn", "dialect", "events_emitted")

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn
        self.dialect = conn.dialect
        self.events_emitted = 0

    async def execute(self, statement: sa.Executable, parameters: Any = None) -> Result:
        """Run one statement."""
        return await self._conn.execute(statement, parameters)

    async def scalar(self, statement: sa.Executable) -> Any:
        """The first column of the first row, or None."""
        return await self._conn.scalar(statement)

    async def fetch(self, query: "Query", parameters: Mapping[str, Any]) -> list[Any]:
        """Every row of a prebuilt query, through SQLAlchemy."""
        result = await self._conn.execute(query.statement, dict(parameters))
        return [query.row._make(row) for row in result]

    async def run(self, command: "Command", parameters: Mapping[str, Any]) -> int:
        """Run a prebuilt command through SQLAlchemy."""
        return int((await self._conn.execute(command.statement, dict(parameters))).rowcount)

    async def run_many(self, command: "Command", rows: Sequence[Mapping[str, Any]]) -> None:
        """Run a prebuilt command once per parameter set, through SQLAlchemy."""
        if rows:
            await self._conn.execute(command.statement, [dict(row) for row in rows])


_READERS_KEPT = 8


@dataclass(frozen=True)
class WriterSettings:
    """How a database's one writing connection is set up (SQLite through the standard driver only).

    The writer is the only connection that changes the file, so what it caches stays valid; a
    service whose writes land all over its file can keep those pages cached and copy them back
    from the WAL less often. Readers keep SQLite's defaults: every commit empties the cache of
    every other connection, and emptying a large one cost more than it saved (a feed read +9%
    with 64 MiB).
    """

    cache_mib: int | None = None
    """The writer's page cache (SQLite's default: 2 MiB)."""

    checkpoint_after_pages: int | None = None
    """How many pages the WAL holds before they are copied back into the file (default 1,000).

    A page written many times in between is copied once; readers look pages up in a longer WAL.
    """

    commit_on_loop_below_s: float = 0.002
    """A durable commit may wait for the disk on the event loop's thread while commits take less.

    Handing a commit to a thread and back cost about as much CPU as the commit itself on a
    2-core VM (78-200 us against 78-256 us): a compose commits three times. On the loop, every request
    in hand would wait for the disk behind it, so that is done only when there is none, and
    only while the disk syncs fast (the mean of recent durable commits).
    """

    def pragmas(self) -> list[str]:
        """The PRAGMA statements that apply these settings."""
        found = []
        if self.cache_mib is not None:
            found.append(f"PRAGMA cache_size=-{self.cache_mib * 1024}")
        return found


# Every commit waits until the WAL is on the disk; a non-durable write returns to this level.
_DURABLE_SYNCHRONOUS = "FULL"
_SQLITE_CHECKPOINT_PAGES = 1000
# How much the latest durable commit's time moves the mean that decides where commits run.
_SYNC_MEAN_WEIGHT = 0.2
_BUSY_RETRY_FOR_SECONDS = 10.0


class _Engine(Protocol):
    async def open(self, migrations: Sequence[Migrations]) -> None: ...

    async def close(self) -> None: ...

    def write(
        self, *, durable: bool = True, off_loop: bool = False
    ) -> AbstractAsyncContextManager[_SyncConnection | _AsyncConnection]: ...

    def read(self) -> AbstractAsyncContextManager[_SyncConnection | _AsyncConnection]: ...


class _SqliteOnLoop:
    """SQLite through the standard driver: statements on the loop's thread, commits where they cost least.

    Writes are serialized by an asyncio lock (SQLite has one writer at a time) and begin with
    BEGIN IMMEDIATE, retried without blocking the loop while another process holds the file's
    write lock. A durable commit waits for the disk on a thread of its own while anything else
    is in hand, on the loop's thread when nothing is (`WriterSettings.commit_on_loop_below_s`).
    Commits on the loop's thread never copy the WAL back into the file (a checkpoint can take
    tens of milliseconds): once the WAL file holds more than a checkpoint's worth of pages, the
    next commit goes to the thread and checkpoints there, as SQLite would have. Reads use a small
    pool of connections, each in its own snapshot (WAL), so they never wait for a writer.
    """

    def __init__(self, url: str, writer_settings: WriterSettings) -> None:
        self._url = url
        self._writer_settings = writer_settings
        self._engine: sa.Engine | None = None
        self._writer: sa.Connection | None = None
        self._idle_readers: list[_SyncConnection] = []
        self._write_lock = asyncio.Lock()
        self._writers_waiting = 0
        self._committer: ThreadPoolExecutor | None = None
        self._checkpoint_pages = writer_settings.checkpoint_after_pages or _SQLITE_CHECKPOINT_PAGES
        self._wal_path = f"{sa.make_url(url).database}-wal"
        self._wal_limit_bytes = 0
        self._recent_sync_s = 0.0

    async def open(self, migrations: Sequence[Migrations]) -> None:
        migrator = sa.create_engine(self._url, poolclass=sa.NullPool)
        _configure_sqlite(migrator, begin="BEGIN IMMEDIATE")
        try:
            with migrator.begin() as conn:
                for migration in migrations:
                    migration.upgrade(conn)
        finally:
            migrator.dispose()
        self._engine = sa.create_engine(
            self._url, poolclass=sa.NullPool, connect_args={"check_same_thread": False}
        )
        _configure_sqlite(self._engine, begin=None, temp_in_memory=True)
        self._writer = self._engine.connect()
        # The writer never waits inside SQLite for another process's lock: that would block the
        # loop. `_begin_immediate` retries instead.
        self._writer.exec_driver_sql("PRAGMA busy_timeout=0")
        for pragma in self._writer_settings.pragmas():
            self._writer.exec_driver_sql(pragma)
        # No commit checkpoints by itself: `_commit_aside` does, once the WAL file holds more than
        # a checkpoint's worth of pages, which its size tells, as SQLite cuts it back to that
        # whenever it starts over.
        page_bytes = int(self._writer.exec_driver_sql("PRAGMA page_size").scalar_one())
        self._wal_limit_bytes = self._checkpoint_pages * page_bytes
        self._writer.exec_driver_sql("PRAGMA wal_autocheckpoint=0")
        self._writer.exec_driver_sql(f"PRAGMA journal_size_limit={self._wal_limit_bytes}")
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-commit")

    async def close(self) -> None:
        async with self._write_lock:
            if self._committer is not None:
                self._committer.shutdown(wait=True)
            for conn in [self._writer, *(reader._conn for reader in self._idle_readers)]:
                if conn is not None:
                    conn.close()
            self._idle_readers.clear()
            self._writer = self._committer = None
            if self._engine is not None:
                self._engine.dispose()
            self._engine = None

    @asynccontextmanager
    async def write(self, *, durable: bool = True, off_loop: bool = False) -> AsyncIterator[_SyncConnection]:
        self._writers_waiting += 1
        try:
            await self._write_lock.acquire()
        finally:
            self._writers_waiting -= 1
        try:
            if self._writer is None or self._committer is None:
                raise RuntimeError("database is not open")
            driver = _driver(self._writer)
            if not durable:
                # WAL without a sync at commit: the change survives a crash of the process, and the
                # next durable commit's sync carries it to the disk too. (SQLite refuses to change
                # this inside a transaction.)
                driver.execute("PRAGMA synchronous=NORMAL")
            try:
                await _begin_immediate(driver)
                conn = _SyncConnection(self._writer, driver, self._committer if off_loop else None)
                try:
                    yield conn
                except BaseException:
                    driver.rollback()
                    raise
                if self._commits_on_loop(durable=durable, off_loop=off_loop):
                    self._commit_here(driver, durable=durable)
                else:
                    await self._commit_aside(self._committer, driver, durable=durable)
            finally:
                if not durable:
                    driver.execute(f"PRAGMA synchronous={_DURABLE_SYNCHRONOUS}")
        finally:
            self._write_lock.release()

    def _commits_on_loop(self, *, durable: bool, off_loop: bool) -> bool:
        """Whether this commit costs less on the loop's thread than on the committer's (see the class)."""
        if off_loop:
            return False
        if self._checkpoint_due():
            return False
        if not durable:
            # Nothing to wait for: committing takes less CPU than handing it to a thread.
            return True
        return (
            self._writers_waiting == 0
            and other_requests_in_flight() == 0
            and self._recent_sync_s < self._writer_settings.commit_on_loop_below_s
        )

    def _commit_here(self, driver: sqlite3.Connection, *, durable: bool) -> None:
        """Commit on the loop's thread; roll back if the commit fails."""
        began = time.perf_counter()
        try:
            driver.commit()
        except BaseException:
            driver.rollback()
            raise
        if durable:
            self._note_sync(time.perf_counter() - began)

    async def _commit_aside(
        self, committer: ThreadPoolExecutor, driver: sqlite3.Connection, *, durable: bool
    ) -> None:
        """Commit on the committer thread, then checkpoint there if the WAL is due; roll back if it fails."""

        def commit() -> float:
            began = time.perf_counter()
            driver.commit()
            took = time.perf_counter() - began
            if self._checkpoint_due():
                try:
                    driver.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    log.warning("checkpoint of %s failed (%s); the next commit tries again", self._url, exc)
            return took

        try:
            took = await _finished_on(committer, commit)
        except asyncio.CancelledError:
            raise
        except BaseException:
            driver.rollback()
            raise
        if durable:
            self._note_sync(took)

    def _checkpoint_due(self) -> bool:
        """Whether the WAL holds more than a checkpoint's worth of pages (see `open`)."""
        return _file_size(self._wal_path) > self._wal_limit_bytes

    def _note_sync(self, seconds: float) -> None:
        self._recent_sync_s += (seconds - self._recent_sync_s) * _SYNC_MEAN_WEIGHT

    def read(self) -> "_SqliteRead":
        return _SqliteRead(self)

    def take_reader(self) -> _SyncConnection:
        """An idle reader, or a new one."""
        if self._engine is None:
            raise RuntimeError("database is not open")
        if self._idle_readers:
            return self._idle_readers.pop()
        reader = self._engine.connect()
        return _SyncConnection(reader, _driver(reader))

    def give_back(self, reader: _SyncConnection) -> None:
        """Keep a reader whose transaction has ended for the next read, or close it."""
        if len(self._idle_readers) < _READERS_KEPT and self._engine is not None:
            self._idle_readers.append(reader)
        else:
            reader._conn.close()


class _SqliteRead(AbstractAsyncContextManager[_SyncConnection]):
    """A read transaction on one of the engine's readers (a class: a request's hot path opens two)."""

    __slots__ = ("_engine", "_reader")

    def __init__(self, engine: _SqliteOnLoop) -> None:
        self._engine = engine
        self._reader: _SyncConnection | None = None

    async def __aenter__(self) -> _SyncConnection:
        reader = self._engine.take_reader()
        try:
            reader._driver.execute("BEGIN")
        except BaseException:
            self._engine.give_back(reader)
            raise
        self._reader = reader
        return reader

    async def __aexit__(self, *_exc: object) -> None:
        reader, self._reader = self._reader, None
        assert reader is not None
        try:
            reader._driver.rollback()
        finally:
            self._engine.give_back(reader)


def _file_size(path: str) -> int:
    """A file's size in bytes; 0 if there is no such file.

    Only ever `stat`: opening and closing a file of SQLite's would drop the locks it holds on it.
    """
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _driver(conn: sa.Connection) -> sqlite3.Connection:
    driver = conn.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    return driver


async def _begin_immediate(driver: sqlite3.Connection) -> None:
    """Take the file's write lock; while another process holds it, retry without blocking the loop."""
    delay = 0.001
    deadline = time.monotonic() + _BUSY_RETRY_FOR_SECONDS
    while True:
        try:
            driver.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def _finished_on(executor: ThreadPoolExecutor, work: Callable[[], T]) -> T:
    """Run `work` on `executor`; if the caller is cancelled meanwhile, still wait for it to end.

    The connection `work` uses must not be used again (nor the write lock released) while it runs.
    """
    pending = asyncio.get_running_loop().run_in_executor(executor, work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(pending)
            break
        except asyncio.CancelledError:
            if pending.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


class _AsyncEngine:
    """Any SQLAlchemy asyncio URL (PostgreSQL with asyncpg; SQLite with aiosqlite)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._write_lock = asyncio.Lock() if url.startswith("sqlite") else None
        self._writer: AsyncEngine | None = None
        self._reader: AsyncEngine | None = None

    async def open(self, migrations: Sequence[Migrations]) -> None:
        if self._write_lock is not None:
            self._writer = create_async_engine(self._url, pool_size=1, max_overflow=0)
            self._reader = create_async_engine(self._url, pool_size=4)
            _configure_sqlite(self._writer.sync_engine, begin="BEGIN IMMEDIATE")
            _configure_sqlite(self._reader.sync_engine, begin="BEGIN")
        else:
            self._writer = self._reader = create_async_engine(self._url, pool_size=10)
        async with self._writer.begin() as conn:
            for migration in migrations:
                await conn.run_sync(migration.upgrade)

    async def close(self) -> None:
        for engine in {self._writer, self._reader} - {None}:
            assert engine is not None
            await engine.dispose()
        self._writer = self._reader = None

    @asynccontextmanager
    async def write(self, *, durable: bool = True, off_loop: bool = False) -> AsyncIterator[_AsyncConnection]:
        # Its driver never blocks the loop: `off_loop` changes nothing here.
        if self._writer is None:
            raise RuntimeError("database is not open")
        async with contextlib.AsyncExitStack() as stack:
            if self._write_lock is not None:
                await stack.enter_async_context(self._write_lock)
            conn = await stack.enter_async_context(self._writer.begin())
            if not durable and conn.dialect.name == "postgresql":
                await conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            yield _AsyncConnection(conn)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[_AsyncConnection]:
        if self._reader is None:
            raise RuntimeError("database is not open")
        async with self._reader.connect() as conn:
            yield _AsyncConnection(conn)


class Database:
    """One service's database: serialized write transactions, concurrent snapshot reads, commit hooks.

    `sqlite:///path` runs SQLite through the standard driver on the event loop's thread (see
    `_SqliteOnLoop`: a feed read took 2.4x less CPU than through aiosqlite, whose thread hand-off per
    statement dominated a request); any SQLAlchemy asyncio URL goes through its async driver.
    """

    def __init__(self, url: str, *, writer: WriterSettings = WriterSettings()) -> None:
        self.url = url
        self._events_committed_hooks: list[Callable[[], None]] = []
        self._engine: _Engine = _SqliteOnLoop(url, writer) if url.startswith("sqlite:") else _AsyncEngine(url)
        self._open = False
        # Commits made and commits known to be on the disk, counted by this process (see `sync`).
        self._commits = 0
        self._synced = 0
        self._events_deferred_up_to = 0
        self._sync_lock = asyncio.Lock()

    async def open(self, migrations: Sequence[Migrations]) -> None:
        """Connect and bring the schema up to date (chassis tables first, then the service's)."""
        await self._engine.open((PLATFORM_MIGRATIONS, *migrations))
        self._open = True

    async def close(self) -> None:
        """Release every connection."""
        self._open = False
        await self._engine.close()

    def on_events_committed(self, hook: Callable[[], None]) -> None:
        """Call `hook` after every committed write transaction that recorded events (wakes the relay)."""
        self._events_committed_hooks.append(hook)

    @asynccontextmanager
    async def write(
        self, *, durable: bool | None = None, off_loop: bool = False
    ) -> AsyncIterator[Connection]:
        """A write transaction: committed when the block ends, rolled back if it raises.

        A commit that is not `durable` returns before the disk has it: it survives the process
        crashing but may be lost with the machine. Only for bookkeeping whose loss is harmless.
        By default (None) a commit is durable, except under a deferral (an event handler's: see
        `durability`), which syncs the database before the event is acknowledged.
        A transaction that may take long (hundreds of milliseconds) asks for `off_loop`: with SQLite,
        whose statements otherwise run on the event loop's thread, they then run on another.
        """
        deferred = False
        if durable is None:
            deferral = current_deferral()
            deferred = deferral is not None and deferral.defer(self)
            durable = not deferred
        async with self._engine.write(durable=durable, off_loop=off_loop) as conn:
            yield conn
        self._commits += 1
        if conn.events_emitted:
            if deferred:
                # Its events leave the process once the relay reads them: they must not outlive it.
                self._events_deferred_up_to = self._commits
                await self.sync()
            for hook in self._events_committed_hooks:
                hook()

    async def sync_events(self) -> None:
        """Return once every event committed is on the disk (a relay's call before it reads them)."""
        if self._synced < self._events_deferred_up_to:
            await self.sync()

    async def sync(self) -> None:
        """Return once every commit made so far is on the disk; callers meanwhile share one sync.

        A durable commit of a one-row change: it waits until the log holding every earlier
        commit is on the disk (SQLite's WAL and PostgreSQL's log are both written in order).
        """
        wanted = self._commits
        if self._synced >= wanted:
            return
        async with self._sync_lock:
            if self._synced >= wanted:
                return
            covered = self._commits
            # Off the loop: it waits for everything written since the last sync, possibly megabytes.
            async with self._engine.write(durable=True, off_loop=True) as conn:
                if await conn.run(_COUNT_SYNC, {}) == 0:
                    await conn.run(_FIRST_SYNC, {})
            self._synced = covered

    def read(self) -> AbstractAsyncContextManager[Connection]:
        """A read-only transaction with a consistent snapshot."""
        return self._engine.read()

    async def ping(self) -> bool:
        """Whether the database answers a trivial query."""
        if not self._open:
            return False
        try:
            async with self.read() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except Exception:
            return False
        return True


def _configure_sqlite(engine: sa.Engine, *, begin: str | None, temp_in_memory: bool = False) -> None:
    # A statement that changes many rows inside a transaction journals the pages it touches, so
    # that it alone can be undone; past 64 KiB SQLite spills that journal to a new temporary file,
    # written page by page: a fan-out to a popular author's followers did, about every other
    # compose (fan-out and commit cost 8-12% more CPU than with the journal in memory). Migrations
    # keep files: rebuilding a table of millions of rows sorts more than memory should hold.
    temp_store = ("temp_store=MEMORY",) if temp_in_memory else ()

    @sa_event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let our code, not the driver, decide where transactions begin (BEGIN IMMEDIATE for
        # writers, so two writers queue on the lock instead of failing with "database is locked").
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            f"synchronous={_DURABLE_SYNCHRONOUS}",
            "busy_timeout=10000",
            "foreign_keys=ON",
            *temp_store,
        ):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    if begin is not None:

        @sa_event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql(begin)


class Transaction:
    """A write transaction of one service: its store adds queries, this adds events and dedup."""

    def __init__(self, conn: Connection, source: str) -> None:
        self.conn = conn
        self.source = source

    async def emit(self, payload: EventPayload) -> Event:
        """Record an event in the outbox, committed or rolled back with the state change."""
        event = Event.of(self.source, payload)
        self.conn.events_emitted += 1
        await self.conn.run(
            _OUTBOX_INSERT,
            {"event_id": event.id, "type": event.type, "body": event.to_json(), "created_at": utcnow()},
        )
        return event

    async def claim_event(self, consumer: str, event_id: str) -> bool:
        """Record that `consumer` handles `event_id`; False if it already did (a redelivery)."""
        return await insert_ignoring_conflicts(
            self.conn,
            processed_events_table,
            {"consumer": consumer, "event_id": event_id, "processed_at": utcnow()},
        )


TransactionT = TypeVar("TransactionT", bound=Transaction)


class SqlStore(Generic[TransactionT]):
    """A service's store: write and read transactions, of the service's own kind, on its database."""

    def __init__(self, db: Database, transaction: type[TransactionT], source: str) -> None:
        self._db = db
        self._transaction = transaction
        self._source = source

    @asynccontextmanager
    async def write(self) -> AsyncIterator[TransactionT]:
        """A write transaction."""
        async with self._db.write() as conn:
            yield self._transaction(conn, self._source)

    def read(self) -> AbstractAsyncContextManager[TransactionT]:
        """A read-only transaction."""
        return WrappedTransaction(self._db.read(), lambda conn: self._transaction(conn, self._source))


class WrappedTransaction(AbstractAsyncContextManager[T]):
    """A database transaction entered as what `wrap` makes of its connection.

    A class rather than a generator-based context manager: a read is on every request's path,
    and each generator layer costs a few microseconds more on the way in and out.
    """

    __slots__ = ("_inner", "_wrap")

    def __init__(
        self, inner: AbstractAsyncContextManager[Connection], wrap: Callable[[Connection], T]
    ) -> None:
        self._inner = inner
        self._wrap = wrap

    async def __aenter__(self) -> T:
        conn = await self._inner.__aenter__()
        try:
            return self._wrap(conn)
        except BaseException as exc:
            await self._inner.__aexit__(type(exc), exc, exc.__traceback__)
            raise

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._inner.__aexit__(*exc_info)


class Query:
    """A SELECT built once and run many times; its rows come back as named tuples.

    On SQLite through the standard driver (the default) the statement is compiled once and run
    on the driver itself, converting only the columns whose type needs it: SQLAlchemy's work per
    execution (cache key, execution context, result and row objects) took several times the CPU
    SQLite took to answer a feed read's three queries. Other databases run it through SQLAlchemy.
    """

    def __init__(self, statement: sa.Select[Any]) -> None:
        self.statement = statement
        # A name clash between selected columns fails here, at import, not on some request.
        self.row: Any = namedtuple("Row", [column.key for column in statement.selected_columns])  # type: ignore[misc]
        self._compiled: _CompiledForSqlite | None = None

    def run_on_sqlite(
        self, driver: sqlite3.Connection, dialect: sa.Dialect, parameters: Mapping[str, Any]
    ) -> list[Any]:
        """Every row, run on an open SQLite driver connection inside the caller's transaction."""
        compiled = self._compiled
        if compiled is None:
            compiled = self._compiled = _CompiledForSqlite(self.statement, dialect)
        sql, values = compiled.bind(parameters)
        rows = driver.execute(sql, values).fetchall()
        make = self.row._make
        converters = compiled.converters
        if not converters:
            return [make(row) for row in rows]
        converted = []
        for row in rows:
            fields = list(row)
            for index, convert in converters:
                fields[index] = convert(fields[index])
            converted.append(make(fields))
        return converted


class Command:
    """An INSERT, UPDATE or DELETE built once and run many times, the way `Query` runs a SELECT.

    An INSERT without values of its own inserts the columns its parameters name.
    """

    def __init__(self, statement: sa.Insert | sa.Update | sa.Delete) -> None:
        self.statement = statement
        self._compiled: dict[frozenset[str] | None, _CompiledForSqlite] = {}

    def run_on_sqlite(
        self, driver: sqlite3.Connection, dialect: sa.Dialect, rows: Sequence[Mapping[str, Any]]
    ) -> int:
        """Run once per parameter set on an open SQLite driver connection, in the caller's transaction.

        Gives how many rows it changed (SQLite counts them over every set; asyncpg cannot, hence
        `Connection.run_many` gives nothing).
        """
        if not rows:
            return 0
        names_columns = isinstance(self.statement, sa.Insert) and self.statement.select is None
        columns = frozenset(rows[0]) if names_columns else None
        compiled = self._compiled.get(columns)
        if compiled is None:
            compiled = self._compiled[columns] = _CompiledForSqlite(self.statement, dialect, columns)
        if len(rows) == 1:
            sql, values = compiled.bind(rows[0])
            return driver.execute(sql, values).rowcount
        bound = [compiled.bind(row) for row in rows]
        sql = bound[0][0]
        if any(other != sql for other, _ in bound):
            raise ValueError("a list parameter must have the same length in every row of one run")
        return driver.executemany(sql, [values for _, values in bound]).rowcount


class _CompiledForSqlite:
    """A statement as SQLite text with positional parameters, and the conversions its values need.

    Positional, because sqlite3 binds a list by position faster than a dict by name: a feed read's
    query for the viewer's likes among twenty posts took 9 against 17 us to run, 2 against 11 to bind.
    """

    def __init__(
        self,
        statement: sa.Select[Any] | sa.Insert | sa.Update | sa.Delete,
        dialect: sa.Dialect,
        columns: frozenset[str] | None = None,
    ) -> None:
        # The same dialect, rendering each parameter as a "?" and naming them in order.
        positional: sa.Dialect = cast(Any, type(dialect))(paramstyle="qmark")
        compiled = statement.compile(
            dialect=positional, column_keys=None if columns is None else sorted(columns)
        )
        self._sql = compiled.string
        self._defaults = {name: value for name, value in compiled.params.items() if value is not None}
        lists = {name for name, bind in compiled.binds.items() if bind.expanding}
        processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                processors[name] = process
        # Each "?" in order: its parameter, how its value is converted, and whether it is a list.
        self._slots = [(name, processors.get(name), name in lists) for name in compiled.positiontup or ()]
        self._lists = sorted(lists)
        self.converters: list[tuple[int, Callable[[Any], Any]]] = []
        selected: Sequence[sa.ColumnElement[Any]] = (
            list(statement.selected_columns) if isinstance(statement, sa.Select) else []
        )
        for index, column in enumerate(selected):
            if isinstance(column.type, UtcDateTime):
                convert: Callable[[Any], Any] | None = _utc_from_sqlite_text
            else:
                convert = column.type.dialect_impl(dialect).result_processor(dialect, None)
            if convert is not None:
                self.converters.append((index, convert))
        self._sql_by_sizes: dict[tuple[int, ...], str] = {}

    def bind(self, parameters: Mapping[str, Any]) -> tuple[str, list[Any]]:
        """The SQL text for these parameters (lists expanded) and the driver's parameter values."""
        values: list[Any] = []
        for name, process, is_list in self._slots:
            if name in parameters:
                value = parameters[name]
            elif name in self._defaults:
                value = self._defaults[name]
            else:
                raise sqlite3.ProgrammingError(f"no value was given for the parameter {name!r}")
            if not is_list:
                values.append(value if process is None else process(value))
            elif process is None:
                values.extend(value)
            else:
                values.extend(process(item) for item in value)
        if not self._lists:
            return self._sql, values
        sizes = tuple(len(parameters[name]) for name in self._lists)
        sql = self._sql_by_sizes.get(sizes)
        if sql is None:
            sql = self._sql
            for name, size in zip(self._lists, sizes, strict=True):
                sql = sql.replace(f"__[POSTCOMPILE_{name}]", ", ".join("?" * size))
            self._sql_by_sizes[sizes] = sql
        return sql, values


def _utc_from_sqlite_text(value: str | None) -> datetime | None:
    """A stored UtcDateTime as SQLAlchemy's SQLite dialect writes it (naive UTC), read in one C call.

    Read with the UTC offset appended: 0.8 us against 3.4 for reading it naive and then replacing
    its zone, which twenty posts a page paid twenty times. Text that carries a zone of its own
    (not written by SQLAlchemy) fails that way and is read as the instant it names.
    """
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value + "+00:00")
    except ValueError:
        parsed = datetime.fromisoformat(value)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


_OUTBOX_INSERT = Command(outbox_table.insert())
_COUNT_SYNC = Command(sync_marks_table.update().values(syncs=sync_marks_table.c.syncs + 1))
_FIRST_SYNC = Command(sync_marks_table.insert().values(id=1, syncs=1))


def add_to_counter(key: sa.Column[Any], counter: sa.Column[int]) -> Command:
    """A command adding its `delta` parameter to `counter` in the row whose `key` is its `key` parameter."""
    return Command(
        counter.table.update()
        .where(key == sa.bindparam("key"))
        .values({counter: counter + sa.bindparam("delta", type_=sa.Integer)})
    )


class InsertIgnoringConflicts:
    """An INSERT that skips rows clashing with a unique key: a `Command` for each dialect it runs on.

    Each dialect's own insert construct writes its ON CONFLICT clause, so the statement is built
    once per dialect rather than once. With `from_select` it inserts a query's rows (the query's
    own parameters are the command's) instead of the values it is given.
    """

    def __init__(
        self,
        table: sa.Table,
        *,
        columns: Sequence[str] = (),
        from_select: sa.Select[Any] | sa.CompoundSelect[Any] | None = None,
    ) -> None:
        if (from_select is None) != (not columns):
            raise ValueError("name the columns exactly when inserting the rows of a query")
        self._table = table
        self._columns = list(columns)
        self._from_select = from_select
        self._by_dialect: dict[str, Command] = {}

    def command(self, dialect: sa.Dialect) -> Command:
        """The command for `dialect`, built on first use."""
        command = self._by_dialect.get(dialect.name)
        if command is None:
            insert = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
            statement = insert(self._table)
            if self._from_select is not None:
                statement = statement.from_select(self._columns, self._from_select)
            command = self._by_dialect[dialect.name] = Command(statement.on_conflict_do_nothing())
        return command


# Built once per table: building a statement per call cost more CPU than running it. Keyed by
# the table itself: two services may each have a table of the same name.
_INSERTS_IGNORING_CONFLICTS: dict[sa.Table, InsertIgnoringConflicts] = {}


def _insert_ignoring_conflicts(conn: Connection, table: sa.Table) -> Command:
    insert = _INSERTS_IGNORING_CONFLICTS.get(table)
    if insert is None:
        insert = _INSERTS_IGNORING_CONFLICTS[table] = InsertIgnoringConflicts(table)
    return insert.command(conn.dialect)


async def insert_ignoring_conflicts(conn: Connection, table: sa.Table, values: dict[str, Any]) -> bool:
    """Insert a row unless it clashes with a unique key; True if it was inserted."""
    return await conn.run(_insert_ignoring_conflicts(conn, table), values) == 1


async def insert_many_ignoring_conflicts(
    conn: Connection, table: sa.Table, rows: list[dict[str, Any]]
) -> None:
    """Insert rows, skipping those that clash with a unique key."""
    await conn.run_many(_insert_ignoring_conflicts(conn, table), rows)


class PagedQuery:
    """A query read a page at a time, newest first by a time-ordered id column, built once.

    The statement's own parameters are bind parameters given to `page`; building the statement
    again for each request cost more CPU than running it. The cursor is read from the row's
    `cursor_key` column (by default the id column's own name).
    """

    def __init__(
        self, stmt: sa.Select[Any], id_column: sa.ColumnElement[str], *, cursor_key: str | None = None
    ) -> None:
        self._cursor_key: str = cursor_key or str(id_column.key)
        first = stmt.order_by(id_column.desc()).limit(sa.bindparam("page_limit", type_=sa.Integer))
        self._first = Query(first)
        self._after = Query(first.where(id_column < sa.bindparam("page_cursor")))

    @classmethod
    def of(cls, first: "Query", after: "Query", *, cursor_key: str) -> "PagedQuery":
        """A paged query whose two forms are built by the caller: `first` for the first page, `after`
        for a page after the `page_cursor` parameter; both take `page_limit` and read newest first.

        For a query the plain form cannot express, such as one that limits a part of itself.
        """
        paged = cls.__new__(cls)
        paged._cursor_key, paged._first, paged._after = cursor_key, first, after
        return paged

    async def page(
        self, conn: Connection, page: PageRequest, **parameters: Any
    ) -> tuple[list[Any], str | None]:
        """One page of rows (newest first, the query's named tuples) and the next page's cursor."""
        if page.cursor is None:
            rows = await conn.fetch(self._first, {**parameters, "page_limit": page.limit + 1})
        else:
            rows = await conn.fetch(
                self._after, {**parameters, "page_limit": page.limit + 1, "page_cursor": page.cursor}
            )
        return page_of(rows, page, lambda row: str(getattr(row, self._cursor_key)))


def page_of(
    rows: Sequence[T], page: PageRequest, cursor_of: Callable[[T], str]
) -> tuple[list[T], str | None]:
    """Split a page query's rows (one more than the page) into the page's rows and the next cursor."""
    if len(rows) <= page.limit:
        return list(rows), None
    kept = list(rows[: page.limit])
    return kept, cursor_of(kept[-1])
