"""Operation cost: the CPU that one operation of each kind costs the whole running system.

The request mix is drawn with a seeded generator and split by `Request.kind`. Kind by kind, one
client sends a warm-up and then `calls` requests of that kind, one after the other over one
keep-alive connection, so nothing else runs in the system meanwhile. A read kind's warm-up is a
first pass over the very requests then measured, its CPU reported beside the rest
(`first_pass_cpu_ms_per_call`): what a read costs once the caches hold what it reads, as they do
in a system that has been serving for a while, and what it cost the first time. Without it the
first round filled the posts service's cache and cost up to three times the later ones. A
write cannot be sent twice, so a write kind's warm-up is a few writes of its own. The calls are made in
`rounds`, the kinds taking turns within each, so that a stretch in which the machine ran slower
shows up as a spread between rounds rather than silently in one kind's figure. The cost of a kind is
the CPU time (user + system) that every process of the topology spent from just before the first
call to the end of the work those calls caused, divided by the number of calls, and split per
process. The client's own CPU is not counted.

Work that a call causes after its answer is sent, such as a compose's events fanned out to feed
and threads, is attributed to it by waiting, after the last call, until the system is idle again:
until no process's CPU time has grown by more than `QUIET_CPU_S` for `QUIET_S`, polled and given
up on (and reported as not settled) after `SETTLE_DEADLINE_S`. The same wait precedes the
first call, so that earlier work, including the warm-up's, is not counted. What the processes
spend while idle (timers, relay polls) is counted too; it is reported per second as
`idle_cpu_ms_per_s` so that its share can be judged.
"""

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import psutil
from yarl import URL

from threadline.bench.loadgen import MachineTimes, Request, RequestSource, cpu_seconds

__all__ = [
    "QUIET_CPU_S",
    "QUIET_S",
    "SETTLE_DEADLINE_S",
    "TARGET_CPU_MS_PER_CALL",
    "Answer",
    "OperationCost",
    "SequentialClient",
    "measure_operation_costs",
    "requests_by_kind",
    "wait_until_idle",
]

# The targets as stated: CPU per feed read (20 posts) and per compose, in the monolith.
TARGET_CPU_MS_PER_CALL: dict[str, dict[str, float]] = {"monolith": {"feed": 0.5, "compose": 1.0}}
QUIET_S = 0.5
SETTLE_DEADLINE_S = 30.0
POLL_S = 0.05
# An idle process still spends a little (timers, relay polls): a few ms a second.
QUIET_CPU_S = 0.015
MAX_DRAWS_PER_CALL = 200


@dataclass
class OperationCost:
    """What `calls` sequential requests of one kind cost every process of a topology."""

    kind: str
    calls: int
    errors: int
    cpu_s_by_process: dict[str, float]
    wall_s: float
    settled: bool
    settle_s: float
    idle_cpu_s_per_s: float | None
    warmup_calls: int = 0
    warmup_errors: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)
    items_per_call: float | None = None
    stolen_share: float | None = None
    """Of the machine's CPU time meanwhile, the share the host gave to other machines."""
    cpu_ms_per_call_by_round: list[float] = field(default_factory=list)
    """The CPU per call of each round, in the order they ran."""
    first_pass_cpu_ms_per_call: float | None = None
    """For a read kind, the CPU per call of the untimed first pass over the same requests."""

    @classmethod
    def of_rounds(cls, rounds: "list[OperationCost]") -> "OperationCost":
        """The cost of every call of the rounds together, with each round's CPU per call kept."""
        if not rounds:
            raise ValueError("no rounds to combine")
        first, calls = rounds[0], sum(cost.calls for cost in rounds)
        reasons: dict[str, int] = {}
        for cost in rounds:
            for reason, count in cost.error_reasons.items():
                reasons[reason] = reasons.get(reason, 0) + count
        with_items = [cost.items_per_call for cost in rounds if cost.items_per_call is not None]
        return cls(
            kind=first.kind,
            calls=calls,
            errors=sum(cost.errors for cost in rounds),
            cpu_s_by_process={
                name: sum(cost.cpu_s_by_process[name] for cost in rounds) for name in first.cpu_s_by_process
            },
            wall_s=sum(cost.wall_s for cost in rounds),
            settled=all(cost.settled for cost in rounds),
            settle_s=max(cost.settle_s for cost in rounds),
            idle_cpu_s_per_s=_mean([cost.idle_cpu_s_per_s for cost in rounds]),
            warmup_calls=sum(cost.warmup_calls for cost in rounds),
            warmup_errors=sum(cost.warmup_errors for cost in rounds),
            error_reasons=reasons,
            items_per_call=(
                sum(cost.calls * (cost.items_per_call or 0.0) for cost in rounds) / calls
                if len(with_items) == len(rounds)
                else None
            ),
            stolen_share=_mean([cost.stolen_share for cost in rounds]),
            cpu_ms_per_call_by_round=[cost.cpu_ms_per_call for cost in rounds],
            first_pass_cpu_ms_per_call=first.first_pass_cpu_ms_per_call,
        )

    @property
    def cpu_ms_per_call(self) -> float:
        """CPU time of every process per call, asynchronous follow-up work included."""
        return 1000 * sum(self.cpu_s_by_process.values()) / self.calls

    @property
    def wall_ms_per_call(self) -> float:
        """Mean time from sending a request to having read its whole answer."""
        return 1000 * self.wall_s / self.calls

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        idle = self.idle_cpu_s_per_s
        return {
            "calls": self.calls,
            "cpu_ms_per_call": round(self.cpu_ms_per_call, 4),
            "cpu_ms_by_process": {
                name: round(1000 * cpu / self.calls, 4) for name, cpu in self.cpu_s_by_process.items()
            },
            "wall_ms_per_call": round(self.wall_ms_per_call, 4),
            "errors": self.errors,
            "error_reasons": dict(self.error_reasons),
            "warmup_calls": self.warmup_calls,
            "warmup_errors": self.warmup_errors,
            "items_per_call": None if self.items_per_call is None else round(self.items_per_call, 2),
            "settled": self.settled,
            "settle_s": round(self.settle_s, 3),
            "idle_cpu_ms_per_s": None if idle is None else round(1000 * idle, 3),
            "stolen_share": None if self.stolen_share is None else round(self.stolen_share, 4),
            "cpu_ms_per_call_by_round": [round(cpu, 4) for cpu in self.cpu_ms_per_call_by_round],
            "first_pass_cpu_ms_per_call": (
                None if self.first_pass_cpu_ms_per_call is None else round(self.first_pass_cpu_ms_per_call, 4)
            ),
        }


def requests_by_kind(source: RequestSource, per_kind: int, *, seed: int = 0) -> dict[str, list[Request]]:
    """`per_kind` requests of every kind `source` produces, drawn with a generator seeded with `seed`."""
    if per_kind < 1:
        raise ValueError("need at least one request per kind")
    rng = random.Random(seed)
    found: dict[str, list[Request]] = {}
    for _ in range(MAX_DRAWS_PER_CALL * per_kind):
        request = source(rng)
        found.setdefault(request.kind, []).append(request)
        if all(len(requests) >= per_kind for requests in found.values()):
            break
    short = [kind for kind, requests in found.items() if len(requests) < per_kind]
    if short:
        raise ValueError(f"the mix produces too few requests of kind {', '.join(short)} to draw {per_kind}")
    return {kind: requests[:per_kind] for kind, requests in found.items()}


async def measure_operation_costs(
    base_url: str,
    processes: Mapping[str, psutil.Process],
    source: RequestSource,
    *,
    calls: int,
    rounds: int = 1,
    warmup_calls: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] = print,
    label: str = "",
) -> dict[str, OperationCost]:
    """The cost of `calls` sequential requests of each kind `source` produces, in `rounds`, reads first.

    Each kind is warmed up just before its first round's calls: a read kind by a first pass over
    its measured requests, a write kind by `warmup_calls` writes of its own. Each round's calls
    are measured on their own, so that the result keeps every round's CPU per call beside their
    total.
    """
    if calls < 1 or rounds < 1:
        raise ValueError("calls and rounds must be positive")
    if calls < rounds:
        raise ValueError(f"{calls} calls cannot be split into {rounds} rounds")
    warmup = max(5, min(50, calls // 10)) if warmup_calls is None else warmup_calls
    drawn = requests_by_kind(source, warmup + calls, seed=seed)
    # Reads go first so that they read the data set the earlier phases left, not one grown by these composes.
    kinds = sorted(drawn, key=lambda kind: not _reads(drawn[kind]))
    prefix = f"{label} " if label else ""
    measured: dict[str, list[OperationCost]] = {kind: [] for kind in kinds}
    plural = "s" if rounds > 1 else ""
    async with SequentialClient(base_url) as client:
        for round_index in range(rounds):
            in_round = f" round {round_index + 1}/{rounds}" if rounds > 1 else ""
            for kind in kinds:
                requests = drawn[kind][warmup:]
                start, end = calls * round_index // rounds, calls * (round_index + 1) // rounds
                first_pass: OperationCost | None = None
                warmup_requests: list[Request] = []
                if round_index == 0 and _reads(requests):
                    progress(
                        f"    {prefix}operation cost of {kind}: a first pass over the {calls} calls, "
                        f"then the same calls measured in {rounds} round{plural}"
                    )
                    first_pass = await _measure_kind(client, processes, [], requests)
                    progress(f"    {prefix}{kind} first pass: cpu {first_pass.cpu_ms_per_call:.3f} ms/call")
                elif round_index == 0:
                    warmup_requests = drawn[kind][:warmup]
                    progress(
                        f"    {prefix}operation cost of {kind}: {warmup} warm-up calls, "
                        f"then {calls} measured in {rounds} round{plural}"
                    )
                cost = await _measure_kind(client, processes, warmup_requests, requests[start:end])
                if first_pass is not None:
                    cost.warmup_calls, cost.warmup_errors = first_pass.calls, first_pass.errors
                    cost.first_pass_cpu_ms_per_call = first_pass.cpu_ms_per_call
                measured[kind].append(cost)
                unsettled = "" if cost.settled else f", NOT idle within {SETTLE_DEADLINE_S:.0f} s"
                progress(
                    f"    {prefix}{kind}{in_round}: cpu {cost.cpu_ms_per_call:.3f} ms/call  "
                    f"wall {cost.wall_ms_per_call:.2f} ms/call  errors {cost.errors}  "
                    f"(idle again {cost.settle_s:.1f} s after the last call{unsettled})"
                )
    return {kind: OperationCost.of_rounds(costs) for kind, costs in measured.items()}


def _reads(requests: list[Request]) -> bool:
    """Whether requests may be sent twice: the kind reads (GET) and changes nothing."""
    return requests[0].method == "GET"


async def _measure_kind(
    client: "SequentialClient",
    processes: Mapping[str, psutil.Process],
    warmup: list[Request],
    measured: list[Request],
) -> OperationCost:
    warm = _Tally()
    for request in warmup:
        warm.add(await client.send(request))
    before = await wait_until_idle(processes)
    machine = MachineTimes.now()
    tally = _Tally()
    for request in measured:
        tally.add(await client.send(request))
    after = await wait_until_idle(processes)
    stolen_share = MachineTimes.now().stolen_share_since(machine)
    quiet_s = before.quiet_s + after.quiet_s
    return OperationCost(
        kind=measured[0].kind,
        calls=len(measured),
        errors=tally.errors,
        cpu_s_by_process={name: after.cpu_s[name] - before.cpu_s[name] for name in processes},
        wall_s=tally.wall_s,
        settled=before.settled and after.settled,
        settle_s=after.waited_s,
        idle_cpu_s_per_s=(before.quiet_cpu_s + after.quiet_cpu_s) / quiet_s if quiet_s else None,
        warmup_calls=len(warmup),
        warmup_errors=warm.errors,
        error_reasons=tally.error_reasons,
        items_per_call=tally.items / len(measured) if tally.answers_with_items == len(measured) else None,
        stolen_share=stolen_share,
    )


def _mean(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return sum(known) / len(known) if known else None


@dataclass
class _Tally:
    """What a series of calls returned."""

    errors: int = 0
    wall_s: float = 0.0
    items: int = 0
    answers_with_items: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)

    def fail(self, reason: str) -> None:
        """Count one call that did not get a 2xx answer."""
        self.errors += 1
        self.error_reasons[reason] = self.error_reasons.get(reason, 0) + 1

    def add(self, answer: "Answer") -> None:
        """Count one call's time and outcome."""
        self.wall_s += answer.elapsed_s
        if answer.failure is not None:
            self.fail(answer.failure)
            return
        items = _item_count(answer.body)
        if items is not None:
            self.items += items
            self.answers_with_items += 1


@dataclass(frozen=True)
class Answer:
    """One call's outcome: the body of a 2xx answer, or why there was none; its wall time."""

    body: bytes
    elapsed_s: float
    failure: str | None = None


class SequentialClient:
    """Sends requests one at a time over one keep-alive connection, timing each to its answer's end."""

    def __init__(self, base_url: str, *, timeout_s: float = 10.0) -> None:
        self._base = base_url.rstrip("/")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def __aenter__(self) -> "SequentialClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._session.close()

    async def send(self, request: Request) -> Answer:
        """Send `request` and read its whole answer; a non-2xx status or a transport error is a failure."""
        start = time.perf_counter()
        try:
            async with self._session.request(
                request.method,
                URL(self._base + request.path, encoded=True),
                data=request.body,
                headers=request.headers,
            ) as response:
                body = await response.read()
                status = response.status
        except TimeoutError:
            return Answer(b"", time.perf_counter() - start, "timeout")
        except (aiohttp.ClientError, OSError) as error:
            return Answer(b"", time.perf_counter() - start, type(error).__name__)
        elapsed = time.perf_counter() - start
        return Answer(body, elapsed, None if 200 <= status < 300 else str(status))


def _item_count(body: bytes) -> int | None:
    """How many entries the answer's `items` list holds, if it has one."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    items = answer.get("items") if isinstance(answer, dict) else None
    return len(items) if isinstance(items, list) else None


@dataclass
class _Idle:
    """The outcome of waiting until the system was idle."""

    settled: bool
    waited_s: float
    cpu_s: dict[str, float]
    quiet_s: float = 0.0
    quiet_cpu_s: float = 0.0


async def wait_until_idle(processes: Mapping[str, psutil.Process]) -> _Idle:
    """Poll until no process's CPU time has grown by more than `QUIET_CPU_S` for `QUIET_S`.

    Gives up after `SETTLE_DEADLINE_S`. `waited_s` leaves out the quiet stretch itself, `cpu_s`
    is the reading at its end, and `quiet_cpu_s` what all processes spent during it.
    """
    start = time.monotonic()
    quiet_since, quiet_from = start, cpu_seconds(processes)
    while True:
        await asyncio.sleep(POLL_S)
        now, readings = time.monotonic(), cpu_seconds(processes)
        if any(readings[name] - quiet_from[name] > QUIET_CPU_S for name in processes):
            quiet_since, quiet_from = now, readings
        elif now - quiet_since >= QUIET_S:
            quiet_cpu_s = sum(readings[name] - quiet_from[name] for name in processes)
            return _Idle(True, quiet_since - start, readings, now - quiet_since, quiet_cpu_s)
        if now - start >= SETTLE_DEADLINE_S:
            return _Idle(False, now - start, readings)
