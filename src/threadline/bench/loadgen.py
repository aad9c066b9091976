"""An open-loop HTTP load generator: a fixed arrival rate, latency from each request's intended send time.

Request i is due at `start + i / rate`. A scheduler sleeps until each due time and launches the
request as its own task without waiting for earlier ones, so a slow server never slows the
schedule down (no coordinated omission): its slowness shows up as latency, measured from the due
time to the end of the answer's body. A generator that falls behind shows up the same way, and
in `max_send_lag_ms`, which says whether the generator itself kept up.
"""

import asyncio
import math
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import psutil
from yarl import URL

from threadline.runner import Runner

__all__ = [
    "LoadResult",
    "MachineTimes",
    "Request",
    "RequestSource",
    "cpu_seconds",
    "nearest_rank",
    "processes_of",
    "rounded_ms",
    "run_open_loop",
]

_CPUCLOCK_SCHED = 2


@dataclass(frozen=True)
class Request:
    """One HTTP request to send."""

    method: str
    path: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    kind: str = ""


RequestSource = Callable[[random.Random], Request]


def processes_of(runner: Runner) -> dict[str, psutil.Process]:
    """A started topology's processes by name, NATS's included when it started one."""
    found = {p.spec.name: psutil.Process(p.pid) for p in runner.processes}
    if runner.nats is not None and runner.nats.pid is not None:
        found["nats"] = psutil.Process(runner.nats.pid)
    return found


def cpu_seconds(processes: Mapping[str, psutil.Process]) -> dict[str, float]:
    """Each process's CPU time so far (user + system, exited threads included), in seconds."""
    return {name: _process_cpu_seconds(process) for name, process in processes.items()}


def _process_cpu_seconds(process: psutil.Process) -> float:
    # The OS's user and system times come in clock ticks (10 ms here): a hundred sequential reads
    # of a millisecond each can show as nothing, and an idle process's timers as 0 or 10 ms a
    # second. Linux gives any process's CPU clock in nanoseconds through a clock id made from its
    # pid (MAKE_PROCESS_CPUCLOCK with CPUCLOCK_SCHED in the kernel's posix-timers.h).
    if sys.platform == "linux":
        try:
            return time.clock_gettime_ns(((~process.pid) << 3) | _CPUCLOCK_SCHED) / 1e9
        except OSError:
            pass  # no such clock (the process is gone): psutil's reading below says so its own way
    times = process.cpu_times()
    return float(times.user + times.system)


@dataclass(frozen=True)
class MachineTimes:
    """The whole machine's CPU time so far, all CPUs, and how much of it the hypervisor lent away."""

    total_s: float
    stolen_s: float | None  # None where the system does not say (not Linux)

    @classmethod
    def now(cls) -> "MachineTimes":
        """A reading."""
        times = psutil.cpu_times()
        guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)  # already in user/nice
        return cls(total_s=sum(times) - guest, stolen_s=getattr(times, "steal", None))

    def stolen_share_since(self, earlier: "MachineTimes") -> float | None:
        """Of the CPU time since `earlier`, the share other machines on the same host got (steal time).

        A share above a few percent means the host was busy: this machine's code ran slower and
        costlier then, and the figures measured meanwhile are not comparable with others.
        """
        elapsed = self.total_s - earlier.total_s
        if self.stolen_s is None or earlier.stolen_s is None or elapsed <= 0:
            return None
        return max(0.0, self.stolen_s - earlier.stolen_s) / elapsed


def nearest_rank(ordered: list[float], p: float) -> float:
    """The nearest-rank `p`th percentile of an already sorted list; nan if it is empty."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def rounded_ms(value: float) -> float | None:
    """Milliseconds rounded for a report; None for nan, which JSON cannot carry."""
    return None if math.isnan(value) else round(value, 3)


@dataclass
class LoadResult:
    """What one open-loop run offered, what came back, and what the generator itself cost."""

    offered_rate: float
    duration_s: float
    sent: int
    completed: int
    errors: int
    client_errors: int
    latencies_ms: list[float]
    by_kind: dict[str, list[float]]
    achieved_rate: float
    generator_cpu_s: float
    max_send_lag_ms: float
    dropped: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def percentile(self, p: float) -> float:
        """The nearest-rank `p`th percentile (0-100) of the latencies in ms; nan if none completed."""
        return nearest_rank(sorted(self.latencies_ms), p)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary: rates, counts, percentiles, per-kind percentiles, generator cost."""
        ordered = sorted(self.latencies_ms)
        kinds = {}
        for kind, values in sorted(self.by_kind.items()):
            kind_ordered = sorted(values)
            kinds[kind] = {
                "completed": len(kind_ordered),
                "p50_ms": rounded_ms(nearest_rank(kind_ordered, 50)),
                "p99_ms": rounded_ms(nearest_rank(kind_ordered, 99)),
            }
        return {
            "offered_rate": self.offered_rate,
            "duration_s": self.duration_s,
            "wall_s": round(self.wall_s, 3),
            "sent": self.sent,
            "completed": self.completed,
            "errors": self.errors,
            "client_errors": self.client_errors,
            "dropped": self.dropped,
            "error_reasons": dict(self.error_reasons),
            "achieved_rate": round(self.achieved_rate, 3),
            "p50_ms": rounded_ms(nearest_rank(ordered, 50)),
            "p90_ms": rounded_ms(nearest_rank(ordered, 90)),
            "p99_ms": rounded_ms(nearest_rank(ordered, 99)),
            "max_ms": rounded_ms(ordered[-1] if ordered else math.nan),
            "by_kind": kinds,
            "generator_cpu_s": round(self.generator_cpu_s, 4),
            "generator_cpu_share": round(self.generator_cpu_s / self.wall_s, 4) if self.wall_s > 0 else None,
            "max_send_lag_ms": round(self.max_send_lag_ms, 3),
        }


class _Run:
    """The mutable tallies of one run, updated by the request tasks."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.completed = 0
        self.errors = 0
        self.client_errors = 0
        self.latencies_ms: list[float] = []
        self.by_kind: dict[str, list[float]] = {}
        self.error_reasons: dict[str, int] = {}
        self.max_lag_s = 0.0
        # Parsing a URL is a noticeable share of a request's client-side CPU, and most paths repeat.
        self._urls: dict[str, URL] = {}

    def url(self, path: str) -> URL:
        """The parsed URL of `path`, cached while the cache is small."""
        url = self._urls.get(path)
        if url is None:
            url = URL(self.base_url + path, encoded=True)
            if len(self._urls) < 50_000:
                self._urls[path] = url
        return url

    def fail(self, reason: str, *, client: bool = False) -> None:
        """Count one failed request."""
        if client:
            self.client_errors += 1
        else:
            self.errors += 1
        self.error_reasons[reason] = self.error_reasons.get(reason, 0) + 1

    async def send(self, request: Request, due: float) -> None:
        """Send one request, read its whole answer, and record its latency from `due`."""
        lag = time.perf_counter() - due
        if lag > self.max_lag_s:
            self.max_lag_s = lag
        try:
            async with self.session.request(
                request.method, self.url(request.path), data=request.body, headers=request.headers
            ) as response:
                await response.read()
                status = response.status
        except asyncio.CancelledError:
            self.fail("unfinished")
            raise
        except TimeoutError:
            self.fail("timeout")
            return
        except (aiohttp.ClientError, OSError) as error:
            self.fail(type(error).__name__)
            return
        latency_ms = (time.perf_counter() - due) * 1000
        if status >= 500:
            self.fail(str(status))
        elif status >= 400:
            self.fail(str(status), client=True)
        else:
            self.completed += 1
            self.latencies_ms.append(latency_ms)
            kind = self.by_kind.get(request.kind)
            if kind is None:
                kind = self.by_kind[request.kind] = []
            kind.append(latency_ms)


async def run_open_loop(
    base_url: str,
    source: RequestSource,
    *,
    rate: float,
    duration_s: float,
    seed: int = 0,
    max_in_flight: int = 2000,
    timeout_s: float = 10.0,
) -> LoadResult:
    """Offer `rate` requests/s drawn from `source` for `duration_s` seconds, open loop, and measure them.

    `sent` counts every scheduled request. One that would exceed `max_in_flight` outstanding
    ones is dropped and counted as an error instead of delaying the schedule. Each request may
    take up to `timeout_s`, and after the last send the outstanding ones get up to `timeout_s`
    more; those still unfinished then count as errors. So `sent == completed + errors +
    client_errors`.
    """
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration_s must be positive")
    rng = random.Random(seed)
    total = round(rate * duration_s)
    interval = 1.0 / rate
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=max_in_flight, limit_per_host=0, ttl_dns_cache=None)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )
    run = _Run(base_url, session)
    tasks: set[asyncio.Task[None]] = set()
    dropped = 0
    cpu_start = time.process_time()
    wall_start = time.monotonic()
    try:
        # The clock is perf_counter, not loop.time(): uvloop's is cached per iteration, in whole ms.
        start = time.perf_counter()
        for i in range(total):
            due = start + i * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request = source(rng)
            if len(tasks) >= max_in_flight:
                dropped += 1
                run.fail("dropped")
                continue
            task = loop.create_task(run.send(request, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await session.close()
    wall_s = time.monotonic() - wall_start
    return LoadResult(
        offered_rate=rate,
        duration_s=duration_s,
        sent=total,
        completed=run.completed,
        errors=run.errors,
        client_errors=run.client_errors,
        latencies_ms=run.latencies_ms,
        by_kind=run.by_kind,
        achieved_rate=run.completed / duration_s,
        generator_cpu_s=time.process_time() - cpu_start,
        max_send_lag_ms=run.max_lag_s * 1000,
        dropped=dropped,
        error_reasons=run.error_reasons,
        wall_s=wall_s,
    )
