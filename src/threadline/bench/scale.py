"""Feed reads at scale: the same home-feed reads of the data set as seeded and grown to a target size.

The target: a feed read's p50 at 1M posts stays within 1.2x its p50 at the API-seeded size, that
is, its cost does not depend on how much data there is. The seeded system's databases are
copied twice (SQLite's online backup, once the system is idle); one copy is grown to the target
size by a bulk loader, and a system of the same topology is started on each copy. Reads then
alternate between the two systems in blocks (`BLOCK_CALLS`), each block sent to one and then the
other, the order swapped every block: a stretch in which the machine ran slower falls on both
sizes alike, and neither size has the advantage of coming second. Measured one after the other
instead (the same reads before and after loading, on one system), the ratio swung from 0.78x to
1.55x between runs on the same code; alternated, it measured 0.95-1.02x. The seeded system
itself is left as it was.

Seeding 1M posts through the API (each one fanned out by events) would take hours, so the
bulk loader writes the extra posts straight into the copy's SQLite files, in large
transactions: for each post its `posts` row, its `thread_nodes` row, feed's `post_copies` row,
and its `timeline_entries` rows for its author and every account that follows the author by
feed's own copy of the follow graph. That is what the services themselves would have stored,
with the tables taken from each service's store module. (It can also load into the files of a
running system: WAL lets another process write, and the services' writers retry BEGIN
IMMEDIATE, so each loader transaction is kept short, about `ROWS_PER_TRANSACTION` rows.)

Bulk posts are public root posts (no replies, likes or subscribers-only posts) by uniformly
drawn seeded accounts, as seeding draws its authors, so that the timelines grow in the same
proportions as the seeded ones. They are dated in the 30 days before the oldest seeded post, evenly spread and
oldest first, and their ids are UUIDv7s of those instants: the newest page of every timeline is
still the API-seeded posts, and a feed read has to find it in an index that is about
`target / seeded` times larger. Dating them after the seeded posts would instead make every read
a read of bulk rows, which measures the loader's rows rather than the size of the data.

Both systems get the same requests (the mix's feed reads, drawn with the same seed, so the
same readers in the same order), sent one at a time over one keep-alive connection; wall time
per call, and the CPU its system's processes spent. Each system first gets one untimed pass over
all of them, which leaves the same things in memory at both sizes (the posts the pages show in
the posts service's cache, the pages of the index those timelines use in SQLite's and the
kernel's caches): this measures the cost of a larger index, not of a cold disk or a cold cache.
Before copying, the disk both copies and the load will take is estimated from the seeded
databases' size per row, and the phase is skipped (or the load stopped) rather than fill the disk.
"""

import math
import random
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

import orjson
import psutil
import sqlalchemy as sa
import uvloop
from sqlalchemy.dialects import sqlite

from threadline.bench.loadgen import Request, cpu_seconds, nearest_rank, processes_of, rounded_ms
from threadline.bench.opcost import SequentialClient, requests_by_kind
from threadline.bench.workload import Dataset, social_mix
from threadline.platform.ids import id_at
from threadline.platform.settings import Settings
from threadline.runner import running
from threadline.services.feed.store import follows, post_copies, timeline_entries
from threadline.services.posts.store import authors, posts
from threadline.services.threads.store import thread_nodes
from threadline.topology import SERVICES as ALL_SERVICES
from threadline.topology import parse_topology

__all__ = [
    "BLOCK_CALLS",
    "FEED_CALLS",
    "ROWS_PER_TRANSACTION",
    "TARGET_RATIO",
    "DataSize",
    "FeedReads",
    "LoadOutcome",
    "ScaleError",
    "ScaleReport",
    "StartSystem",
    "SystemCopy",
    "alternate_reads",
    "bulk_load",
    "copy_databases",
    "data_size",
    "database_paths",
    "feed_requests",
    "measure_at_scale",
    "read_feeds",
    "started_like",
]

TARGET_RATIO = 1.2
FEED_CALLS = 1000
BLOCK_CALLS = 100
ROWS_PER_TRANSACTION = 200_000
MAX_POSTS_PER_TRANSACTION = 20_000
BULK_SPAN_MS = 30 * 86_400_000
DISK_RESERVE_BYTES = 2 * 2**30
SERVICES = ("posts", "feed", "threads")
PROGRESS_EVERY_S = 15.0
_DIALECT = sqlite.dialect(paramstyle="named")
_WORDS = ("archive", "batch", "index", "page", "cursor", "older", "quiet", "weekday", "rerun", "notes")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SystemCopy:
    """A system started on a copy of the databases: its gateway's URL and its processes."""

    url: str
    processes: Mapping[str, psutil.Process]


StartSystem = Callable[[Path], AbstractContextManager[SystemCopy]]
"""Runs a system of the measured topology on the databases in a directory, for a `with` block."""


class ScaleError(RuntimeError):
    """The scale phase cannot run against this system (for instance, it does not use SQLite)."""


@dataclass
class FeedReads:
    """What a series of sequential feed reads returned."""

    latencies_ms: list[float]
    errors: int
    error_reasons: dict[str, int]
    items: int
    first_pages: list[list[str]]  # per call, the post ids of the page (empty for a failed call)
    cpu_s: float = 0.0
    """What the system's processes spent meanwhile (counted by whoever sent the reads)."""

    @classmethod
    def empty(cls) -> "FeedReads":
        """No reads yet."""
        return cls(latencies_ms=[], errors=0, error_reasons={}, items=0, first_pages=[])

    def extend(self, more: "FeedReads") -> None:
        """Add the reads of `more` after these."""
        self.latencies_ms += more.latencies_ms
        self.errors += more.errors
        for reason, count in more.error_reasons.items():
            self.error_reasons[reason] = self.error_reasons.get(reason, 0) + count
        self.items += more.items
        self.first_pages += more.first_pages
        self.cpu_s += more.cpu_s

    @property
    def calls(self) -> int:
        """How many calls were measured."""
        return len(self.first_pages)

    def percentile(self, p: float) -> float:
        """The nearest-rank `p`th percentile (0-100) of the successful calls' wall times, in ms."""
        return nearest_rank(sorted(self.latencies_ms), p)

    def to_dict(self) -> dict[str, Any]:
        """Percentiles, errors and page sizes, JSON-friendly."""
        return {
            "calls": self.calls,
            "p50": rounded_ms(self.percentile(50)),
            "p90": rounded_ms(self.percentile(90)),
            "p99": rounded_ms(self.percentile(99)),
            "errors": self.errors,
            "error_reasons": dict(self.error_reasons),
            "items_per_call": round(self.items / self.calls, 2) if self.calls else None,
            "cpu_ms_per_call": round(1000 * self.cpu_s / self.calls, 4) if self.calls else None,
        }


@dataclass
class DataSize:
    """How much the posts, feed and threads databases hold."""

    posts: int
    timeline_rows: int
    db_bytes: dict[str, int]

    def db_mb(self) -> dict[str, float]:
        """Each database's file size (WAL included) in MiB, and their total."""
        sizes = {name: round(size / 2**20, 1) for name, size in self.db_bytes.items()}
        return {**sizes, "total": round(sum(self.db_bytes.values()) / 2**20, 1)}


@dataclass
class LoadOutcome:
    """What the bulk loader wrote."""

    posts: int
    timeline_rows: int
    seconds: float
    created_from: datetime | None = None
    created_to: datetime | None = None
    stopped: str | None = None


@dataclass
class ScaleReport:
    """Feed reads at the seeded size and at the target size, alternated, and what it took to get there."""

    target_posts: int
    base: DataSize
    expected_fanout: float
    estimated_bytes: int
    block_calls: int = BLOCK_CALLS
    reads_base: FeedReads | None = None
    scaled: DataSize | None = None
    reads_scaled: FeedReads | None = None
    load: LoadOutcome | None = None
    skipped: str | None = None
    target_ratio: float = TARGET_RATIO

    @property
    def ratio(self) -> float | None:
        """Scaled p50 over seeded p50, if both were measured."""
        if self.reads_base is None or self.reads_scaled is None:
            return None
        base, scaled = self.reads_base.percentile(50), self.reads_scaled.percentile(50)
        return None if math.isnan(base) or math.isnan(scaled) or base <= 0 else scaled / base

    @property
    def first_pages_unchanged(self) -> int | None:
        """Calls whose page at the target size starts with the page as seeded (seeded posts on top)."""
        if self.reads_base is None or self.reads_scaled is None:
            return None
        pairs = zip(self.reads_base.first_pages, self.reads_scaled.first_pages, strict=True)
        return sum(1 for before, after in pairs if before and after[: len(before)] == before)

    @property
    def met(self) -> bool | None:
        """Whether the target held; None when the target size was not reached, so nothing was measured."""
        ratio = self.ratio
        if ratio is None or self.scaled is None or self.scaled.posts < self.target_posts:
            return None
        errors = sum(reads.errors for reads in (self.reads_base, self.reads_scaled) if reads is not None)
        return errors == 0 and ratio <= self.target_ratio

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        scaled, load, ratio = self.scaled, self.load, self.ratio
        reads_base, reads_scaled = self.reads_base, self.reads_scaled
        rows_per_s = load.timeline_rows / load.seconds if load and load.seconds > 0 else None
        return {
            "target_posts": self.target_posts,
            "base_posts": self.base.posts,
            "scaled_posts": scaled.posts if scaled else None,
            "bulk_posts": load.posts if load else 0,
            "timeline_rows_base": self.base.timeline_rows,
            "timeline_rows": scaled.timeline_rows if scaled else None,
            "db_mb_base": self.base.db_mb(),
            "db_mb": scaled.db_mb() if scaled else None,
            "expected_fanout": round(self.expected_fanout, 2),
            "estimated_extra_db_mb": round(self.estimated_bytes / 2**20, 1),
            "feed_untimed_pass_calls": reads_base.calls if reads_base else 0,
            "block_calls": self.block_calls,
            "feed_ms_base": reads_base.to_dict() if reads_base else None,
            "feed_ms_scaled": reads_scaled.to_dict() if reads_scaled else None,
            "feed_p50_ms_base": rounded_ms(reads_base.percentile(50)) if reads_base else None,
            "feed_p50_ms_scaled": rounded_ms(reads_scaled.percentile(50)) if reads_scaled else None,
            "ratio": None if ratio is None else round(ratio, 3),
            "target_ratio": self.target_ratio,
            "met": self.met,
            "first_pages_unchanged": self.first_pages_unchanged,
            "load_s": round(load.seconds, 1) if load else None,
            "load_posts_per_s": round(load.posts / load.seconds) if load and load.seconds > 0 else None,
            "load_timeline_rows_per_s": None if rows_per_s is None else round(rows_per_s),
            "bulk_created_from": _iso(load.created_from) if load else None,
            "bulk_created_to": _iso(load.created_to) if load else None,
            "skipped": self.skipped,
            "stopped": load.stopped if load else None,
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds")


def database_paths(settings: Settings, services: Sequence[str] = SERVICES) -> dict[str, Path]:
    """The SQLite files of `services` (by default those the loader writes); ScaleError for any other."""
    paths = {}
    for service in services:
        url = sa.engine.make_url(settings.database_url(service))
        if url.get_backend_name() != "sqlite" or not url.database:
            raise ScaleError(
                f"the scale phase copies and loads SQLite files, and {service} uses {url.drivername}"
            )
        paths[service] = Path(url.database)
    return paths


def copy_databases(settings: Settings, into: Path) -> None:
    """Copy every service's database into `into` as `<service>.db`, each by SQLite's online backup.

    Each copy is consistent on its own; the services' copies agree with each other when nothing
    was in flight meanwhile (the system idle).
    """
    into.mkdir(parents=True, exist_ok=True)
    for service, source in database_paths(settings, ALL_SERVICES).items():
        with (
            closing(sqlite3.connect(source)) as original,
            closing(sqlite3.connect(into / f"{service}.db")) as copy,
        ):
            original.backup(copy)


def started_like(settings: Settings, **options: Any) -> StartSystem:
    """Starts systems configured as `settings` on directories of copies; `options` are `running`'s."""

    @contextmanager
    def start(data_dir: Path) -> Iterator[SystemCopy]:
        copied = _settings_in(settings, data_dir).model_copy(update={"port": 0})
        with running(parse_topology(settings.topology, ALL_SERVICES), copied, **options) as runner:
            yield SystemCopy(runner.gateway_url, processes_of(runner))

    return start


def feed_requests(dataset: Dataset, calls: int, *, seed: int = 0) -> list[Request]:
    """`calls` home-feed reads as the social mix draws them."""
    return requests_by_kind(social_mix(dataset), calls, seed=seed)["feed"]


async def read_feeds(client: SequentialClient, requests: Sequence[Request]) -> FeedReads:
    """Send `requests` one at a time through `client`; wall time and page of each."""
    reads = FeedReads.empty()
    for request in requests:
        answer = await client.send(request)
        if answer.failure is not None:
            reads.errors += 1
            reads.error_reasons[answer.failure] = reads.error_reasons.get(answer.failure, 0) + 1
            reads.first_pages.append([])
            continue
        ids = [item["id"] for item in orjson.loads(answer.body)["items"]]
        reads.latencies_ms.append(answer.elapsed_s * 1000)
        reads.items += len(ids)
        reads.first_pages.append(ids)
    return reads


async def alternate_reads(
    systems: tuple[SystemCopy, SystemCopy], requests: Sequence[Request], *, block_calls: int = BLOCK_CALLS
) -> tuple[FeedReads, FeedReads]:
    """Each system's reads of `requests`, sent after an untimed pass over them, in alternating blocks.

    Block by block, the same requests go to one system and then to the other, the first of the
    two swapped every block; each block's CPU is what its system's processes spent meanwhile.
    """
    async with SequentialClient(systems[0].url) as first, SequentialClient(systems[1].url) as second:
        clients = (first, second)
        for client in clients:
            await read_feeds(client, requests)
        reads = (FeedReads.empty(), FeedReads.empty())
        for number, start in enumerate(range(0, len(requests), block_calls)):
            for index in (0, 1) if number % 2 == 0 else (1, 0):
                processes = systems[index].processes
                before = sum(cpu_seconds(processes).values())
                block = await read_feeds(clients[index], requests[start : start + block_calls])
                block.cpu_s = sum(cpu_seconds(processes).values()) - before
                reads[index].extend(block)
    return reads


class _Db:
    """One service's SQLite file, opened by the loader (next to its service, if that runs)."""

    def __init__(self, path: Path) -> None:
        if not path.exists():
            raise ScaleError(f"no database at {path}: was the system started on this data directory?")
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # synchronous=OFF only on this connection: a crash mid-load may lose the load, nothing else.
        for pragma in ("busy_timeout=60000", "synchronous=OFF", "cache_size=-262144", "temp_store=MEMORY"):
            self._conn.execute(f"PRAGMA {pragma}")
        self._inserts: dict[tuple[str, tuple[str, ...]], str] = {}

    def rows(self, statement: sa.ClauseElement) -> list[tuple[Any, ...]]:
        """The rows of a SQLAlchemy statement that has no parameters."""
        sql = str(statement.compile(dialect=_DIALECT, compile_kwargs={"literal_binds": True}))
        return self._conn.execute(sql).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction; waits for the service's writer rather than failing."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def insert(self, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        """Insert rows (dicts keyed by column name, all with the same keys) in one executemany."""
        if not rows:
            return
        keys = tuple(rows[0])
        sql = self._inserts.get((table.name, keys))
        if sql is None:
            missing = sorted(c.name for c in table.columns if not c.nullable and c.name not in keys)
            if missing:
                raise ScaleError(f"bulk rows for {table.name} lack its required columns {missing}")
            statement = table.insert().values({key: sa.bindparam(key) for key in keys})
            sql = self._inserts[(table.name, keys)] = str(statement.compile(dialect=_DIALECT))
        self._conn.executemany(sql, rows)

    def checkpoint(self) -> None:
        """Move the WAL into the database file, so later reads do not go through a large WAL."""
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


@contextmanager
def _opened(paths: Mapping[str, Path]) -> Iterator[dict[str, _Db]]:
    dbs: dict[str, _Db] = {}
    try:
        for service, path in paths.items():
            dbs[service] = _Db(path)
        yield dbs
    finally:
        for db in dbs.values():
            db.close()


def _db_bytes(path: Path) -> int:
    """The database file's size plus its WAL's."""
    wal = path.with_name(path.name + "-wal")
    return sum(p.stat().st_size for p in (path, wal) if p.exists())


def data_size(paths: Mapping[str, Path]) -> DataSize:
    """Posts rows, timeline rows and file sizes of the posts, feed and threads databases."""
    with _opened(paths) as dbs:
        ((post_count,),) = dbs["posts"].rows(sa.select(sa.func.count()).select_from(posts))
        ((timeline_count,),) = dbs["feed"].rows(sa.select(sa.func.count()).select_from(timeline_entries))
    return DataSize(
        posts=int(post_count),
        timeline_rows=int(timeline_count),
        db_bytes={service: _db_bytes(path) for service, path in paths.items()},
    )


def _timeline_owners(feed: _Db, dataset: Dataset) -> dict[str, list[str]]:
    """Per seeded account, who gets its posts: itself and its current followers, as feed knows them."""
    owners: dict[str, list[str]] = {account.user_id: [account.user_id] for account in dataset.accounts}
    for follower_id, followee_id in feed.rows(
        sa.select(follows.c.follower_id, follows.c.followee_id).where(follows.c.following)
    ):
        if followee_id in owners and follower_id != followee_id:
            owners[followee_id].append(follower_id)
    return owners


def _expected_fanout(dataset: Dataset, owners: Mapping[str, list[str]]) -> float:
    """Timeline rows per post when authors are drawn uniformly, as seeding draws them."""
    return sum(len(owners[a.user_id]) for a in dataset.accounts) / len(dataset.accounts)


def _estimated_extra_bytes(base: DataSize, extra_posts: int, fanout: float) -> int:
    """Disk the load will take, at the seeded databases' size per row (more than needed: they hold events)."""
    per_post = sum(base.db_bytes[s] for s in ("posts", "threads")) / max(base.posts, 1)
    per_timeline_row = base.db_bytes["feed"] / max(base.timeline_rows, 1)
    return round(extra_posts * (per_post + fanout * per_timeline_row))


def _id_ms(post_id: str) -> int:
    return uuid.UUID(post_id).int >> 80


@dataclass
class _Batch:
    """The rows of a batch of bulk posts, per table."""

    posts: list[dict[str, Any]]
    thread_nodes: list[dict[str, Any]]
    post_copies: list[dict[str, Any]]
    timeline_entries: list[dict[str, Any]]
    first_created: datetime | None = None
    last_created: datetime | None = None


class _PostMaker:
    """The rows of bulk post n (0 the oldest): dated in slot n of the span, author drawn uniformly."""

    def __init__(
        self,
        dataset: Dataset,
        owners: Mapping[str, list[str]],
        snapshots: Mapping[str, tuple[str, str]],
        *,
        start_ms: int,
        slot_ms: int,
        seed: int,
    ) -> None:
        self._accounts = dataset.accounts
        self._owners = owners
        self._snapshots = snapshots
        self._start_ms = start_ms
        self._slot_ms = slot_ms
        self._rng = random.Random(seed)
        self._texts = [" ".join(self._rng.choices(_WORDS, k=self._rng.randint(3, 12))) for _ in range(997)]
        encode = posts.c.created_at.type.dialect_impl(_DIALECT).bind_processor(_DIALECT)
        assert encode is not None
        self._encode_time = encode

    def batch(self, first: int, count: int) -> _Batch:
        """Posts `first` .. `first + count - 1`, in that order (oldest first)."""
        rng = self._rng
        batch = _Batch([], [], [], [])
        for n in range(first, first + count):
            ms = self._start_ms + n * self._slot_ms + rng.randrange(self._slot_ms)
            post_id = id_at(ms)
            author = self._accounts[rng.randrange(len(self._accounts))].user_id
            handle, display_name = self._snapshots[author]
            created = datetime.fromtimestamp(ms / 1000, UTC)
            batch.first_created = batch.first_created or created
            batch.last_created = created
            common = {
                "id": post_id,
                "author_id": author,
                "text": f"bulk post {n}: {self._texts[n % len(self._texts)]}",
                "reply_to": None,
                "root_id": post_id,
                "audience": "public",
                "created_at": self._encode_time(created),
            }
            batch.posts.append({**common, "deleted_at": None, "like_count": 0, "reply_count": 0})
            batch.thread_nodes.append(
                {"id": post_id, "parent_id": None, "root_id": post_id, "deleted_at": None}
            )
            batch.post_copies.append({**common, "author_handle": handle, "author_display_name": display_name})
            batch.timeline_entries += [
                {"owner_id": owner, "post_id": post_id, "author_id": author} for owner in self._owners[author]
            ]
        return batch


def bulk_load(
    paths: Mapping[str, Path],
    dataset: Dataset,
    target_posts: int,
    *,
    seed: int = 0,
    progress: Progress = print,
    label: str = "",
    disk_reserve_bytes: int = DISK_RESERVE_BYTES,
) -> LoadOutcome:
    """Write posts (with their thread nodes, feed copies and timeline entries) until there are `target_posts`.

    The new posts are dated before the oldest post present (see the module's docstring). Stops
    early, saying why in `stopped`, if the disk's free space falls under `disk_reserve_bytes`.
    """
    prefix = f"{label} " if label else ""
    with _opened(paths) as dbs:
        ((present,),) = dbs["posts"].rows(sa.select(sa.func.count()).select_from(posts))
        extra = target_posts - int(present)
        if extra <= 0:
            return LoadOutcome(posts=0, timeline_rows=0, seconds=0.0)
        ((oldest,),) = dbs["posts"].rows(sa.select(sa.func.min(posts.c.id)))
        end_ms = (_id_ms(oldest) if oldest else time.time_ns() // 1_000_000) - 1000
        span_ms = max(BULK_SPAN_MS, extra)
        owners = _timeline_owners(dbs["feed"], dataset)
        maker = _PostMaker(
            dataset,
            owners,
            _author_snapshots(dbs["posts"], dataset),
            start_ms=end_ms - span_ms,
            slot_ms=span_ms // extra,
            seed=seed,
        )
        fanout = _expected_fanout(dataset, owners)
        per_transaction = max(100, min(MAX_POSTS_PER_TRANSACTION, int(ROWS_PER_TRANSACTION / fanout)))
        progress(
            f"    {prefix}scale: bulk-loading {extra:,} posts ({fanout:.0f} timeline rows each on average) "
            f"dated before the oldest of the {int(present):,} present, {per_transaction:,} per transaction"
        )
        outcome = LoadOutcome(posts=0, timeline_rows=0, seconds=0.0)
        started = last_report = time.monotonic()
        while outcome.posts < extra:
            batch = maker.batch(outcome.posts, min(per_transaction, extra - outcome.posts))
            # Posts first: a timeline entry must never point at a post that posts cannot find.
            with dbs["posts"].transaction():
                dbs["posts"].insert(posts, batch.posts)
            with dbs["threads"].transaction():
                dbs["threads"].insert(thread_nodes, batch.thread_nodes)
            # In index order: the inserts then touch far fewer B-tree pages (measured ~30% faster).
            batch.timeline_entries.sort(key=itemgetter("owner_id", "post_id"))
            with dbs["feed"].transaction():
                dbs["feed"].insert(post_copies, batch.post_copies)
                dbs["feed"].insert(timeline_entries, batch.timeline_entries)
            outcome.posts += len(batch.posts)
            outcome.timeline_rows += len(batch.timeline_entries)
            outcome.created_from = outcome.created_from or batch.first_created
            outcome.created_to = batch.last_created
            now = time.monotonic()
            outcome.seconds = now - started
            if now - last_report >= PROGRESS_EVERY_S or outcome.posts == extra:
                last_report = now
                progress(
                    f"    {prefix}scale: {outcome.posts:,}/{extra:,} posts "
                    f"({100 * outcome.posts // extra}%), "
                    f"{outcome.posts / outcome.seconds:,.0f} posts/s, "
                    f"{outcome.timeline_rows / outcome.seconds:,.0f} timeline rows/s"
                )
            free = shutil.disk_usage(paths["feed"].parent).free
            if free < disk_reserve_bytes and outcome.posts < extra:
                outcome.stopped = (
                    f"stopped at {outcome.posts:,} of {extra:,} bulk posts: {free / 2**30:.1f} GiB of disk "
                    f"left, under the {disk_reserve_bytes / 2**30:.1f} GiB kept free"
                )
                progress(f"    {prefix}scale: {outcome.stopped}")
                break
        for db in dbs.values():
            db.checkpoint()
        outcome.seconds = time.monotonic() - started
        return outcome


def _author_snapshots(db: _Db, dataset: Dataset) -> dict[str, tuple[str, str]]:
    """Posts' snapshot (handle, display name) of every seeded account; stores the missing ones."""
    found = {
        str(author_id): (str(handle), str(display_name))
        for author_id, handle, display_name in db.rows(
            sa.select(authors.c.id, authors.c.handle, authors.c.display_name)
        )
    }
    # Version 0, as posts stores an author it has no event for yet: any profile event replaces it.
    missing = [account for account in dataset.accounts if account.user_id not in found]
    if missing:
        with db.transaction():
            db.insert(
                authors,
                [
                    {"id": a.user_id, "handle": a.handle, "display_name": a.handle, "version": 0}
                    for a in missing
                ],
            )
        found.update({a.user_id: (a.handle, a.handle) for a in missing})
    return found


def measure_at_scale(
    settings: Settings,
    dataset: Dataset,
    *,
    target_posts: int,
    calls: int = FEED_CALLS,
    block_calls: int = BLOCK_CALLS,
    seed: int = 0,
    progress: Progress = print,
    label: str = "",
    disk_reserve_bytes: int = DISK_RESERVE_BYTES,
    workdir: Path | None = None,
    start: StartSystem | None = None,
) -> ScaleReport:
    """Feed reads of the system as it is and grown to `target_posts` posts, on two copies, alternated.

    The system (configured by `settings`, and idle) is only read from: its databases are copied
    into `workdir` (by default `scale` in its data directory), one copy is grown, and a system is
    started on each by `start` (by default `started_like(settings)`). The copies go at the end,
    unless the phase failed: then they stay, with their systems' logs.
    """
    if calls < 1 or block_calls < 1:
        raise ValueError("calls and block_calls must be positive")
    block_calls = min(block_calls, calls)
    prefix = f"    {label} scale: " if label else "    scale: "
    database_paths(settings, ALL_SERVICES)  # refuses a system whose databases this cannot copy
    workdir = workdir or settings.data_dir / "scale"
    as_seeded, grown = workdir / "as-seeded", workdir / "grown"
    try:
        progress(f"{prefix}copying the databases as they are into {as_seeded}")
        copy_databases(settings, as_seeded)
        base = data_size(_files_in(as_seeded))
        with _opened({"feed": _files_in(as_seeded)["feed"]}) as dbs:
            fanout = _expected_fanout(dataset, _timeline_owners(dbs["feed"], dataset))
        extra = max(target_posts - base.posts, 0)
        report = ScaleReport(
            target_posts=target_posts,
            base=base,
            expected_fanout=fanout,
            estimated_bytes=_estimated_extra_bytes(base, extra, fanout),
            block_calls=block_calls,
        )
        report.skipped = _short_of_disk(report, extra, workdir, disk_reserve_bytes)
        if report.skipped:
            progress(f"{prefix}skipped: {report.skipped}")
        else:
            copy_databases(_settings_in(settings, as_seeded), grown)
            report.load = bulk_load(
                _files_in(grown),
                dataset,
                target_posts,
                seed=seed,
                progress=progress,
                label=label,
                disk_reserve_bytes=disk_reserve_bytes,
            )
            report.scaled = data_size(_files_in(grown))
            progress(f"{prefix}a system on each copy: {base.posts:,} and {report.scaled.posts:,} posts")
            with ExitStack() as copies:
                start = start or started_like(settings)
                systems = (copies.enter_context(start(as_seeded)), copies.enter_context(start(grown)))
                progress(
                    f"{prefix}{calls} sequential feed reads of each, after an untimed pass over them, "
                    f"alternated in blocks of {block_calls}"
                )
                requests = feed_requests(dataset, calls, seed=seed)
                report.reads_base, report.reads_scaled = uvloop.run(
                    alternate_reads(systems, requests, block_calls=block_calls)
                )
            ratio = report.ratio
            progress(
                f"{prefix}feed p50 {report.reads_base.percentile(50):.2f} ms at {base.posts:,} posts, "
                f"{report.reads_scaled.percentile(50):.2f} ms at {report.scaled.posts:,}; "
                f"ratio {'-' if ratio is None else f'{ratio:.2f}'}"
            )
    except BaseException:
        progress(f"{prefix}did not finish; the copies, and their systems' logs, are kept in {workdir}")
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    return report


def _short_of_disk(report: ScaleReport, extra: int, workdir: Path, reserve_bytes: int) -> str | None:
    """Why a second copy and the load would not fit on the disk, or None if they would."""
    free = shutil.disk_usage(workdir).free
    copy_bytes = sum(report.base.db_bytes.values())
    needed = copy_bytes + report.estimated_bytes
    if needed <= free - reserve_bytes:
        return None
    return (
        f"a second copy of the databases ({copy_bytes / 2**30:.1f} GiB) and {extra:,} more posts x "
        f"{report.expected_fanout:.0f} timeline rows each would take about {needed / 2**30:.1f} GiB; "
        f"{free / 2**30:.1f} GiB are free and {reserve_bytes / 2**30:.1f} GiB must stay free"
    )


def _settings_in(settings: Settings, data_dir: Path) -> Settings:
    """`settings` with every database a SQLite file in `data_dir`."""
    return settings.model_copy(update={"data_dir": data_dir, "database_urls": {}})


def _files_in(data_dir: Path) -> dict[str, Path]:
    """The loaded services' database files in a directory of copies."""
    return {service: data_dir / f"{service}.db" for service in SERVICES}
