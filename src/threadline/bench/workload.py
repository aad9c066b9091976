"""The benchmark's data set and request mix: seeded through the public API, then a social workload.

The data set is planned from a seed alone (`plan`), so two runs with the same seed and sizes
create the same accounts, follow graph and posts; only the ids the system assigns differ. Account
popularity follows a Zipf-like law: the account at index k is chosen with weight 1/(k+1)**s, both
as a followee and as an author, so a few accounts are followed by many and write much.

The mix is DeathStarBench's social one: 60% home-feed reads, 30% author-timeline reads, 10%
composes (or 5% composes and 5% thread reads).
"""

import asyncio
import bisect
import itertools
import json
import random
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from threadline.bench.loadgen import Request, RequestSource

__all__ = [
    "PASSWORD",
    "Account",
    "Dataset",
    "SeedPlan",
    "SeedingError",
    "Skewed",
    "plan",
    "refresh_tokens",
    "seed",
    "social_mix",
]

PASSWORD = "threadline bench password"
API = "/api/v1"
FEED_SHARE = 0.60
AUTHOR_SHARE = 0.30
PAGE = 20
ATTEMPTS = 5
_LOREM = (
    "coffee morning thread idea ship build latency deploy queue cache river train garden music "
    "weekend review launch bug fix design draft notes question answer story photo"
)
_WORDS = _LOREM.split()


class SeedingError(RuntimeError):
    """The system refused or kept failing a seeding request."""


@dataclass
class Account:
    """A seeded account and a current access token for it."""

    handle: str
    user_id: str
    token: str


@dataclass
class Dataset:
    """What seeding created: accounts (index = popularity rank, 0 the most popular) and post ids."""

    accounts: list[Account]
    post_ids: list[str]
    root_post_ids: list[str]
    zipf_s: float = 1.2
    follows: int = 0
    tokens_expire_at: float | None = None
    """When (`time.monotonic`) the first of the accounts' tokens expires; None if not known."""

    def tokens_expire_within(self, seconds: float) -> bool:
        """Whether a token of some account expires within `seconds` from now."""
        return self.tokens_expire_at is not None and self.tokens_expire_at - time.monotonic() < seconds

    def to_dict(self) -> dict[str, Any]:
        """Its sizes, JSON-friendly."""
        return {
            "users": len(self.accounts),
            "posts": len(self.post_ids),
            "root_posts": len(self.root_post_ids),
            "replies": len(self.post_ids) - len(self.root_post_ids),
            "follows": self.follows,
            "zipf_s": self.zipf_s,
        }


class Skewed:
    """Draws indexes 0..n-1, index k with probability proportional to 1/(k+1)**s."""

    def __init__(self, n: int, s: float) -> None:
        if n < 1:
            raise ValueError("need at least one item to draw from")
        self._cumulative = list(itertools.accumulate(1 / (k**s) for k in range(1, n + 1)))
        self._total = self._cumulative[-1]
        self._last = n - 1

    def draw(self, rng: random.Random) -> int:
        """One index."""
        return min(bisect.bisect_right(self._cumulative, rng.random() * self._total), self._last)


@dataclass
class SeedPlan:
    """Everything seeding will create, decided by the seed alone."""

    handles: list[str]
    follows: list[list[int]]  # per account index, the indexes of the accounts it follows
    authors: "array[int]"  # per post, the author's account index
    reply_to: "array[int]"  # per post, the index of the earlier post it replies to, or -1
    seed: int = 0

    def text(self, post: int) -> str:
        """The text of post number `post`."""
        rng = random.Random(f"{self.seed}:{post}")
        return f"post {post}: " + " ".join(rng.choices(_WORDS, k=rng.randint(3, 12)))

    def follower_of(self, account: int) -> int | None:
        """Some account that follows `account`, if any does."""
        return next((i for i, followees in enumerate(self.follows) if account in followees), None)


def plan(
    *,
    users: int,
    posts: int,
    reply_ratio: float = 0.3,
    follows_per_user: int = 20,
    zipf_s: float = 1.2,
    seed: int = 0,
) -> SeedPlan:
    """The deterministic plan of a data set: handles, a skewed follow graph, authors, replies.

    Who is followed follows the skew (a few accounts have most followers); who writes is uniform,
    as in DeathStarBench's compose. Drawing authors with the same skew made the most followed
    accounts write most posts, for 525 timeline rows per post on average at 1k users.
    """
    if users < 1 or posts < 0 or follows_per_user < 0 or not 0 <= reply_ratio <= 1:
        raise ValueError("need users >= 1, posts >= 0, follows_per_user >= 0 and 0 <= reply_ratio <= 1")
    rng = random.Random(seed)
    skew = Skewed(users, zipf_s)
    handles = [f"bench{seed % 1_000_000}_{i}" for i in range(users)]
    per_user = min(follows_per_user, users - 1)
    follows = [_followees(i, per_user, users, skew, rng) for i in range(users)]
    authors = array("l", (rng.randrange(users) for _ in range(posts)))
    replies = set(rng.sample(range(1, posts), min(round(reply_ratio * posts), posts - 1))) if posts else set()
    reply_to = array("l", (rng.randrange(i) if i in replies else -1 for i in range(posts)))
    return SeedPlan(handles=handles, follows=follows, authors=authors, reply_to=reply_to, seed=seed)


def _followees(user: int, count: int, users: int, skew: Skewed, rng: random.Random) -> list[int]:
    """`count` distinct accounts other than `user`, drawn with the skew."""
    chosen: dict[int, None] = {}
    for _ in range(50 * count):
        if len(chosen) == count:
            break
        other = skew.draw(rng)
        if other != user:
            chosen[other] = None
    # The skew makes the last few distinct picks slow for tiny graphs; fill them by rank.
    for other in range(users):
        if len(chosen) == count:
            break
        if other != user:
            chosen.setdefault(other, None)
    return list(chosen)


class _Progress:
    """Reports a phase's progress about every 10%."""

    def __init__(self, phase: str, total: int, report: Callable[[str], None], *, done: int = 0) -> None:
        self._phase = phase
        self._total = total
        self._report = report
        self._step = max(1, total // 10)
        self._start = time.monotonic()
        self._done_before = done
        self.done = done

    def tick(self) -> None:
        """One more item done."""
        self.done += 1
        if self.done % self._step == 0 or self.done == self._total:
            rate = (self.done - self._done_before) / max(time.monotonic() - self._start, 1e-9)
            share = 100 * self.done // self._total
            self._report(f"seeding {self._phase} {self.done}/{self._total} ({share}%) {rate:.0f}/s")


async def _bounded(count: int, concurrency: int, work: Callable[[int], Awaitable[None]]) -> None:
    """Run `work(0)` .. `work(count - 1)`, started in order, at most `concurrency` at a time."""
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        try:
            await work(i)
        finally:
            slots.release()

    try:
        async with asyncio.TaskGroup() as group:
            for i in range(count):
                await slots.acquire()
                group.create_task(one(i))
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None


class _Client:
    """Calls the public API for seeding: retries transient failures, logs in again on 401."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self._base = base_url.rstrip("/") + API
        self._session = session
        self._logins: dict[str, asyncio.Lock] = {}
        self.expires_at: dict[str, float] = {}
        self.lifetimes: dict[str, float] = {}

    def first_expiry(self) -> float | None:
        """When the first of the tokens this client got expires (`time.monotonic`); None if it got none."""
        return min(self.expires_at.values(), default=None)

    async def call(
        self, method: str, path: str, *, body: Any = None, account: Account | None = None
    ) -> tuple[int, Any]:
        """Send one request; the answer's status and JSON body. Retries transport errors and 5xx."""
        for attempt in range(ATTEMPTS):
            token = account.token if account is not None else None
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            try:
                async with self._session.request(
                    method, self._base + path, json=body, headers=headers
                ) as response:
                    raw = await response.read()
                    status = response.status
            except (aiohttp.ClientError, OSError, TimeoutError) as error:
                failure = f"{type(error).__name__}: {error}"
            else:
                answer = json.loads(raw) if raw else None
                if status == 401 and account is not None and token:
                    failure = f"401 {answer}"
                    await self.login(account, stale=token)
                    continue
                if status < 500:
                    return status, answer
                failure = f"{status} {answer}"
            await asyncio.sleep(0.2 * 2**attempt)
        raise SeedingError(f"{method} {path} kept failing: {failure}")

    def expect(self, wanted: int, status: int, answer: Any, what: str) -> None:
        """Raise unless `status` is the one wanted."""
        if status != wanted:
            raise SeedingError(f"{what}: expected {wanted}, got {status} {answer}")

    async def login(self, account: Account, *, stale: str | None = None) -> None:
        """Get `account` a fresh token, unless another task already replaced the stale one."""
        lock = self._logins.setdefault(account.handle, asyncio.Lock())
        async with lock:
            if stale is not None and account.token != stale:
                return
            status, answer = await self.call(
                "POST", "/sessions", body={"handle": account.handle, "password": PASSWORD}
            )
            self.expect(200, status, answer, f"logging in {account.handle}")
            account.token = answer["access_token"]
            lifetime = float(answer.get("expires_in", 0))
            self.lifetimes[account.handle] = lifetime
            self.expires_at[account.handle] = time.monotonic() + lifetime


async def seed(
    base_url: str,
    *,
    users: int,
    posts: int,
    reply_ratio: float = 0.3,
    follows_per_user: int = 20,
    zipf_s: float = 1.2,
    seed: int = 0,
    concurrency: int = 16,
    progress: Callable[[str], None] = print,
    settle_stall_s: float = 120.0,
) -> Dataset:
    """Create the planned data set through the public API at `base_url` and wait until it has settled.

    Accounts are registered (or, if a handle exists from an earlier run, logged into), then
    follow each other, then write posts and replies, at most `concurrency` requests at a time.
    Feeds and threads are built from events, which can lag far behind these writes, so it waits
    for the follow graph to reach the feeds before writing the posts, and for every post to reach
    its thread and its author's followers' feeds before returning. It gives up only when that
    catching up makes no progress for `settle_stall_s`.
    """
    layout = plan(
        users=users,
        posts=posts,
        reply_ratio=reply_ratio,
        follows_per_user=follows_per_user,
        zipf_s=zipf_s,
        seed=seed,
    )
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        client = _Client(base_url, session)
        accounts = await _create_accounts(client, layout, concurrency, progress)
        post_ids = [""] * posts
        # Post 0 goes out before any follow: its arrival in followers' feeds shows the follows arrived.
        await _write_posts(client, layout, accounts, post_ids, range(min(posts, 1)), concurrency, None)
        follows = await _follow(client, layout, accounts, post_ids, concurrency, settle_stall_s, progress)
        writing = _Progress("posts", posts, progress, done=min(posts, 1))
        await _write_posts(client, layout, accounts, post_ids, range(1, posts), concurrency, writing)
        await _settle(client, layout, accounts, post_ids, settle_stall_s, progress)
        await _refresh_stale(client, accounts, concurrency)
    roots = [post_ids[i] for i in range(posts) if layout.reply_to[i] < 0]
    return Dataset(
        accounts=accounts,
        post_ids=post_ids,
        root_post_ids=roots,
        zipf_s=zipf_s,
        follows=follows,
        tokens_expire_at=client.first_expiry(),
    )


async def _create_accounts(
    client: _Client, layout: SeedPlan, concurrency: int, progress: Callable[[str], None]
) -> list[Account]:
    found: list[Account | None] = [None] * len(layout.handles)
    meter = _Progress("users", len(layout.handles), progress)

    async def create(i: int) -> None:
        handle = layout.handles[i]
        body = {"handle": handle, "password": PASSWORD, "display_name": f"Bench user {i}"}
        status, answer = await client.call("POST", "/users", body=body)
        if status == 409:
            status, answer = await client.call("GET", f"/users/{handle}")
            client.expect(200, status, answer, f"reading existing user {handle}")
        else:
            client.expect(201, status, answer, f"registering {handle}")
        account = Account(handle=handle, user_id=answer["id"], token="")
        await client.login(account)
        found[i] = account
        meter.tick()

    await _bounded(len(found), concurrency, create)
    return [account for account in found if account is not None]


async def _follow(
    client: _Client,
    layout: SeedPlan,
    accounts: list[Account],
    post_ids: list[str],
    concurrency: int,
    stall_s: float,
    progress: Callable[[str], None],
) -> int:
    """Create the follow graph; then wait until feed knows it, if post 0 can show that."""
    edges = [
        (follower, followee) for follower, followees in enumerate(layout.follows) for followee in followees
    ]
    meter = _Progress("follows", len(edges), progress)

    async def follow(i: int) -> None:
        follower, followee = edges[i]
        status, answer = await client.call(
            "PUT", f"/me/following/{accounts[followee].handle}", account=accounts[follower]
        )
        client.expect(204, status, answer, "following")
        meter.tick()

    first_author = layout.authors[0] if post_ids else None
    witnesses = [i for i, (_, followee) in enumerate(edges) if followee == first_author]
    if not witnesses:
        await _bounded(len(edges), concurrency, follow)
        return len(edges)
    # The last follow of post 0's author is sent alone, after all others: the last event of them.
    last = witnesses[-1]
    edges.append(edges.pop(last))
    witnesses[-1] = len(edges) - 1
    await _bounded(len(edges) - 1, concurrency, follow)
    await follow(len(edges) - 1)
    readers = [accounts[edges[i][0]] for i in witnesses]

    async def reached(k: int) -> bool:
        return await _feed_shows(client, readers[k], {post_ids[0]})

    await _catch_up(
        "follows in feeds", len(readers), lambda: _highest(len(readers), reached), stall_s, progress
    )
    return len(edges)


async def _write_posts(
    client: _Client,
    layout: SeedPlan,
    accounts: list[Account],
    ids: list[str],
    indexes: range,
    concurrency: int,
    meter: _Progress | None,
) -> None:
    """Write the posts numbered `indexes`, filling in their ids."""
    # A reply may be due before the post it answers has its id; it waits for it here.
    waiting: dict[int, asyncio.Future[str]] = {}
    loop = asyncio.get_running_loop()

    async def write(n: int) -> None:
        i = indexes[n]
        body: dict[str, Any] = {"text": layout.text(i)}
        target = layout.reply_to[i]
        if target >= 0:
            if ids[target]:
                body["reply_to"] = ids[target]
            else:
                body["reply_to"] = await waiting.setdefault(target, loop.create_future())
        status, answer = await client.call("POST", "/posts", body=body, account=accounts[layout.authors[i]])
        client.expect(201, status, answer, f"writing post {i}")
        ids[i] = answer["id"]
        future = waiting.pop(i, None)
        if future is not None:
            future.set_result(ids[i])
        if meter is not None:
            meter.tick()

    await _bounded(len(indexes), concurrency, write)


async def _settle(
    client: _Client,
    layout: SeedPlan,
    accounts: list[Account],
    post_ids: list[str],
    stall_s: float,
    progress: Callable[[str], None],
) -> None:
    """Wait until every post is in its thread, and the last one in a follower's feed."""
    if not post_ids:
        return
    start = time.monotonic()
    total = len(post_ids)

    async def in_thread(i: int) -> bool:
        return await _thread_has(client, post_ids[i])

    await _catch_up("posts in threads", total, lambda: _highest(total, in_thread), stall_s, progress)
    last = total - 1
    author = layout.authors[last]
    follower = layout.follower_of(author)
    reader_index = author if follower is None else follower
    reader = accounts[reader_index]
    visible = {reader_index, *layout.follows[reader_index]}
    position = {post_ids[i]: i for i in range(total) if layout.authors[i] in visible}

    async def newest_in_feed() -> int:
        shown = await _feed_ids(client, reader)
        return max((position.get(post_id, -1) for post_id in shown), default=-1)

    await _catch_up("posts in feeds", total, newest_in_feed, stall_s, progress)
    progress(f"seeding settled: threads and feeds caught up in {time.monotonic() - start:.1f} s")


async def _catch_up(
    what: str,
    total: int,
    position: Callable[[], Awaitable[int]],
    stall_s: float,
    progress: Callable[[str], None],
) -> None:
    """Poll `position` (the highest index arrived) until it is the last; fail if it stalls `stall_s`."""
    best = -1
    stalled_at = time.monotonic() + stall_s
    next_report = time.monotonic() + 10
    while (reached := await position()) < total - 1:
        now = time.monotonic()
        if reached > best:
            best = reached
            stalled_at = now + stall_s
        elif now > stalled_at:
            raise SeedingError(f"{what} stopped at {best + 1}/{total} for {stall_s:.0f} s")
        if now > next_report:
            progress(f"seeding: waiting for {what}, {best + 1}/{total} arrived")
            next_report = now + 10
        await asyncio.sleep(0.2)


async def _highest(total: int, reached: Callable[[int], Awaitable[bool]]) -> int:
    """The highest index in 0..total-1 that `reached`, for items that arrive in order; -1 if none."""
    if await reached(total - 1):
        return total - 1
    low, high = -1, total - 1  # reached(low) holds (or low is -1); reached(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        if await reached(middle):
            low = middle
        else:
            high = middle
    return low


async def _feed_ids(client: _Client, reader: Account) -> set[str]:
    status, answer = await client.call("GET", "/feed?limit=100", account=reader)
    client.expect(200, status, answer, "reading a feed")
    return {item["id"] for item in answer["items"]}


async def _feed_shows(client: _Client, reader: Account, post_ids: set[str]) -> bool:
    return post_ids <= await _feed_ids(client, reader)


async def _thread_has(client: _Client, post_id: str) -> bool:
    status, answer = await client.call("GET", f"/threads/{post_id}")
    if status == 404:
        return False
    client.expect(200, status, answer, "reading a thread")
    return any(post["id"] == post_id for post in [answer["root"], *answer["replies"]])


async def _refresh_stale(client: _Client, accounts: list[Account], concurrency: int) -> None:
    """Log in again every account whose token has less than half of its lifetime left."""
    now = time.monotonic()
    stale = [
        account
        for account in accounts
        if client.expires_at.get(account.handle, now) - now < client.lifetimes.get(account.handle, 0.0) / 2
    ]

    async def refresh(i: int) -> None:
        await client.login(stale[i])

    await _bounded(len(stale), concurrency, refresh)


async def refresh_tokens(base_url: str, dataset: Dataset, *, concurrency: int = 16) -> None:
    """Log every account of `dataset` in again, replacing its token (they expire; see `expires_in`).

    The request mix holds the tokens it was built with: build it again afterwards.
    """
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        client = _Client(base_url, session)

        async def refresh(i: int) -> None:
            await client.login(dataset.accounts[i])

        await _bounded(len(dataset.accounts), concurrency, refresh)
        dataset.tokens_expire_at = client.first_expiry()


def social_mix(dataset: Dataset, *, thread_reads: bool = False) -> RequestSource:
    """The social request mix over `dataset`: 60% feed, 30% author posts, 10% compose (or 5% + 5% thread).

    Every request is sent as a uniformly drawn account, as in DeathStarBench; the author whose
    posts are read is drawn with the data set's skew (popular accounts are read most). Tokens
    are taken now: after `refresh_tokens`, build the mix again.
    """
    accounts = dataset.accounts
    if not accounts:
        raise ValueError("the data set has no accounts")
    roots = list(dataset.root_post_ids)
    if thread_reads and not roots:
        raise ValueError("thread reads need at least one root post")
    skew = Skewed(len(accounts), dataset.zipf_s)
    read_headers = [{"Authorization": f"Bearer {a.token}"} for a in accounts]
    write_headers = [{**h, "Content-Type": "application/json"} for h in read_headers]
    author_paths = [f"{API}/users/{a.handle}/posts?limit={PAGE}" for a in accounts]
    feed_path = f"{API}/feed?limit={PAGE}"
    posts_path = f"{API}/posts"
    compose_end = FEED_SHARE + AUTHOR_SHARE + (0.05 if thread_reads else 0.10)

    def next_request(rng: random.Random) -> Request:
        choice = rng.random()
        actor = rng.randrange(len(accounts))
        if choice < FEED_SHARE:
            return Request("GET", feed_path, headers=read_headers[actor], kind="feed")
        if choice < FEED_SHARE + AUTHOR_SHARE:
            return Request(
                "GET", author_paths[skew.draw(rng)], headers=read_headers[actor], kind="author_posts"
            )
        if choice < compose_end:
            body = b'{"text":"compose %08x"}' % rng.getrandbits(32)
            return Request("POST", posts_path, body=body, headers=write_headers[actor], kind="compose")
        root = roots[rng.randrange(len(roots))]
        return Request("GET", f"{API}/threads/{root}", headers=read_headers[actor], kind="thread")

    return next_request
