"""A service's database on real SQLite files: migrations, transactions, the outbox and its relay."""

import asyncio
import contextlib
import dataclasses
import math
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import ClassVar

import pytest
import sqlalchemy as sa

from tests.support.databases import commit_waits_for_the_disk, syncs_written
from tests.support.polling import eventually
from tests.support.tasks import running_in_background
from threadline.platform.clock import utcnow
from threadline.platform.db import (
    Command,
    Database,
    InsertIgnoringConflicts,
    Migrations,
    PagedQuery,
    Query,
    Transaction,
    UtcDateTime,
    WriterSettings,
    insert_ignoring_conflicts,
    outbox_table,
    page_of,
    processed_events_table,
)
from threadline.platform.durability import Deferral, deferring
from threadline.platform.events import Event, EventHandler, EventPayload, InProcessBus
from threadline.platform.ids import new_id
from threadline.platform.in_flight import serving_a_request
from threadline.platform.outbox import OutboxRelay
from threadline.platform.pagination import PageRequest

SOURCE = "notes"

metadata = sa.MetaData()
notes_table = sa.Table(
    "notes",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=True),
)

FIRST_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "notes_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notes",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=True),
    )
"""

SECOND_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "notes_0002"
down_revision = "notes_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("tags", sa.Column("name", sa.String(50), primary_key=True))
"""


class NoteAdded(EventPayload):
    TYPE: ClassVar[str] = "note.added"
    note_id: str
    body: str


def write_revision(folder: Path, name: str, source: str) -> None:
    versions = folder / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    (versions / name).write_text(textwrap.dedent(source))


@pytest.fixture
def migrations(tmp_path: Path) -> Migrations:
    folder = tmp_path / "migrations"
    write_revision(folder, "0001_notes.py", FIRST_REVISION)
    return Migrations(folder, "notes_alembic_version")


@pytest.fixture(params=["sqlite", "sqlite+aiosqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite both ways (the standard driver on the loop, the default; an asyncio driver), and PostgreSQL."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_database")
        return url
    return f"{request.param}:///{tmp_path / 'notes.db'}"


@pytest.fixture
async def db(db_url: str, migrations: Migrations) -> AsyncIterator[Database]:
    database = Database(db_url)
    await database.open([migrations])
    yield database
    await database.close()


@contextlib.asynccontextmanager
async def opened_sqlite(
    path: Path, migrations: Migrations, writer: WriterSettings
) -> AsyncIterator[Database]:
    """A database on SQLite through the standard driver, open for the block."""
    database = Database(f"sqlite:///{path}", writer=writer)
    await database.open([migrations])
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def sqlite_db(tmp_path: Path, migrations: Migrations) -> AsyncIterator[Database]:
    """SQLite through the standard driver on the loop only, for what that path alone does."""
    async with opened_sqlite(tmp_path / "notes.db", migrations, WriterSettings()) as database:
        yield database


async def add_note(db: Database, body: str, *, note_id: str | None = None) -> Event:
    """One write transaction: a note and its event."""
    note_id = note_id or new_id()
    async with db.write() as conn:
        await conn.execute(notes_table.insert().values(id=note_id, body=body))
        return await Transaction(conn, SOURCE).emit(NoteAdded(note_id=note_id, body=body))


async def add_notes(db: Database, how_many: int) -> list[Event]:
    """That many notes, a transaction each; their events in order."""
    return [await add_note(db, f"note {index}") for index in range(how_many)]


async def count(db: Database, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    async with db.read() as conn:
        return int(
            (await conn.execute(sa.select(sa.func.count()).select_from(table).where(*where))).scalar_one()
        )


async def versions(db: Database, version_table: str) -> list[str]:
    async with db.read() as conn:
        return list((await conn.execute(sa.text(f"SELECT version_num FROM {version_table}"))).scalars())


async def unsent(db: Database) -> int:
    return await count(db, outbox_table, outbox_table.c.sent_at.is_(None))


class FakeBus:
    """A bus that records what it is given and fails the publishes it is told to fail."""

    def __init__(self, *, fail_first: int = 0, fail_attempts: frozenset[int] = frozenset()) -> None:
        self.published: list[Event] = []
        self.attempts = 0
        self._fail_first = fail_first
        self._fail_attempts = fail_attempts

    def subscribe(self, consumer: str, event_type: str, handler: EventHandler) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        pass

    async def publish(self, event: Event) -> None:
        self.attempts += 1
        if self.attempts <= self._fail_first or self.attempts in self._fail_attempts:
            raise ConnectionError("the bus is down")
        self.published.append(event)

    async def close(self) -> None:
        pass

    @property
    def connected(self) -> bool:
        return True

    @property
    def ids(self) -> list[str]:
        return [event.id for event in self.published]


async def test_migrations_are_idempotent_across_reopenings(db_url: str, migrations: Migrations) -> None:
    """Opening the same file again re-runs no revision and keeps the data; each version table has one row."""
    for round_ in range(3):
        database = Database(db_url)
        await database.open([migrations])
        try:
            await add_note(database, f"note {round_}")
            assert await count(database, notes_table) == round_ + 1
            assert await versions(database, "notes_alembic_version") == ["notes_0001"]
            assert await versions(database, "platform_alembic_version") == ["platform_0002"]
        finally:
            await database.close()


async def test_a_new_revision_is_applied_on_the_next_open_keeping_the_data(
    db_url: str, migrations: Migrations
) -> None:
    """A revision added between runs is applied once on open; earlier rows survive."""
    database = Database(db_url)
    await database.open([migrations])
    await add_note(database, "before the upgrade")
    await database.close()

    write_revision(migrations.folder, "0002_tags.py", SECOND_REVISION)
    database = Database(db_url)
    await database.open([migrations])
    try:
        async with database.write() as conn:
            await conn.execute(sa.text("INSERT INTO tags (name) VALUES ('news')"))
        async with database.read() as conn:
            bodies = (await conn.execute(sa.select(notes_table.c.body))).scalars().all()
        assert await versions(database, "notes_alembic_version") == ["notes_0002"]
        assert bodies == ["before the upgrade"]
    finally:
        await database.close()


async def test_a_closed_database_refuses_transactions_and_fails_its_ping(db: Database) -> None:
    """After close, write() and read() raise and ping() is False; an open one pings True."""
    assert await db.ping()
    await db.close()
    assert not await db.ping()
    with pytest.raises(RuntimeError, match="not open"):
        async with db.write():
            pass
    with pytest.raises(RuntimeError, match="not open"):
        async with db.read():
            pass


async def test_a_committed_write_keeps_the_state_change_and_its_event(db: Database) -> None:
    """The note and its outbox row commit together; the event's envelope is stored whole."""
    commits: list[int] = []
    db.on_events_committed(lambda: commits.append(1))
    event = await add_note(db, "hello")
    assert commits == [1]
    async with db.read() as conn:
        row = (await conn.execute(sa.select(outbox_table))).one()
    assert row.event_id == event.id
    assert row.type == "note.added"
    assert row.sent_at is None
    assert row.created_at.tzinfo is not None
    assert Event.from_json(row.body) == event
    assert event.source == SOURCE
    assert event.data == {"note_id": event.data["note_id"], "body": "hello"}


async def test_a_write_that_raises_rolls_back_the_state_change_and_its_event(db: Database) -> None:
    """An exception after writing leaves neither the note nor its event, and fires no commit hook."""
    commits: list[int] = []
    db.on_events_committed(lambda: commits.append(1))

    async def write_then_fail() -> None:
        async with db.write() as conn:
            note_id = new_id()
            await conn.execute(notes_table.insert().values(id=note_id, body="doomed"))
            await Transaction(conn, SOURCE).emit(NoteAdded(note_id=note_id, body="doomed"))
            await Transaction(conn, SOURCE).claim_event("indexer", "event-1")
            raise RuntimeError("failed after writing")

    with pytest.raises(RuntimeError, match="after writing"):
        await write_then_fail()
    assert await count(db, notes_table) == 0
    assert await count(db, outbox_table) == 0
    assert await count(db, processed_events_table) == 0
    assert commits == []
    await add_note(db, "the next write still works")
    assert await count(db, notes_table) == 1
    assert commits == [1]


async def test_a_non_durable_write_commits_without_a_disk_sync_and_only_itself(
    db: Database, db_url: str, migrations: Migrations
) -> None:
    """It commits for every reader, another process's included; the write after it syncs again."""
    async with db.write(durable=False) as conn:
        await conn.execute(notes_table.insert().values(id="bookkeeping", body="x"))
        waits_inside = await commit_waits_for_the_disk(conn)
    # The asyncio engine leaves SQLite's setting as it is: every commit through it waits.
    assert waits_inside is db_url.startswith("sqlite+aiosqlite")
    async with db.write() as conn:
        assert await commit_waits_for_the_disk(conn)
    other = Database(db_url)
    await other.open([migrations])
    try:
        assert await count(other, notes_table, notes_table.c.id == "bookkeeping") == 1
    finally:
        await other.close()


async def test_a_non_durable_write_that_raises_rolls_back_and_restores_the_sync(db: Database) -> None:
    """A failure inside a non-durable write leaves nothing, and the next write is durable again."""

    async def write_then_fail() -> None:
        async with db.write(durable=False) as conn:
            await conn.execute(notes_table.insert().values(id=new_id(), body="doomed"))
            raise RuntimeError("failed after writing")

    with pytest.raises(RuntimeError, match="after writing"):
        await write_then_fail()
    assert await count(db, notes_table) == 0
    async with db.write() as conn:
        assert await commit_waits_for_the_disk(conn)
        await conn.execute(notes_table.insert().values(id=new_id(), body="kept"))
    assert await count(db, notes_table) == 1


async def test_a_commit_without_events_fires_no_hook(db: Database) -> None:
    """Only transactions that recorded events wake the relay; a plain write or a read does not."""
    commits: list[int] = []
    db.on_events_committed(lambda: commits.append(1))
    async with db.write() as conn:
        await conn.execute(notes_table.insert().values(id=new_id(), body="no event"))
    async with db.read() as conn:
        await conn.execute(sa.select(notes_table))
    assert commits == []
    assert await count(db, notes_table) == 1
    await add_note(db, "with an event")
    assert commits == [1]


async def test_a_write_cancelled_while_committing_leaves_the_database_usable(db: Database) -> None:
    """Cancelling writers at any point, commit included, loses no acknowledged row and wedges nothing."""
    started = asyncio.Event()

    async def write(body: str) -> str:
        async with db.write() as conn:
            started.set()
            await conn.execute(notes_table.insert().values(id=new_id(), body=body))
        return body

    acknowledged: list[str] = []
    for round_ in range(20):
        started.clear()
        tasks = [asyncio.create_task(write(f"note {round_}.{i}")) for i in range(5)]
        await started.wait()
        for _ in range(round_ % 4):
            await asyncio.sleep(0)
        tasks[round_ % 5].cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert sum(isinstance(o, asyncio.CancelledError) for o in outcomes) <= 1
        acknowledged += [o for o in outcomes if isinstance(o, str)]
    async with db.read() as conn:
        stored = set((await conn.execute(sa.select(notes_table.c.body))).scalars())
    assert len(acknowledged) >= 80
    assert set(acknowledged) <= stored
    await add_note(db, "still writable")
    assert await count(db, notes_table) == len(stored) + 1


# Counting to two million with a recursive query: a statement that takes a while on any database.
LONG_STATEMENT = sa.text(
    "WITH RECURSIVE counter(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM counter WHERE n < 2000000) "
    "SELECT count(*) FROM counter"
)


async def ticks_during(work: Callable[[], Awaitable[object]]) -> int:
    """How many times a task asking for the loop every millisecond got it while `work` ran."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    try:
        before = ticks
        await work()
        return ticks - before
    finally:
        ticker.cancel()


async def test_an_off_loop_write_leaves_the_loop_free_during_a_long_statement(sqlite_db: Database) -> None:
    """On SQLite through the standard driver a statement holds the loop, unless its transaction is off it."""
    for off_loop in (False, True):
        async with sqlite_db.write(off_loop=off_loop) as conn:
            ticks = await ticks_during(lambda: conn.scalar(LONG_STATEMENT))
            await conn.execute(notes_table.insert().values(id=new_id(), body=f"off loop: {off_loop}"))
        assert (ticks > 0) is off_loop
    assert await count(sqlite_db, notes_table) == 2


# aiosqlite runs a cancelled statement on, its lock held: only the drivers that stop are asked to.
@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
async def test_an_off_loop_write_cancelled_mid_statement_rolls_back_and_wedges_nothing(db: Database) -> None:
    """Cancelled while its long statement runs, the transaction ends, changes nothing, and writes go on."""
    running = asyncio.Event()

    async def long_write() -> None:
        async with db.write(off_loop=True) as conn:
            await conn.execute(notes_table.insert().values(id=new_id(), body="never kept"))
            running.set()
            await conn.scalar(LONG_STATEMENT)

    task = asyncio.create_task(long_write())
    await running.wait()
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await count(db, notes_table) == 0
    await add_note(db, "still writable")
    assert await count(db, notes_table) == 1


async def loop_ran_during_commit(
    db: Database, *, durable: bool = True, body: str = "note", yield_before_commit: bool = False
) -> bool:
    """Write a note; whether the event loop ran anything else while the transaction committed.

    Nothing before the commit gives the loop up (the statements and BEGIN run on it), so a
    callback scheduled just before the block ends has run by then only if the commit was awaited
    on another thread.
    """
    ran: list[bool] = []
    async with db.write(durable=durable) as conn:
        await conn.execute(notes_table.insert().values(id=new_id(), body=body))
        if yield_before_commit:
            await asyncio.sleep(0)
        asyncio.get_running_loop().call_soon(ran.append, True)
    return bool(ran)


@contextlib.asynccontextmanager
async def another_request_in_flight() -> AsyncIterator[None]:
    """A request this process serves in another task for the length of the block."""
    answered = asyncio.Event()
    arrived = asyncio.Event()

    async def serve() -> None:
        with serving_a_request():
            arrived.set()
            await answered.wait()

    task = asyncio.create_task(serve())
    await arrived.wait()
    try:
        yield
    finally:
        answered.set()
        await task


# However slowly this machine's disk syncs, commits may stay on the loop: the tests using it are
# about what else decides.
ANY_DISK = WriterSettings(commit_on_loop_below_s=math.inf)


@pytest.fixture
async def any_disk_db(tmp_path: Path, migrations: Migrations) -> AsyncIterator[Database]:
    """SQLite through the standard driver, committing on the loop whenever nothing else is in hand."""
    async with opened_sqlite(tmp_path / "notes.db", migrations, ANY_DISK) as database:
        yield database


async def test_a_durable_commit_waits_on_the_loop_only_with_nothing_else_in_hand(
    any_disk_db: Database,
) -> None:
    """Idle, or serving only its own request, it commits on the loop; another request in flight, aside."""
    assert not await loop_ran_during_commit(any_disk_db)
    with serving_a_request():
        assert not await loop_ran_during_commit(any_disk_db)
    async with another_request_in_flight():
        assert await loop_ran_during_commit(any_disk_db)
        with serving_a_request():
            assert await loop_ran_during_commit(any_disk_db)
    assert not await loop_ran_during_commit(any_disk_db)
    assert await count(any_disk_db, notes_table) == 5


async def test_a_durable_commit_with_writers_waiting_behind_it_leaves_the_loop_to_them(
    any_disk_db: Database,
) -> None:
    """A commit that other writers queue behind waits for the disk off the loop; each write is kept."""
    # The second writer, created before the first yields, queues on the write lock meanwhile.
    first = asyncio.create_task(loop_ran_during_commit(any_disk_db, yield_before_commit=True))
    second = asyncio.create_task(add_note(any_disk_db, "second"))
    assert await first
    await second
    assert await count(any_disk_db, notes_table) == 2


async def test_commits_leave_the_loop_once_the_disk_syncs_slower_than_the_bound(
    tmp_path: Path, migrations: Migrations
) -> None:
    """With a bound no sync can meet, the first commit, measured on the loop, sends the next ones aside."""
    writer = WriterSettings(commit_on_loop_below_s=1e-9)
    async with opened_sqlite(tmp_path / "slow.db", migrations, writer) as database:
        assert not await loop_ran_during_commit(database)
        assert await loop_ran_during_commit(database)
        assert await loop_ran_during_commit(database)
        # A commit that does not wait for the disk has nothing to wait for on a thread.
        assert not await loop_ran_during_commit(database, durable=False)
        assert await count(database, notes_table) == 4


async def test_commits_on_the_loop_leave_checkpoints_to_the_committer_thread(
    tmp_path: Path, migrations: Migrations
) -> None:
    """Commits stay on the loop until the WAL is due for a checkpoint; the next one checkpoints aside.

    A checkpoint copies the WAL back into the database file and syncs it: tens of milliseconds
    that would hold up the loop. The database file grows only when one runs.
    """
    path = tmp_path / "checkpointed.db"
    writer = dataclasses.replace(ANY_DISK, checkpoint_after_pages=40)
    async with opened_sqlite(path, migrations, writer) as database:
        await add_note(database, "the WAL now exists")
        size_at_start = path.stat().st_size
        aside: list[bool] = []
        grew_on_the_loop = 0
        for _ in range(60):
            size_before = path.stat().st_size
            aside.append(await loop_ran_during_commit(database, body="x" * 4000))
            grew_on_the_loop += not aside[-1] and path.stat().st_size > size_before
        assert not any(aside[:5])
        assert 2 <= sum(aside) < 30
        assert grew_on_the_loop == 0
        assert path.stat().st_size > size_at_start + 40 * 4000
        # Each commit wrote a few pages: without the checkpoints the WAL would hold hundreds.
        assert wal_pages(database) < 60
        assert await count(database, notes_table) == 61


async def test_insert_ignoring_conflicts_tells_apart_same_named_tables_of_two_services(
    tmp_path: Path, db: Database
) -> None:
    """Two services' tables called `notes` with different columns each get their own statement."""
    other_metadata = sa.MetaData()
    other_notes = sa.Table("notes", other_metadata, sa.Column("key", sa.String(10), primary_key=True))
    other = Database(f"sqlite:///{tmp_path / 'other.db'}")
    await other.open([])
    try:
        async with other.write() as conn:
            await conn.execute(sa.text("CREATE TABLE notes (key VARCHAR(10) PRIMARY KEY)"))
        for _ in range(2):
            async with db.write() as conn:
                await insert_ignoring_conflicts(conn, notes_table, {"id": new_id(), "body": "mine"})
            async with other.write() as conn:
                await insert_ignoring_conflicts(conn, other_notes, {"key": "theirs"})
        assert await count(db, notes_table) == 2
        assert await count(other, other_notes) == 1
    finally:
        await other.close()


async def test_claim_event_admits_each_event_once_per_consumer(db: Database) -> None:
    """The first claim of (consumer, event) is True, a repeat False, another consumer True."""
    results = []
    for consumer, event_id in [("timeline", "e1"), ("timeline", "e1"), ("search", "e1"), ("timeline", "e2")]:
        async with db.write() as conn:
            results.append(await Transaction(conn, "timeline").claim_event(consumer, event_id))
    assert results == [True, False, True, True]
    async with db.write() as conn:
        assert not await Transaction(conn, "timeline").claim_event("timeline", "e1")


async def test_a_claim_rolled_back_with_its_handler_lets_the_redelivery_through(db: Database) -> None:
    """A handler that fails after claiming leaves no claim, so the redelivered event is handled."""

    async def handle_then_fail() -> None:
        async with db.write() as conn:
            assert await Transaction(conn, "timeline").claim_event("timeline", "e1")
            raise ValueError("handler failed")

    with pytest.raises(ValueError, match="handler failed"):
        await handle_then_fail()
    async with db.write() as conn:
        assert await Transaction(conn, "timeline").claim_event("timeline", "e1")


async def test_drain_publishes_pending_events_in_outbox_order_and_marks_them_sent(db: Database) -> None:
    """Every unsent event goes to the bus oldest first, once; a second drain has nothing to do."""
    bus = FakeBus()
    relay = OutboxRelay(db, bus, name=SOURCE, poll_seconds=30)
    emitted = await add_notes(db, 5)
    async with db.write() as conn:
        transaction = Transaction(conn, SOURCE)
        emitted += [await transaction.emit(NoteAdded(note_id=new_id(), body=f"batch {i}")) for i in range(3)]
    assert await relay.drain() == 8
    assert bus.ids == [event.id for event in emitted]
    assert bus.published == emitted
    assert await unsent(db) == 0
    assert await relay.drain() == 0
    assert len(bus.published) == 8


async def test_drain_reads_in_batches_without_losing_or_reordering(db: Database) -> None:
    """With a batch smaller than the backlog, every event still goes out once, in order."""
    bus = FakeBus()
    relay = OutboxRelay(db, bus, name=SOURCE, poll_seconds=30, batch=3)
    emitted = await add_notes(db, 10)
    assert await relay.drain() == 10
    assert bus.ids == [event.id for event in emitted]


async def test_a_failed_publish_leaves_the_event_unsent_for_the_next_drain(db: Database) -> None:
    """When publishing the second event fails, the first stays sent and the rest are published next time."""
    bus = FakeBus(fail_attempts=frozenset({2}))
    relay = OutboxRelay(db, bus, name=SOURCE, poll_seconds=30)
    emitted = await add_notes(db, 3)
    with pytest.raises(ConnectionError):
        await relay.drain()
    assert bus.ids == [emitted[0].id]
    assert await unsent(db) == 2
    assert await relay.drain() == 2
    assert bus.ids == [event.id for event in emitted]
    assert await unsent(db) == 0


async def test_the_running_relay_retries_a_failing_bus_until_every_event_is_delivered(db: Database) -> None:
    """A bus failing its first publishes gets every event eventually, in order, none lost or doubled."""
    bus = FakeBus(fail_first=3)
    relay = OutboxRelay(db, bus, name=SOURCE, poll_seconds=0.05)
    emitted = await add_notes(db, 4)
    async with running_in_background(relay.run()):

        async def all_delivered() -> None:
            assert bus.ids == [event.id for event in emitted]
            assert await unsent(db) == 0

        await eventually(all_delivered, within=15)
    assert bus.attempts == 4 + 3


async def test_a_commit_wakes_the_relay_without_waiting_for_the_poll(db: Database) -> None:
    """With a 30 s poll interval, an event committed while the relay idles is delivered within seconds."""
    bus = InProcessBus()
    received: list[Event] = []

    async def handler(event: Event) -> None:
        received.append(event)

    bus.subscribe("indexer", NoteAdded.TYPE, handler)
    relay = OutboxRelay(db, bus, name=SOURCE, poll_seconds=30)
    async with running_in_background(relay.run()):
        first = await add_note(db, "first")

        async def delivered(expected: list[Event]) -> None:
            assert received == expected
            assert await unsent(db) == 0

        await eventually(lambda: delivered([first]), within=5)
        second = await add_note(db, "second")
        await eventually(lambda: delivered([first, second]), within=5)
        third = await add_note(db, "third")
        await eventually(lambda: delivered([first, second, third]), within=5)


async def test_a_relay_cancelled_as_it_is_woken_still_stops(db: Database) -> None:
    """A cancellation that arrives together with a wake-up is not lost (it would hang every shutdown)."""
    relay = OutboxRelay(db, FakeBus(), name=SOURCE, poll_seconds=30)
    for _ in range(20):
        task = asyncio.create_task(relay.run())
        for _ in range(5):
            await asyncio.sleep(0)
        relay.wake()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=10)
        assert done, "the relay ignored its cancellation"


async def test_a_failing_in_process_handler_leaves_the_event_to_be_delivered_again(db: Database) -> None:
    """An in-process consumer that raises keeps the event unsent; the next drain delivers it again."""
    bus = InProcessBus()
    attempts: list[str] = []

    async def handler(event: Event) -> None:
        attempts.append(event.id)
        if len(attempts) == 1:
            raise RuntimeError("consumer failed")

    bus.subscribe("indexer", NoteAdded.TYPE, handler)
    relay = OutboxRelay(db, bus, name=SOURCE, poll_seconds=30)
    event = await add_note(db, "retry me")
    with pytest.raises(RuntimeError, match="consumer failed"):
        await relay.drain()
    assert await unsent(db) == 1
    assert await relay.drain() == 1
    assert attempts == [event.id, event.id]
    assert await unsent(db) == 0


async def test_a_write_under_a_deferral_does_not_wait_for_the_disk_and_notes_its_database(
    db: Database, db_url: str
) -> None:
    """A handler's write leaves its sync to the deferral; one asked to be durable, or outside, waits."""
    deferral = Deferral()
    with deferring(deferral):
        async with db.write() as conn:
            await conn.execute(notes_table.insert().values(id=new_id(), body="handled"))
            deferred_waits = await commit_waits_for_the_disk(conn)
        async with db.write(durable=True) as conn:
            asked_waits = await commit_waits_for_the_disk(conn)
    async with db.write() as conn:
        outside_waits = await commit_waits_for_the_disk(conn)
    # The asyncio engine leaves SQLite's setting as it is: every commit through it waits.
    assert deferred_waits is db_url.startswith("sqlite+aiosqlite")
    assert asked_waits
    assert outside_waits
    assert deferral.close() == [db]
    assert await count(db, notes_table) == 1


async def test_a_closed_deferral_defers_no_more_writes(db: Database) -> None:
    """A task a handler left behind that writes after its event was settled waits for the disk itself."""
    deferral = Deferral()
    deferral.close()
    with deferring(deferral):
        async with db.write() as conn:
            assert await commit_waits_for_the_disk(conn)
    assert deferral.close() == []


async def test_sync_commits_one_mark_for_callers_at_once_and_none_when_nothing_changed(db: Database) -> None:
    """Callers waiting together share one sync; with no commit since the last, there is nothing to sync."""
    await db.sync()
    assert await syncs_written(db) == 0
    await add_note(db, "first")
    await asyncio.gather(*(db.sync() for _ in range(5)))
    assert await syncs_written(db) == 1
    await db.sync()
    assert await syncs_written(db) == 1
    await add_note(db, "second")
    await db.sync()
    assert await syncs_written(db) == 2


async def test_a_deferred_write_that_emits_events_is_synced_before_it_returns(db: Database) -> None:
    """Its events leave the process once the relay reads them, so they must be on the disk first."""
    with deferring(Deferral()):
        await add_note(db, "emits")
    assert await syncs_written(db) == 1


class HeldSyncs:
    """Holds a database's syncs until `release`d, counting those asked for."""

    def __init__(self, database: Database) -> None:
        self.asked = 0
        self._released = asyncio.Event()
        self._sync = database.sync
        database.sync = self.sync  # type: ignore[method-assign]

    def release(self) -> None:
        self._released.set()

    async def sync(self) -> None:
        self.asked += 1
        await self._released.wait()
        await self._sync()


@pytest.fixture
async def consumer_db(tmp_path: Path, migrations: Migrations) -> AsyncIterator[Database]:
    """A second database, as a consumer in the same process has."""
    async with opened_sqlite(tmp_path / "consumer.db", migrations, WriterSettings()) as database:
        yield database


def copying_into(consumer_db: Database, waited: list[bool]) -> InProcessBus:
    """An in-process bus whose one consumer copies each note into `consumer_db`, noting if it waited."""
    bus = InProcessBus()

    async def copy(event: Event) -> None:
        async with consumer_db.write() as conn:
            await conn.execute(notes_table.insert().values(id=event.data["note_id"], body="copy"))
            waited.append(await commit_waits_for_the_disk(conn))

    bus.subscribe("copier", NoteAdded.TYPE, copy)
    return bus


async def test_an_event_is_marked_sent_only_once_its_consumers_writes_are_synced(
    db: Database, consumer_db: Database
) -> None:
    """The consumer's commits do not wait for the disk; the relay syncs them before it marks the events."""
    waited: list[bool] = []
    held = HeldSyncs(consumer_db)
    relay = OutboxRelay(
        db, copying_into(consumer_db, waited), name=SOURCE, poll_seconds=30, settle_after_s=0.01
    )
    await add_notes(db, 3)
    async with running_in_background(relay.run()):

        async def handled_and_sync_asked() -> None:
            assert waited == [False, False, False]
            assert held.asked == 1

        await eventually(handled_and_sync_asked)
        assert await unsent(db) == 3
        held.release()

        async def marked() -> None:
            assert await unsent(db) == 0

        await eventually(marked)
    assert await syncs_written(consumer_db) == 1
    assert await count(consumer_db, notes_table) == 3


async def test_events_handled_within_one_window_share_one_sync(db: Database, consumer_db: Database) -> None:
    """Ten events waiting when the relay starts cost their consumer one sync; a later one, another."""
    waited: list[bool] = []
    relay = OutboxRelay(db, copying_into(consumer_db, waited), name=SOURCE, poll_seconds=30)
    await add_notes(db, 10)
    async with running_in_background(relay.run()):

        async def all_marked(events: int) -> None:
            assert await unsent(db) == 0
            assert len(waited) == events

        await eventually(lambda: all_marked(10))
        assert await syncs_written(consumer_db) == 1
        await add_note(db, "later")
        await eventually(lambda: all_marked(11))
        assert await syncs_written(consumer_db) == 2
    assert not any(waited)


async def test_a_relay_stopped_marks_the_events_its_consumers_handled(
    db: Database, consumer_db: Database
) -> None:
    """Stopping within a window syncs and marks what was handled, so a restart does not deliver it again."""
    waited: list[bool] = []
    relay = OutboxRelay(
        db, copying_into(consumer_db, waited), name=SOURCE, poll_seconds=30, settle_after_s=300
    )
    await add_notes(db, 3)
    async with running_in_background(relay.run()):

        async def handled() -> None:
            assert len(waited) == 3

        await eventually(handled)
        assert await unsent(db) == 3
    assert await unsent(db) == 0
    assert await syncs_written(consumer_db) == 1


async def test_a_backlog_is_marked_a_batch_at_a_time_while_it_is_published(db: Database) -> None:
    """A long backlog's marks do not wait for its end: before each batch, the ones before it are marked."""
    unsent_when_handled: list[int] = []
    bus = InProcessBus()

    async def handler(event: Event) -> None:
        unsent_when_handled.append(await unsent(db))

    bus.subscribe("indexer", NoteAdded.TYPE, handler)
    relay = OutboxRelay(db, bus, name=SOURCE, poll_seconds=30, batch=3, settle_after_s=300)
    await add_notes(db, 9)
    assert await relay.drain() == 9
    assert unsent_when_handled == [9, 9, 9, 6, 6, 6, 3, 3, 3]
    assert await unsent(db) == 0


async def test_an_event_committed_after_a_later_one_was_published_is_still_delivered(db: Database) -> None:
    """On PostgreSQL a lower seq can commit after a higher one: the relay finds it once its window settles."""
    received: list[str] = []
    bus = InProcessBus()

    async def handler(event: Event) -> None:
        received.append(event.id)

    bus.subscribe("indexer", NoteAdded.TYPE, handler)
    relay = OutboxRelay(db, bus, name=SOURCE, poll_seconds=30, settle_after_s=1.0)
    first = await add_note(db, "published first")
    async with db.write() as conn:
        # Leave seq 1 free for the event that commits late.
        await conn.execute(outbox_table.update().where(outbox_table.c.seq == 1).values(seq=2))
    async with running_in_background(relay.run()):

        async def delivered(expected: list[str]) -> None:
            assert received == expected

        # Published and, within its window, not marked yet: the relay reads past it.
        await eventually(lambda: delivered([first.id]))
        straggler = Event.of(SOURCE, NoteAdded(note_id=new_id(), body="committed late"))
        async with db.write() as conn:
            await conn.execute(
                outbox_table.insert().values(
                    seq=1,
                    event_id=straggler.id,
                    type=straggler.type,
                    body=straggler.to_json(),
                    created_at=utcnow(),
                )
            )
        relay.wake()
        await eventually(lambda: delivered([first.id, straggler.id]))

        async def all_marked() -> None:
            assert await unsent(db) == 0

        await eventually(all_marked)


async def test_prune_forgets_only_events_sent_over_an_hour_ago(db: Database) -> None:
    """Sent rows older than an hour are deleted; recent sent rows and unsent rows stay."""
    old, recent, pending = [await add_note(db, name) for name in ("old", "recent", "pending")]
    async with db.write() as conn:
        await conn.execute(
            outbox_table.update()
            .where(outbox_table.c.event_id == old.id)
            .values(sent_at=utcnow() - timedelta(hours=2))
        )
        await conn.execute(
            outbox_table.update()
            .where(outbox_table.c.event_id == recent.id)
            .values(sent_at=utcnow() - timedelta(minutes=5))
        )
    assert await OutboxRelay(db, FakeBus(), name=SOURCE).prune() == 1
    assert await outbox_event_ids(db) == [recent.id, pending.id]


async def outbox_event_ids(db: Database) -> list[str]:
    async with db.read() as conn:
        return list(
            (await conn.execute(sa.select(outbox_table.c.event_id).order_by(outbox_table.c.seq))).scalars()
        )


async def sent_hours_ago(db: Database, events: list[Event], hours: float) -> None:
    async with db.write() as conn:
        await conn.execute(
            outbox_table.update()
            .where(outbox_table.c.event_id.in_([event.id for event in events]))
            .values(sent_at=utcnow() - timedelta(hours=hours))
        )


async def test_prune_takes_old_events_a_batch_at_a_time_up_to_the_first_recent_one(db: Database) -> None:
    """Seven old rows go in batches of three; the recent one after them, and all behind it, stay."""
    events = [await add_note(db, f"note {number}") for number in range(9)]
    await sent_hours_ago(db, events[:7], 2)
    await sent_hours_ago(db, events[7:8], 0.1)
    assert await OutboxRelay(db, FakeBus(), name=SOURCE, prune_batch=3).prune() == 7
    assert await outbox_event_ids(db) == [events[7].id, events[8].id]


async def test_a_running_relay_prunes_by_the_clock(db: Database) -> None:
    """Left running, the relay forgets old sent events on its own, every `prune_every_s`."""
    relay = OutboxRelay(db, FakeBus(), name=SOURCE, poll_seconds=0.05, prune_every_s=0.2)
    async with running_in_background(relay.run()):
        for round_number in range(2):
            old = await add_note(db, f"old {round_number}")

            async def sent() -> None:
                assert await unsent(db) == 0

            # Dated back only once the relay has marked it sent, or its mark would date it now.
            await eventually(sent)
            await sent_hours_ago(db, [old], 2)

            async def forgotten(event_id: str = old.id) -> None:
                assert event_id not in await outbox_event_ids(db)

            await eventually(forgotten)


async def test_utc_datetime_round_trips_an_aware_utc_time(db: Database) -> None:
    """An aware UTC time (with microseconds) comes back equal and timezone-aware UTC."""
    stamp = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC)
    now = utcnow()
    async with db.write() as conn:
        await conn.execute(notes_table.insert().values(id="a", body="leap", created_at=stamp))
        await conn.execute(notes_table.insert().values(id="b", body="now", created_at=now))
        await conn.execute(notes_table.insert().values(id="c", body="none", created_at=None))
    async with db.read() as conn:
        result = await conn.execute(sa.select(notes_table.c.id, notes_table.c.created_at))
        rows = {row.id: row.created_at for row in result}
    assert rows == {"a": stamp, "b": now, "c": None}
    for value in (rows["a"], rows["b"]):
        assert value is not None
        assert value.utcoffset() == timedelta(0)


async def test_utc_datetime_reads_a_stored_naive_value_as_utc(db: Database) -> None:
    """A timestamp the database keeps without a zone is read back as that wall time in UTC."""
    async with db.write() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO notes (id, body, created_at) VALUES ('x', 'raw', '2024-05-01 12:00:00.000000')"
            )
        )
    async with db.read() as conn:
        value = (await conn.execute(sa.select(notes_table.c.created_at))).scalar_one()
    assert value == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


async def test_utc_datetime_refuses_a_naive_datetime(db: Database) -> None:
    """Binding a naive datetime raises, and the transaction writes nothing."""
    with pytest.raises(sa.exc.StatementError, match="naive datetimes are not stored"):
        async with db.write() as conn:
            await conn.execute(
                notes_table.insert().values(id="n", body="naive", created_at=datetime(2024, 1, 1))
            )
    assert await count(db, notes_table) == 0


async def test_utc_datetime_keeps_the_instant_of_an_aware_non_utc_time(db: Database) -> None:
    """An aware time in another zone is stored as the same instant and read back in UTC."""
    stamp = datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    async with db.write() as conn:
        await conn.execute(notes_table.insert().values(id="tz", body="cest", created_at=stamp))
    async with db.read() as conn:
        value = (await conn.execute(sa.select(notes_table.c.created_at))).scalar_one()
    assert value == stamp
    assert value == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


NOTES_BY_BODY = PagedQuery(
    sa.select(notes_table.c.id).where(notes_table.c.body == sa.bindparam("body")), notes_table.c.id
)


async def read_page(db: Database, page: PageRequest) -> tuple[list[str], str | None]:
    async with db.read() as conn:
        rows, cursor = await NOTES_BY_BODY.page(conn, page, body="x")
    return [str(row.id) for row in rows], cursor


async def insert_ids(db: Database, count_: int) -> list[str]:
    ids = [new_id() for _ in range(count_)]
    if not ids:
        return ids
    async with db.write() as conn:
        await conn.execute(notes_table.insert(), [{"id": note_id, "body": "x"} for note_id in ids])
    return ids


@pytest.mark.parametrize(("total", "limit"), [(7, 3), (6, 3), (3, 3), (1, 5), (0, 2), (20, 1)])
async def test_paging_walks_every_row_newest_first_exactly_once(db: Database, total: int, limit: int) -> None:
    """Following cursors yields each row once, newest first, in pages of `limit`; the last has no cursor."""
    ids = await insert_ids(db, total)
    async with db.write() as conn:
        await conn.execute(notes_table.insert().values(id=new_id(), body="not this query's"))
    newest_first = sorted(ids, reverse=True)
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        items, cursor = await read_page(db, PageRequest(limit=limit, cursor=cursor))
        pages.append(items)
        if cursor is None:
            break
        assert cursor == items[-1]
        assert len(pages) <= total + 1
    assert [item for page in pages for item in page] == newest_first
    assert all(len(page) == limit for page in pages[:-1])
    assert 0 < len(pages[-1]) <= limit or total == 0
    assert len(pages) == max(1, -(-total // limit))


NOTES_AMONG = Query(
    sa.select(
        notes_table.c.id,
        notes_table.c.body,
        notes_table.c.created_at,
        (notes_table.c.created_at.is_(None)).label("undated"),
        sa.literal(7).label("seven"),
    )
    .where(notes_table.c.id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(notes_table.c.id)
)
NOTES_BEFORE = Query(
    sa.select(notes_table.c.id)
    .where(notes_table.c.created_at < sa.bindparam("before", type_=UtcDateTime), notes_table.c.body == "x")
    .order_by(notes_table.c.id)
)


async def insert_dated_notes(db: Database, count_: int) -> list[tuple[str, datetime | None]]:
    """`count_` notes, the first undated and the others an hour apart, in id order."""
    start = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    notes = [(new_id(), None if i == 0 else start + timedelta(hours=i)) for i in range(count_)]
    async with db.write() as conn:
        await conn.execute(
            notes_table.insert(), [{"id": note_id, "body": "x", "created_at": at} for note_id, at in notes]
        )
    return notes


async def test_a_query_reads_the_rows_and_types_sqlalchemy_reads(db: Database) -> None:
    """Rows of a prebuilt query equal SQLAlchemy's own reading: aware UTC times, None, booleans, literals."""
    notes = await insert_dated_notes(db, 4)
    ids = [note_id for note_id, _ in notes]
    async with db.read() as conn:
        rows = await conn.fetch(NOTES_AMONG, {"ids": ids})
        expected = (await conn.execute(NOTES_AMONG.statement, {"ids": ids})).all()
    assert [tuple(row) for row in rows] == [tuple(row) for row in expected]
    assert [(row.id, row.created_at, row.undated, row.seven) for row in rows] == [
        (note_id, at, at is None, 7) for note_id, at in notes
    ]
    assert all(row.created_at is None or row.created_at.tzinfo is UTC for row in rows)
    assert rows[0]._asdict() == {"id": ids[0], "body": "x", "created_at": None, "undated": True, "seven": 7}


@pytest.mark.parametrize(
    ("stored", "instant"),
    [
        ("2024-05-01 12:00:00.000001", datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=UTC)),
        ("2024-05-01 12:00:00", datetime(2024, 5, 1, 12, 0, tzinfo=UTC)),
        ("2024-05-01 12:00:00.5+02:00", datetime(2024, 5, 1, 10, 0, 0, 500000, tzinfo=UTC)),
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, 0, tzinfo=UTC)),
    ],
)
async def test_a_query_reads_stored_times_as_utc_instants(
    tmp_path: Path, migrations: Migrations, stored: str, instant: datetime
) -> None:
    """SQLite text without a zone is UTC, text with one the instant it names: either comes back in UTC."""
    async with opened_sqlite(tmp_path / "times.db", migrations, WriterSettings()) as db:
        async with db.write() as conn:
            insert = sa.text("INSERT INTO notes (id, body, created_at) VALUES ('t', 'x', :stored)")
            await conn.execute(insert, {"stored": stored})
        async with db.read() as conn:
            [row] = await conn.fetch(NOTES_AMONG, {"ids": ["t"]})
    assert row.created_at == instant
    assert row.created_at.tzinfo is UTC


@pytest.mark.parametrize("asked", [0, 1, 2, 5])
async def test_a_query_expands_a_list_parameter_of_any_length(db: Database, asked: int) -> None:
    """A list parameter matches exactly its items, whatever its length (the empty list matches nothing)."""
    notes = await insert_dated_notes(db, 6)
    wanted = [note_id for note_id, _ in notes[1 : 1 + asked]]
    async with db.read() as conn:
        rows = await conn.fetch(NOTES_AMONG, {"ids": [*wanted, "no such note"]})
    assert [row.id for row in rows] == wanted


async def test_a_query_binds_times_through_their_type_and_its_own_literals(db: Database) -> None:
    """An aware time parameter is compared as stored (UTC), whatever its zone; `body == "x"` is bound too."""
    notes = await insert_dated_notes(db, 4)
    async with db.write() as conn:
        await conn.execute(notes_table.insert().values(id=new_id(), body="y", created_at=utcnow()))
    third = notes[2][1]
    assert third is not None
    in_another_zone = third.astimezone(timezone(timedelta(hours=-5)))
    async with db.read() as conn:
        rows = await conn.fetch(NOTES_BEFORE, {"before": in_another_zone})
    assert [row.id for row in rows] == [notes[1][0]]


NOTE_INSERT = Command(notes_table.insert())
NOTE_REDATE = Command(
    notes_table.update()
    .where(notes_table.c.id.in_(sa.bindparam("ids", expanding=True)))
    .values(created_at=sa.bindparam("at"), body=notes_table.c.body + sa.bindparam("suffix"))
)


async def test_an_insert_command_stores_the_columns_its_parameters_name(db: Database) -> None:
    """One row or many, with or without a time (converted as SQLAlchemy would); the count is what changed."""
    at = datetime(2026, 5, 6, 7, 8, 9, 10, tzinfo=timezone(timedelta(hours=2)))
    async with db.write() as conn:
        assert await conn.run(NOTE_INSERT, {"id": "a", "body": "dated", "created_at": at}) == 1
        assert await conn.run(NOTE_INSERT, {"id": "b", "body": "undated"}) == 1
        await conn.run_many(NOTE_INSERT, [{"id": "c", "body": "x"}, {"id": "d", "body": "y"}])
        await conn.run_many(NOTE_INSERT, [])
    async with db.read() as conn:
        rows = (await conn.execute(sa.select(notes_table).order_by(notes_table.c.id))).all()
    assert [tuple(row) for row in rows] == [
        ("a", "dated", at.astimezone(UTC)),
        ("b", "undated", None),
        ("c", "x", None),
        ("d", "y", None),
    ]


async def test_an_update_command_binds_lists_times_and_expressions(db: Database) -> None:
    """An UPDATE changes exactly the rows its list names, and says how many it changed."""
    notes = await insert_dated_notes(db, 4)
    chosen = [notes[1][0], notes[3][0]]
    now = utcnow()
    async with db.write() as conn:
        changed = await conn.run(NOTE_REDATE, {"ids": [*chosen, "no such note"], "at": now, "suffix": "!"})
        assert await conn.run(NOTE_REDATE, {"ids": [], "at": now, "suffix": "?"}) == 0
    assert changed == 2
    async with db.read() as conn:
        rows = (await conn.execute(sa.select(notes_table).order_by(notes_table.c.id))).all()
    assert [(row.body, row.created_at) for row in rows] == [
        ("x!" if note_id in chosen else "x", now if note_id in chosen else at) for note_id, at in notes
    ]


async def test_a_command_run_for_many_rows_refuses_lists_of_different_lengths(sqlite_db: Database) -> None:
    """Each length of a list is its own statement: one run for many rows cannot mix them."""
    await insert_dated_notes(sqlite_db, 2)
    rows = [
        {"ids": ["a"], "at": utcnow(), "suffix": "!"},
        {"ids": ["a", "b"], "at": utcnow(), "suffix": "!"},
    ]
    with pytest.raises(ValueError, match="same length"):
        async with sqlite_db.write() as conn:
            await conn.run_many(NOTE_REDATE, rows)


DATED_NOTE_COPIES = InsertIgnoringConflicts(
    notes_table,
    columns=["id", "body"],
    # A copy's id is the note's with its first character replaced: as long, so it fits the column.
    from_select=sa.select(
        sa.bindparam("mark", type_=sa.String) + sa.func.substr(notes_table.c.id, 2), notes_table.c.body
    ).where(notes_table.c.created_at.is_not(None)),
)


async def test_an_insert_of_a_querys_rows_adds_each_once(db: Database) -> None:
    """The query's rows are inserted, undated copies of the dated notes; run again, every one clashes."""
    notes = await insert_dated_notes(db, 4)
    async with db.write() as conn:
        first = await conn.run(DATED_NOTE_COPIES.command(conn.dialect), {"mark": "c"})
        again = await conn.run(DATED_NOTE_COPIES.command(conn.dialect), {"mark": "c"})
    assert (first, again) == (3, 0)
    async with db.read() as conn:
        rows = (await conn.execute(sa.select(notes_table).order_by(notes_table.c.id))).all()
    copies = sorted((f"c{note_id[1:]}", "x", None) for note_id, at in notes if at is not None)
    originals = [(note_id, "x", at) for note_id, at in notes]
    assert sorted(tuple(row) for row in rows if row.id.startswith("c")) == copies
    assert [tuple(row) for row in rows if not row.id.startswith("c")] == originals


def test_an_insert_of_a_querys_rows_must_name_its_columns() -> None:
    """Columns without a query, or a query without columns, are refused when built."""
    with pytest.raises(ValueError, match="columns"):
        InsertIgnoringConflicts(notes_table, columns=["id"])
    with pytest.raises(ValueError, match="columns"):
        InsertIgnoringConflicts(notes_table, from_select=sa.select(notes_table.c.id))


def test_a_query_whose_columns_share_a_name_is_refused_when_built() -> None:
    """Two selected columns of one name would make rows ambiguous: refused at import, not on a request."""
    other = sa.table("other", sa.column("id"))
    with pytest.raises(ValueError, match="id"):
        Query(sa.select(notes_table.c.id, other.c.id))


def test_page_of_splits_the_extra_row_into_a_cursor() -> None:
    """limit+1 rows give `limit` rows and the last kept row's cursor; `limit` rows or fewer give no cursor."""
    page = PageRequest(limit=2)
    assert page_of(["c", "b", "a"], page, str.upper) == (["c", "b"], "B")
    assert page_of(["c", "b"], page, str.upper) == (["c", "b"], None)
    assert page_of([], page, str.upper) == ([], None)


async def test_concurrent_writes_through_one_database_all_commit(db: Database) -> None:
    """Thirty write transactions started at once on one Database all commit, none 'database is locked'."""

    async def write(index: int) -> None:
        async with db.write() as conn:
            await conn.execute(notes_table.insert().values(id=new_id(), body=f"note {index}"))
            await asyncio.sleep(0)
            await Transaction(conn, SOURCE).emit(NoteAdded(note_id=str(index), body="x"))

    await asyncio.gather(*(write(index) for index in range(30)))
    assert await count(db, notes_table) == 30
    assert await count(db, outbox_table) == 30


async def test_concurrent_writers_from_two_databases_on_one_file_both_succeed(
    db_url: str, migrations: Migrations
) -> None:
    """Two Database objects (as two processes would) writing the same file at once queue, never fail."""
    first, second = Database(db_url), Database(db_url)
    await first.open([migrations])
    await second.open([migrations])
    try:

        async def write(database: Database, index: int) -> None:
            async with database.write() as conn:
                await conn.execute(notes_table.insert().values(id=new_id(), body=f"note {index}"))
                await asyncio.sleep(0)
                await conn.execute(
                    notes_table.update()
                    .where(notes_table.c.body == f"note {index}")
                    .values(body=f"done {index}")
                )

        await asyncio.gather(*(write(first if index % 2 else second, index) for index in range(20)))
        assert await count(first, notes_table) == 20
        assert await count(second, notes_table, notes_table.c.body.like("done %")) == 20
    finally:
        await first.close()
        await second.close()


async def test_reads_proceed_while_a_write_transaction_is_open(db: Database) -> None:
    """A reader sees the last committed state, not the open write's uncommitted rows, and does not block."""
    await add_note(db, "committed")
    async with db.write() as conn:
        await conn.execute(notes_table.insert().values(id=new_id(), body="uncommitted"))
        assert await asyncio.wait_for(count(db, notes_table), 5) == 1
    assert await count(db, notes_table) == 2


def deleted_files_open() -> set[str]:
    """What this process holds open that has no name any more (SQLite unlinks its temporary files)."""
    fds = Path("/proc/self/fd")
    found = set()
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            target = str(fd.readlink())
            if target.endswith(" (deleted)"):
                found.add(target)
    return found


async def test_a_statement_changing_many_rows_in_a_transaction_opens_no_temporary_file(
    sqlite_db: Database,
) -> None:
    """The journal that lets one statement be undone stays in memory (SQLite spills it past 64 KiB)."""
    async with sqlite_db.write() as conn:
        rows = [{"id": new_id(), "body": "x" * 1000} for _ in range(400)]
        await conn.execute(notes_table.insert(), rows)
    before = deleted_files_open()
    async with sqlite_db.write() as conn:
        await conn.execute(notes_table.update().values(body="y" * 1000))
        assert deleted_files_open() - before == set()
    assert await count(sqlite_db, notes_table) == 400


async def cache_kib(database: Database) -> tuple[int, int]:
    """The page cache of the writer and of a reader, in KiB."""
    cache_size = sa.text("PRAGMA cache_size")
    async with database.write() as conn:
        writer_kib = -(await conn.scalar(cache_size))
    async with database.read() as conn:
        reader_kib = -(await conn.scalar(cache_size))
    return writer_kib, reader_kib


async def test_a_database_can_give_its_writer_a_larger_cache_than_its_readers(
    tmp_path: Path, sqlite_db: Database, migrations: Migrations
) -> None:
    """The writer's pages stay cached; readers, emptied by every commit, keep SQLite's default."""
    assert await cache_kib(sqlite_db) == (2000, 2000)
    writer = WriterSettings(cache_mib=48)
    async with opened_sqlite(tmp_path / "cached.db", migrations, writer) as database:
        assert await cache_kib(database) == (48 * 1024, 2000)


def wal_pages(database: Database) -> int:
    """How many pages the database's WAL file holds."""
    return Path(f"{sa.make_url(database.url).database}-wal").stat().st_size // 4096


async def wal_pages_after_writing(database: Database, pages: int) -> int:
    """Write about `pages` pages of notes, 50 per transaction; how many pages the WAL file then holds."""
    for _ in range(pages // 50):
        async with database.write() as conn:
            rows = [{"id": new_id(), "body": "x" * 3500} for _ in range(50)]
            await conn.execute(notes_table.insert(), rows)
    return wal_pages(database)


async def test_a_database_can_checkpoint_its_wal_less_often(
    tmp_path: Path, sqlite_db: Database, migrations: Migrations
) -> None:
    """SQLite copies the WAL back into the file every 1,000 pages; a database may let it grow longer."""
    assert await wal_pages_after_writing(sqlite_db, 2500) < 1200
    writer = WriterSettings(checkpoint_after_pages=5000)
    async with opened_sqlite(tmp_path / "longer.db", migrations, writer) as database:
        assert await wal_pages_after_writing(database, 2500) > 2000
