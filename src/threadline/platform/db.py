"""A service's own database: engines, transactions, migrations (Alembic), outbox and consumer guard.

SQLite (one file per service, WAL) is the embedded default; any SQLAlchemy async URL works.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from threadline.platform.clock import utcnow
from threadline.platform.events import Event, EventPayload
from threadline.platform.pagination import PageRequest

__all__ = [
    "PLATFORM_MIGRATIONS",
    "Database",
    "Migrations",
    "SqlStore",
    "Transaction",
    "UtcDateTime",
    "insert_ignoring_conflicts",
    "outbox_table",
    "page_of",
    "paged",
    "processed_events_table",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


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


class Database:
    """One service's database: serialized write transactions, concurrent reads, commit hooks."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._commit_hooks: list[Callable[[], None]] = []
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        self._writer: AsyncEngine | None = None
        self._reader: AsyncEngine | None = None

    async def open(self, migrations: Sequence[Migrations]) -> None:
        """Connect and bring the schema up to date (chassis tables first, then the service's)."""
        if self.is_sqlite:
            self._writer = create_async_engine(self.url, pool_size=1, max_overflow=0)
            self._reader = create_async_engine(self.url, pool_size=4)
            _configure_sqlite(self._writer, begin="BEGIN IMMEDIATE")
            _configure_sqlite(self._reader, begin="BEGIN")
        else:
            self._writer = self._reader = create_async_engine(self.url, pool_size=10)
        async with self._writer.begin() as conn:
            for migration in (PLATFORM_MIGRATIONS, *migrations):
                await conn.run_sync(migration.upgrade)

    async def close(self) -> None:
        """Release every connection."""
        for engine in {self._writer, self._reader} - {None}:
            assert engine is not None
            await engine.dispose()
        self._writer = self._reader = None

    def on_commit(self, hook: Callable[[], None]) -> None:
        """Call `hook` after every committed write transaction (e.g. to wake the outbox relay)."""
        self._commit_hooks.append(hook)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        if self._writer is None:
            raise RuntimeError("database is not open")
        if self._write_lock is None:
            async with self._writer.begin() as conn:
                yield conn
        else:
            async with self._write_lock, self._writer.begin() as conn:
                yield conn
        for hook in self._commit_hooks:
            hook()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction with a consistent snapshot."""
        if self._reader is None:
            raise RuntimeError("database is not open")
        async with self._reader.connect() as conn:
            yield conn

    async def ping(self) -> bool:
        """Whether the database answers a trivial query."""
        try:
            async with self.read() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except Exception:
            return False
        return True


def _configure_sqlite(engine: AsyncEngine, *, begin: str) -> None:
    @sa_event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide where transactions begin (BEGIN IMMEDIATE for
        # writers, so two writers queue on the lock instead of failing with "database is locked").
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=FULL",
            "busy_timeout=10000",
            "foreign_keys=ON",
        ):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @sa_event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql(begin)


class Transaction:
    """A write transaction of one service: its store adds queries, this adds events and dedup."""

    def __init__(self, conn: AsyncConnection, source: str) -> None:
        self.conn = conn
        self.source = source

    async def emit(self, payload: EventPayload) -> Event:
        """Record an event in the outbox, committed or rolled back with the state change."""
        event = Event.of(self.source, payload)
        await self.conn.execute(
            outbox_table.insert().values(
                event_id=event.id, type=event.type, body=event.to_json(), created_at=utcnow()
            )
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

    @asynccontextmanager
    async def read(self) -> AsyncIterator[TransactionT]:
        """A read-only transaction."""
        async with self._db.read() as conn:
            yield self._transaction(conn, self._source)


async def insert_ignoring_conflicts(conn: AsyncConnection, table: sa.Table, values: dict[str, Any]) -> bool:
    """Insert a row unless it clashes with a unique key; True if it was inserted."""
    if conn.dialect.name == "postgresql":
        stmt: Any = postgresql.insert(table).on_conflict_do_nothing()
    else:
        stmt = sqlite.insert(table).on_conflict_do_nothing()
    result = await conn.execute(stmt.values(**values))
    return bool(result.rowcount == 1)


def paged(stmt: sa.Select[Any], id_column: sa.ColumnElement[str], page: PageRequest) -> sa.Select[Any]:
    """Restrict a query to one page, newest first by a time-ordered id column (one extra row)."""
    if page.cursor is not None:
        stmt = stmt.where(id_column < page.cursor)
    return stmt.order_by(id_column.desc()).limit(page.limit + 1)


def page_of(
    rows: Sequence[T], page: PageRequest, cursor_of: Callable[[T], str]
) -> tuple[list[T], str | None]:
    """Split the rows of a `paged` query into the page's rows and the next cursor."""
    if len(rows) <= page.limit:
        return list(rows), None
    kept = list(rows[: page.limit])
    return kept, cursor_of(kept[-1])
