"""Feed reads at scale: the same home-feed reads before and after the data set grows to a target size.

The target: a feed read's p50 at 1M posts stays within 1.2x its p50 at the API-seeded size, that
is, its cost does not depend on how much data there is. Seeding 1M posts through the API (each
one fanned out by events) would take hours, so after the API-seeded data set has been measured,
a bulk loader writes the extra posts straight into the running system's SQLite files, in large
transactions: for each post its `posts` row, its `thread_nodes` row, feed's `post_copies` row,
and its `timeline_entries` rows for its author and every account that follows the author by
feed's own copy of the follow graph. That is what the services themselves would have stored,
with the tables taken from each service's store module. The services keep running meanwhile
(WAL lets another process write; their writers retry BEGIN IMMEDIATE, so each loader
transaction is kept short, about `ROWS_PER_TRANSACTION` rows).

Bulk posts are public root posts (no replies, likes or subscribers-only posts) by uniformly
drawn seeded accounts, as seeding draws its authors, so that the timelines grow in the same
proportions as the seeded ones. They are dated in the 30 days before the oldest seeded post, evenly spread and
oldest first, and their ids are UUIDv7s of those instants: the newest page of every timeline is
still the API-seeded posts, and a feed read has to find it in an index that is about
`target / seeded` times larger. Dating them after the seeded posts would instead make every read
a read of bulk rows, which measures the loader's rows rather than the size of the data.

Both series of reads are the same requests (the mix's feed reads, drawn with the same seed, so
the same readers in the same order), sent one at a time over one keep-alive connection; wall time
per call. Each series is timed on its second pass over those requests (`warm_then_read_feeds`):
the first, untimed, leaves the same things in memory for both sizes (the posts the pages show in
the posts service's cache, the pages of the index that those timelines use in SQLite's and the
kernel's caches). A warm-up of other reads would not: the 1M series, coming second, would find
the base series' posts kept and the base series would not, and the order, not the size, would
then decide much of the ratio (it measured 0.78x once that way). This measures the cost of a
larger index, not of a cold disk or a cold cache. Before loading, the expected disk use is estimated from
the seeded databases' size per row, and the load is skipped (or stopped) rather than fill the
disk.
"""

import asyncio
import math
import random
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from threadline.bench.loadgen import Request, nearest_rank, rounded_ms
from threadline.bench.opcost import SequentialClient, requests_by_kind
from threadline.bench.workload import Dataset, social_mix
from threadline.platform.ids import id_at
from threadline.platform.settings import Settings
from threadline.services.feed.store import follows, post_copies, timeline_entries
from threadline.services.posts.store import authors, posts
from threadline.services.threads.store import thread_nodes

__all__ = [
    "FEED_CALLS",
    "ROWS_PER_TRANSACTION",
    "TARGET_RATIO",
    "DataSize",
    "FeedReads",
    "LoadOutcome",
    "ScaleError",
    "ScaleReport",
    "bulk_load",
    "data_size",
    "database_paths",
    "feed_requests",
    "measure_at_scale",
    "read_feeds",
    "warm_then_read_feeds",
]

TARGET_RATIO = 1.2
FEED_CALLS = 1000
ROWS_PER_TRANSACTION = 200_000
MAX_POSTS_PER_TRANSACTION = 20_000
BULK_SPAN_MS = 30 * 86_400_000
DISK_RESERVE_BYTES = 2 * 2**30
SERVICES = ("posts", "feed", "threads")
PROGRESS_EVERY_S = 15.0
_DIALECT = sqlite.dialect(paramstyle="named")
_WORDS = ("archive", "batch", "index", "page", "cursor", "older", "quiet", "weekday", "rerun", "notes")

Progress = Callable[[str], None]


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
    """Feed reads at the seeded size and at the target size, and what it took to get there."""

    target_posts: int
    base: DataSize
    reads_base: FeedReads
    expected_fanout: float
    estimated_bytes: int
    scaled: DataSize | None = None
    reads_scaled: FeedReads | None = None
    load: LoadOutcome | None = None
    skipped: str | None = None
    target_ratio: float = TARGET_RATIO

    @property
    def ratio(self) -> float | None:
        """Scaled p50 over seeded p50, if both were measured."""
        if self.reads_scaled is None:
            return None
        base, scaled = self.reads_base.percentile(50), self.reads_scaled.percentile(50)
        return None if math.isnan(base) or math.isnan(scaled) or base <= 0 else scaled / base

    @property
    def first_pages_unchanged(self) -> int | None:
        """Calls whose page after loading starts with the page they got before (seeded posts on top)."""
        if self.reads_scaled is None:
            return None
        pairs = zip(self.reads_base.first_pages, self.reads_scaled.first_pages, strict=True)
        return sum(1 for before, after in pairs if before and after[: len(before)] == before)

    @property
    def met(self) -> bool | None:
        """Whether the target held; None when the target size was not reached, so nothing was measured."""
        ratio = self.ratio
        if ratio is None or self.scaled is None or self.scaled.posts < self.target_posts:
            return None
        scaled_errors = self.reads_scaled.errors if self.reads_scaled is not None else 0
        return scaled_errors == 0 and self.reads_base.errors == 0 and ratio <= self.target_ratio

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        scaled, load, reads_scaled, ratio = self.scaled, self.load, self.reads_scaled, self.ratio
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
            "feed_untimed_pass_calls": self.reads_base.calls,
            "feed_ms_base": self.reads_base.to_dict(),
            "feed_ms_scaled": reads_scaled.to_dict() if reads_scaled else None,
            "feed_p50_ms_base": rounded_ms(self.reads_base.percentile(50)),
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


def database_paths(settings: Settings) -> dict[str, Path]:
    """The SQLite files of the posts, feed and threads services; ScaleError if one is not SQLite."""
    paths = {}
    for service in SERVICES:
        url = sa.engine.make_url(settings.database_url(service))
        if url.get_backend_name() != "sqlite" or not url.database:
            raise ScaleError(f"the bulk loader writes SQLite files, and {service} uses {url.drivername}")
        paths[service] = Path(url.database)
    return paths


def feed_requests(dataset: Dataset, calls: int, *, seed: int = 0) -> list[Request]:
    """`calls` home-feed reads as the social mix draws them."""
    return requests_by_kind(social_mix(dataset), calls, seed=seed)["feed"]


async def read_feeds(base_url: str, requests: Sequence[Request], *, timeout_s: float = 10.0) -> FeedReads:
    """Send `requests` one at a time over one keep-alive connection; wall time and page of each."""
    reads = FeedReads(latencies_ms=[], errors=0, error_reasons={}, items=0, first_pages=[])
    async with SequentialClient(base_url, timeout_s=timeout_s) as client:
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


async def warm_then_read_feeds(base_url: str, requests: Sequence[Request]) -> FeedReads:
    """`read_feeds` twice over the same requests; the second pass, what the first left cached, is returned."""
    await read_feeds(base_url, requests)
    return await read_feeds(base_url, requests)


class _Db:
    """One service's SQLite file, opened by the loader next to the running service."""

    def __init__(self, path: Path) -> None:
        if not path.exists():
            raise ScaleError(f"no database at {path}: is the system running on this data directory?")
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


async def measure_at_scale(
    base_url: str,
    settings: Settings,
    dataset: Dataset,
    *,
    target_posts: int,
    calls: int = FEED_CALLS,
    seed: int = 0,
    progress: Progress = print,
    label: str = "",
    disk_reserve_bytes: int = DISK_RESERVE_BYTES,
) -> ScaleReport:
    """Feed reads at the present size, then bulk-load to `target_posts` posts, then the same reads again.

    This changes the data for good, so it must be the last thing measured on the system.
    """
    if calls < 1:
        raise ValueError("calls must be positive")
    prefix = f"{label} " if label else ""
    paths = database_paths(settings)
    requests = feed_requests(dataset, calls, seed=seed)
    # The loader ends with a checkpoint; one now makes both sizes, and both series of reads, alike.
    with _opened(paths) as dbs:
        for db in dbs.values():
            db.checkpoint()
    base = data_size(paths)
    progress(
        f"    {prefix}scale: {calls} sequential feed reads at {base.posts:,} posts "
        f"({base.timeline_rows:,} timeline rows), each timed on the second of two passes"
    )
    reads_base = await warm_then_read_feeds(base_url, requests)
    progress(f"    {prefix}scale: feed p50 {reads_base.percentile(50):.2f} ms at {base.posts:,} posts")
    with _opened({"feed": paths["feed"]}) as dbs:
        fanout = _expected_fanout(dataset, _timeline_owners(dbs["feed"], dataset))
    extra = max(target_posts - base.posts, 0)
    estimated = _estimated_extra_bytes(base, extra, fanout)
    report = ScaleReport(
        target_posts=target_posts,
        base=base,
        reads_base=reads_base,
        expected_fanout=fanout,
        estimated_bytes=estimated,
    )
    free = shutil.disk_usage(paths["feed"].parent).free
    if estimated > free - disk_reserve_bytes:
        report.skipped = (
            f"{extra:,} more posts x {fanout:.0f} timeline rows each would take about "
            f"{estimated / 2**30:.1f} GiB; {free / 2**30:.1f} GiB are free and "
            f"{disk_reserve_bytes / 2**30:.1f} GiB must stay free"
        )
        progress(f"    {prefix}scale: skipped: {report.skipped}")
        return report
    report.load = await asyncio.to_thread(
        bulk_load,
        paths,
        dataset,
        target_posts,
        seed=seed,
        progress=progress,
        label=label,
        disk_reserve_bytes=disk_reserve_bytes,
    )
    report.scaled = data_size(paths)
    progress(
        f"    {prefix}scale: {calls} sequential feed reads at {report.scaled.posts:,} posts "
        f"({report.scaled.timeline_rows:,} timeline rows), each timed on the second of two passes"
    )
    report.reads_scaled = await warm_then_read_feeds(base_url, requests)
    ratio = report.ratio
    progress(
        f"    {prefix}scale: feed p50 {report.reads_scaled.percentile(50):.2f} ms at "
        f"{report.scaled.posts:,} posts; ratio {'-' if ratio is None else f'{ratio:.2f}'}"
    )
    return report
