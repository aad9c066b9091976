"""`threadline bench`: the same workload against each topology on this machine, side by side.

Every topology is started with the runner on a fresh data directory and seeded with the same
data set through the public API; all of them keep running until the end. On each freshly seeded
system it first measures the CPU cost of one operation of each kind in the mix
(`threadline.bench.opcost`), against the targets stated per operation. Then the social mix is
offered at rising fixed rates (open loop), the topologies taking turns rate by rate. Per rate it
records latency percentiles from each request's intended send time, CPU seconds per request
summed over every process (and per process, which in the microservices topology is per
service), and the peak resident memory of each process. The highest rate whose p99 stays under
the bound, with under 1% errors and at least 95% of the offered rate completed, is the max
sustainable throughput; the default rates go on rising past their last (by a quarter each step)
until one is not, and after the first rate that is not, rates halfway between narrow it down
(`RateLadder`). Last, if asked, it copies each system's databases twice, grows one copy by bulk
loading, and measures feed reads at both sizes side by side (`threadline.bench.scale`).

Instead of starting the topologies it can measure systems already running (`BenchConfig.targets`,
each a gateway's URL: another machine, or processes started by hand). Those are seeded and offered
the same rates; what needs their processes on this machine (CPU, memory, the cost per operation,
the bulk loading) is left out, and said so.
"""

import contextlib
import io
import json
import math
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import uvloop
from yarl import URL

from threadline.bench.loadgen import (
    LoadResult,
    MachineTimes,
    RequestSource,
    cpu_seconds,
    processes_of,
    run_open_loop,
)
from threadline.bench.opcost import (
    TARGET_CPU_MS_PER_CALL,
    OperationCost,
    measure_operation_costs,
    wait_until_idle,
)
from threadline.bench.scale import FEED_CALLS, ScaleReport, measure_at_scale, started_like
from threadline.bench.workload import PAGE as PAGE_SIZE
from threadline.bench.workload import Dataset, refresh_tokens, seed, social_mix
from threadline.platform.settings import Settings
from threadline.runner import running
from threadline.topology import SERVICES, parse_topology

__all__ = [
    "DEFAULT_RATES",
    "BenchConfig",
    "BenchError",
    "RateLadder",
    "RateStep",
    "Target",
    "TopologyReport",
    "run_bench",
]

Progress = Callable[[str], None]


# Steps of 100/s up to 800/s; then rates halfway between the highest sustainable and the lowest
# unsustainable one narrow that gap (by 4x with the default two), since a ratio of two maximum
# rates known only to a step of 100 or 200/s could be off by a fifth either way.
DEFAULT_RATES = (25, 50, 100, 200, 300, 400, 500, 600, 700, 800, 1000, 1200)
REFINE_STEPS = 2
RATE_RESOLUTION = 10.0
# Past the last rate given, while every rate was sustained, each rate is this much above the one
# before, up to the ceiling: a machine four times faster than the one the defaults were chosen on
# sustained all of them in both topologies, which said nothing about either's maximum.
CLIMB_FACTOR = 1.25
# CPU per operation is measured in rounds, the kinds taking turns: one slow stretch of the machine
# shows as one round apart from the others (their spread is reported) instead of moving one kind.
OP_ROUNDS = 5
RATE_CEILING = 50_000.0
# A rate step's requests may still be answered this long after its last is sent (the generator's
# timeout): the tokens they carry must outlive that too.
TOKEN_SPARE_S = 15.0
STATUS_PATH = "/api/v1/status"


class BenchError(Exception):
    """The bench cannot run as asked; the message says what to do."""


@dataclass(frozen=True)
class Target:
    """A running system to measure: its gateway's base URL, and the name to report it by."""

    url: str
    label: str | None = None
    """None: the topology its gateway reports at /api/v1/status."""

    @classmethod
    def parse(cls, text: str) -> "Target":
        """`[NAME=]http://HOST:PORT`; raises BenchError for anything else."""
        label, separator, address = text.rpartition("=")
        if not separator or "://" in label:
            label, address = "", text
        try:
            url = URL(address)
        except ValueError as exc:
            raise BenchError(f"--target {text!r} is not a URL: give http://HOST:PORT") from exc
        base = url.scheme in ("http", "https") and url.host and url.path in ("", "/") and not url.query_string
        if not base:
            raise BenchError(f"--target {text!r}: give a gateway's base URL, such as http://127.0.0.1:8000")
        return cls(url=str(url.origin()), label=label or None)


@dataclass
class BenchConfig:
    """What to measure and how hard."""

    users: int = 1000
    posts: int = 50_000
    rates: list[float] = field(default_factory=lambda: list(DEFAULT_RATES))
    climb_past_rates: bool = True
    refine_steps: int = REFINE_STEPS
    duration_s: float = 10.0
    warmup_s: float = 3.0
    p99_bound_ms: float = 200.0
    topologies: tuple[str, ...] = ("monolith", "microservices")
    thread_reads: bool = False
    seed: int = 1
    out_dir: Path = Path("bench/results")
    micro_calls: int = 5000
    op_calls: int = 500
    op_rounds: int = OP_ROUNDS
    scale_posts: int = 0
    scale_calls: int = FEED_CALLS
    host: str = "127.0.0.1"
    targets: list[Target] = field(default_factory=list)
    """Running systems to measure instead of starting `topologies` here."""


@dataclass
class RateStep:
    """One offered rate against one topology."""

    load: LoadResult
    cpu_s_by_process: dict[str, float]
    peak_rss_mb_by_process: dict[str, float]
    stolen_share: float | None = None

    @property
    def cpu_ms_per_request(self) -> float | None:
        """CPU time of every Threadline process (and NATS) per completed request; None if none was read."""
        if not self.cpu_s_by_process:
            return None
        if not self.load.completed:
            return float("nan")
        return 1000 * sum(self.cpu_s_by_process.values()) / self.load.completed

    def sustainable(self, p99_bound_ms: float) -> bool:
        """p99 under the bound, errors under 1%, and at least 95% of the offered rate completed."""
        load = self.load
        return (
            load.completed > 0
            and load.percentile(99) <= p99_bound_ms
            and (load.errors + load.client_errors) <= 0.01 * max(load.sent, 1)
            and load.achieved_rate >= 0.95 * load.offered_rate
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        completed = max(self.load.completed, 1)
        cpu = self.cpu_ms_per_request
        return {
            **self.load.to_dict(),
            "cpu_ms_per_request": None if cpu is None or math.isnan(cpu) else round(cpu, 4),
            "cpu_ms_per_request_by_process": {
                name: round(1000 * cpu / completed, 4) for name, cpu in self.cpu_s_by_process.items()
            },
            "peak_rss_mb_by_process": {k: round(v, 1) for k, v in self.peak_rss_mb_by_process.items()},
            "stolen_share": None if self.stolen_share is None else round(self.stolen_share, 4),
        }


@dataclass
class TopologyReport:
    """Every rate step of one topology, and its verdict."""

    topology: str
    processes: list[str]
    dataset: dict[str, Any]
    steps: list[RateStep]
    p99_bound_ms: float
    operation_cost: dict[str, OperationCost] = field(default_factory=dict)
    scale: ScaleReport | None = None
    phase_s: dict[str, float] = field(default_factory=dict)

    @property
    def max_sustainable_rate(self) -> float:
        """The highest offered rate that was sustainable (0 if none was)."""
        good = [s.load.offered_rate for s in self.steps if s.sustainable(self.p99_bound_ms)]
        return max(good, default=0.0)

    @property
    def lowest_unsustainable_rate(self) -> float | None:
        """The lowest offered rate above the maximum sustainable one that was not sustainable, if any."""
        best = self.max_sustainable_rate
        bad = [s.load.offered_rate for s in self.steps if s.load.offered_rate > best]
        return min(bad, default=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {
            "topology": self.topology,
            "processes": self.processes,
            "dataset": self.dataset,
            "max_sustainable_rate": self.max_sustainable_rate,
            "lowest_unsustainable_rate": self.lowest_unsustainable_rate,
            "steps": [step.to_dict() for step in self.steps],
            "operation_cost": {kind: cost.to_dict() for kind, cost in self.operation_cost.items()},
            "scale": None if self.scale is None else self.scale.to_dict(),
            "phase_s": {phase: round(seconds, 1) for phase, seconds in self.phase_s.items()},
        }


def run_bench(config: BenchConfig, progress: Progress = print) -> dict[str, Any]:
    """Run the comparison (and the microbenchmarks) and write JSON and PNG into `config.out_dir`."""
    with contextlib.ExitStack() as stack:
        if config.targets:
            contenders = [_seeded(label, url, config, progress) for label, url in _named(config.targets)]
        else:
            contenders = [_start(name, config, progress, stack) for name in config.topologies]
        # Before the rates, on the system as seeded: after the overload that ends each climb, the
        # same reads once cost up to 1.6x as much, and the system's state after it varies by run.
        for contender in contenders:
            _measure_operation_costs(contender, config, progress)
        order = _offer_rates_in_turn(contenders, config, progress)
        for contender in contenders:
            # Last: it takes the longest, and needs the system idle.
            _measure_at_scale(contender, config, progress)
        reports = [contender.report(config) for contender in contenders]
    micro: dict[str, Any] | None = None
    if config.micro_calls > 0:
        from threadline.bench.micro import micro_report, run_micro

        progress("==> microbenchmarks of one service-to-service call")
        micro = micro_report(run_micro(calls=config.micro_calls, progress=progress))
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "config": {
            "users": config.users,
            "posts": config.posts,
            "rates": config.rates,
            "climb_past_rates": config.climb_past_rates,
            "refine_steps": config.refine_steps,
            "duration_s": config.duration_s,
            "p99_bound_ms": config.p99_bound_ms,
            "thread_reads": config.thread_reads,
            "seed": config.seed,
            "op_calls": config.op_calls,
            "op_rounds": config.op_rounds,
            "scale_posts": config.scale_posts,
            "scale_calls": config.scale_calls,
            "targets": {c.name: c.url for c in contenders} if config.targets else None,
        },
        "operation_cost_targets_ms": TARGET_CPU_MS_PER_CALL,
        "topologies": [report.to_dict() for report in reports],
        "rates_in_order": [{"topology": name, "rate": rate} for name, rate in order],
        "micro": micro,
    }
    config.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = config.out_dir / "latest.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    png_path = config.out_dir / "latency.png"
    _plot(reports, png_path, config.p99_bound_ms)
    progress("")
    progress(render_table(result))
    progress(f"results: {json_path}  plot: {png_path}")
    return result


class RateLadder:
    """Which rate to offer a topology next: rising `rates` until one is not sustained, then halfway rates.

    With `climb_past_rates`, once every rate given was sustained it goes on rising, each rate
    `CLIMB_FACTOR` times the one before (to the nearest `RATE_RESOLUTION`), up to `RATE_CEILING`.

    A rate that was not sustained is offered once more before it counts: one slow moment (a
    disk sync, a collection, the host busy elsewhere) can push a whole step's p99 over the bound,
    and one such step ended a climb at 300/s that an earlier run of the same code had taken to
    450/s. Each halfway rate lies between the highest rate sustained and the lowest one not
    sustained, to the nearest `RATE_RESOLUTION`; there are up to `refine` of them, fewer once
    those two rates are that close.
    """

    def __init__(self, rates: Sequence[float], *, refine: int, climb_past_rates: bool = False) -> None:
        self._rising = list(rates)
        self._climb_past_rates = climb_past_rates
        self._halfway_left = refine
        self._sustained: list[float] = []
        self._not_sustained: list[float] = []
        self._second_try: float | None = None

    def next_rate(self) -> float | None:
        """The rate to measure next, or None once the ladder is climbed."""
        if self._second_try is not None:
            return self._second_try
        if not self._not_sustained:
            climbed = len(self._sustained)
            if climbed < len(self._rising):
                return self._rising[climbed]
            if not self._climb_past_rates or self._rising[-1] >= RATE_CEILING:
                return None
            higher = round(self._rising[-1] * CLIMB_FACTOR / RATE_RESOLUTION) * RATE_RESOLUTION
            self._rising.append(min(RATE_CEILING, max(higher, self._rising[-1] + RATE_RESOLUTION)))
            return self._rising[-1]
        if self._halfway_left <= 0:
            return None
        low, high = max(self._sustained, default=0.0), min(self._not_sustained)
        rate = round((low + high) / 2 / RATE_RESOLUTION) * RATE_RESOLUTION
        return rate if low < rate < high else None

    def record(self, rate: float, *, sustained: bool) -> None:
        """Take the verdict on `rate`, the rate `next_rate` gave."""
        if not sustained and self._second_try is None:
            self._second_try = rate
            return
        self._second_try = None
        if self._not_sustained:
            self._halfway_left -= 1
        (self._sustained if sustained else self._not_sustained).append(rate)


@dataclass
class _Contender:
    """One topology, running from its seeding to the end of the comparison."""

    name: str
    url: str
    dataset: Dataset
    mix: RequestSource
    processes: dict[str, psutil.Process]
    """Its processes (and NATS), whose CPU and memory are read; none for a target elsewhere."""
    process_names: list[str]
    ladder: RateLadder
    settings: Settings | None = None
    """How it was started here; None for a target, which is not bulk loaded."""
    steps: list[RateStep] = field(default_factory=list)
    operation_cost: dict[str, OperationCost] = field(default_factory=dict)
    scale: ScaleReport | None = None
    phase_s: dict[str, float] = field(default_factory=dict)

    def spent(self, phase: str, since: float) -> None:
        """Add the time from `since` until now to `phase`."""
        self.phase_s[phase] = self.phase_s.get(phase, 0.0) + time.monotonic() - since

    def report(self, config: BenchConfig) -> TopologyReport:
        """What was measured of this topology."""
        return TopologyReport(
            topology=self.name,
            processes=self.process_names,
            dataset=_dataset_summary(self.dataset),
            steps=sorted(self.steps, key=lambda step: step.load.offered_rate),
            p99_bound_ms=config.p99_bound_ms,
            operation_cost=self.operation_cost,
            scale=self.scale,
            phase_s=self.phase_s,
        )


def _start(name: str, config: BenchConfig, progress: Progress, stack: contextlib.ExitStack) -> _Contender:
    """Start a topology on a fresh data directory (both kept until `stack` closes) and seed it.

    The data directory goes when `stack` closes, unless the run failed: its processes' logs say why.
    """
    progress(f"==> {name}: starting")
    data_dir = Path(tempfile.mkdtemp(prefix=f"threadline-bench-{name}-"))

    def remove_unless_failed(failure: type[BaseException] | None, *_: object) -> None:
        if failure is None:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            progress(f"==> {name}: the run did not finish; its data and logs are kept in {data_dir}")

    stack.push(remove_unless_failed)
    # Tokens minted while seeding must outlive the whole run.
    settings = Settings(
        data_dir=data_dir, topology=name, port=0, host=config.host, access_token_ttl_seconds=86_400
    )
    runner = stack.enter_context(
        running(parse_topology(name, SERVICES), settings, out=_ProgressWriter(progress))
    )
    return _seeded(
        name,
        runner.gateway_url,
        config,
        progress,
        processes=processes_of(runner),
        process_names=[p.spec.name for p in runner.processes],
        settings=settings,
    )


def _seeded(
    name: str,
    url: str,
    config: BenchConfig,
    progress: Progress,
    *,
    processes: dict[str, psutil.Process] | None = None,
    process_names: list[str] | None = None,
    settings: Settings | None = None,
) -> _Contender:
    """Seed the system at `url` and make it a contender; without `processes`, one running elsewhere."""
    elsewhere = "" if settings else " (running already)"
    progress(f"==> {name}: seeding {config.users} users, {config.posts} posts at {url}{elsewhere}")
    began = time.monotonic()
    dataset = uvloop.run(
        seed(url, users=config.users, posts=config.posts, seed=config.seed, progress=progress)
    )
    contender = _Contender(
        name=name,
        url=url,
        dataset=dataset,
        mix=social_mix(dataset, thread_reads=config.thread_reads),
        processes=processes or {},
        process_names=process_names or [],
        ladder=RateLadder(config.rates, refine=config.refine_steps, climb_past_rates=config.climb_past_rates),
        settings=settings,
    )
    contender.spent("seed", began)
    return contender


def _named(targets: Sequence[Target]) -> list[tuple[str, str]]:
    """Each target's name and URL, after checking that its gateway answers; raises BenchError."""
    named: dict[str, str] = {}
    for target in targets:
        label = target.label or uvloop.run(_reported_topology(target.url))
        if label in named:
            raise BenchError(
                f"two targets would both be reported as {label!r} ({named[label]} and {target.url}): "
                f"name them, as in --target {label}-2={target.url}"
            )
        named[label] = target.url
    return list(named.items())


async def _reported_topology(url: str) -> str:
    """The topology the gateway at `url` says it runs; raises BenchError if nothing there says so."""
    status_url = url + STATUS_PATH
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(status_url) as response,
        ):
            status, body = response.status, await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise BenchError(
            f"nothing answers at {url} ({type(exc).__name__}: {exc}): start Threadline there "
            "(`threadline up`) or correct the address"
        ) from exc
    try:
        answer = json.loads(body) if status == 200 else None
    except ValueError:
        answer = None
    topology = answer.get("topology") if isinstance(answer, dict) else None
    if isinstance(topology, str) and topology:
        return topology
    raise BenchError(
        f"{status_url} answered {status} without naming a topology: is that Threadline's gateway? "
        "To measure it anyway, name it: --target NAME=URL"
    )


def _keep_tokens_fresh(
    contender: _Contender, config: BenchConfig, progress: Progress, *, for_s: float
) -> None:
    """Log the accounts in again if a token would expire within `for_s` (a target's expire when it says)."""
    if not contender.dataset.tokens_expire_within(for_s + TOKEN_SPARE_S):
        return
    progress(f"    {contender.name}: logging the seeded accounts in again: their tokens are about to expire")
    uvloop.run(refresh_tokens(contender.url, contender.dataset))
    contender.mix = social_mix(contender.dataset, thread_reads=config.thread_reads)


def _offer_rates_in_turn(
    contenders: list[_Contender], config: BenchConfig, progress: Progress
) -> list[tuple[str, float]]:
    """Climb every topology's rate ladder a rung at a time, in turns; the (topology, rate) measured, in order.

    Taking turns rate by rate, rather than one topology's rates after the other's, puts minutes
    less between the two figures compared: on a shared machine whose speed drifts, that kept
    their ratio from following the drift. Who goes first alternates from one round to the next.
    Every topology runs throughout; each rate is offered only once all of them are idle.
    """
    everyone = {
        f"{contender.name}/{name}": process
        for contender in contenders
        for name, process in contender.processes.items()
    }
    for contender in contenders:
        progress(f"==> {contender.name}: warming up for {config.warmup_s:.0f} s")
        began = time.monotonic()
        _keep_tokens_fresh(contender, config, progress, for_s=config.warmup_s)
        warmup = run_open_loop(contender.url, contender.mix, rate=config.rates[0], duration_s=config.warmup_s)
        uvloop.run(warmup)
        contender.spent("rates", began)
    order: list[tuple[str, float]] = []
    rounds = 0
    while due := [(c, rate) for c in contenders if (rate := c.ladder.next_rate()) is not None]:
        if rounds % 2:
            due.reverse()
        rounds += 1
        for contender, rate in due:
            began = time.monotonic()
            # Whatever an earlier rate left queued (fan-outs, events) must not burden this one.
            uvloop.run(wait_until_idle(everyone))
            _keep_tokens_fresh(contender, config, progress, for_s=config.duration_s)
            step = _measure(contender, rate, config)
            sustained = step.sustainable(config.p99_bound_ms)
            contender.ladder.record(rate, sustained=sustained)
            contender.steps.append(step)
            contender.spent("rates", began)
            order.append((contender.name, rate))
            load = step.load
            cpu = "" if step.cpu_ms_per_request is None else f"  cpu {step.cpu_ms_per_request:.2f} ms/req"
            progress(
                f"    {contender.name} {rate:>7.0f}/s: p50 {load.percentile(50):7.1f} ms  "
                f"p99 {load.percentile(99):7.1f} ms  done {load.achieved_rate:7.1f}/s  "
                f"errors {load.errors + load.client_errors}{cpu}{'' if sustained else '  not sustainable'}"
            )
    return order


def _measure_operation_costs(contender: _Contender, config: BenchConfig, progress: Progress) -> None:
    if config.op_calls <= 0:
        return
    name = contender.name
    if not contender.processes:
        progress(f"==> {name}: CPU per operation skipped: its processes were not started here to be read")
        return
    progress(
        f"==> {name}: CPU per operation, {config.op_calls} sequential calls of each kind "
        f"in {config.op_rounds} rounds"
    )
    began = time.monotonic()
    contender.operation_cost = uvloop.run(
        measure_operation_costs(
            contender.url,
            contender.processes,
            social_mix(contender.dataset, thread_reads=True),
            calls=config.op_calls,
            rounds=config.op_rounds,
            seed=config.seed,
            progress=progress,
            label=name,
        )
    )
    contender.spent("operation_cost", began)


def _measure_at_scale(contender: _Contender, config: BenchConfig, progress: Progress) -> None:
    if config.scale_posts <= 0:
        return
    if contender.settings is None:
        progress(
            f"==> {contender.name}: not measured at scale: it copies the databases of systems started here"
        )
        return
    progress(
        f"==> {contender.name}: feed reads of its data as it is and bulk-loaded to "
        f"{config.scale_posts:,} posts, side by side"
    )
    began = time.monotonic()
    # Copied once idle, so that the services' copies agree (nothing in flight between them).
    uvloop.run(wait_until_idle(contender.processes))
    contender.scale = measure_at_scale(
        contender.settings,
        contender.dataset,
        target_posts=config.scale_posts,
        calls=config.scale_calls,
        seed=config.seed,
        progress=progress,
        label=contender.name,
        start=started_like(contender.settings, out=_ProgressWriter(progress)),
    )
    contender.spent("scale", began)


def _measure(contender: _Contender, rate: float, config: BenchConfig) -> RateStep:
    processes = contender.processes
    machine, before = MachineTimes.now(), cpu_seconds(processes)
    load = uvloop.run(run_open_loop(contender.url, contender.mix, rate=rate, duration_s=config.duration_s))
    after = cpu_seconds(processes)
    return RateStep(
        load=load,
        cpu_s_by_process={name: after[name] - before[name] for name in processes},
        peak_rss_mb_by_process={name: _peak_rss_mb(proc) for name, proc in processes.items()},
        stolen_share=MachineTimes.now().stolen_share_since(machine),
    )


def _peak_rss_mb(process: psutil.Process) -> float:
    """The process's peak resident set size (VmHWM) in MiB."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float(process.memory_info().rss) / 2**20


def _dataset_summary(dataset: Dataset) -> dict[str, Any]:
    return dataset.to_dict()


def _machine() -> dict[str, Any]:
    return {
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def render_table(result: dict[str, Any]) -> str:
    """The results as a terminal table."""
    lines = []
    for topo in result["topologies"]:
        unsustainable = topo.get("lowest_unsustainable_rate")
        above = (
            f", {unsustainable:.0f} was not" if unsustainable is not None else ", the highest rate offered"
        )
        lines.append(
            f"{topo['topology']}: max sustainable {topo['max_sustainable_rate']:.0f} req/s "
            f"(p99 <= {result['config']['p99_bound_ms']:.0f} ms{above})  "
            f"processes: {', '.join(topo['processes']) or 'not started here (CPU and memory not read)'}"
        )
        lines.append(
            f"  {'offered/s':>9} {'done/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
            f"{'errors':>6} {'cpu ms/req':>10} {'stolen':>6}  peak RSS MiB"
        )
        for step in topo["steps"]:
            rss = ", ".join(f"{k} {v:.0f}" for k, v in step["peak_rss_mb_by_process"].items())
            # A step that completed nothing has no percentiles (null in the JSON): a dash.
            p50, p90, p99 = (_or_dash(step[f"p{pct}_ms"], ".1f") for pct in (50, 90, 99))
            lines.append(
                f"  {step['offered_rate']:>9.0f} {step['achieved_rate']:>8.1f} {p50:>8} {p90:>8} {p99:>8} "
                f"{step['errors'] + step['client_errors']:>6} "
                f"{_or_dash(step['cpu_ms_per_request']):>10} {_percent(step.get('stolen_share')):>6}  {rss}"
            )
        if topo["steps"] and topo["steps"][-1]["cpu_ms_per_request_by_process"]:
            split = topo["steps"][-1]["cpu_ms_per_request_by_process"]
            lines.append("  cpu ms/req by process: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))
        targets = result.get("operation_cost_targets_ms", {}).get(topo["topology"], {})
        lines += _operation_cost_lines(topo.get("operation_cost", {}), targets)
        lines += _scale_lines(topo.get("scale"))
        lines.append("")
    rates = {t["topology"]: t["max_sustainable_rate"] for t in result["topologies"]}
    if rates.get("monolith") and "microservices" in rates:
        ratio = rates["microservices"] / rates["monolith"]
        capped = [t["topology"] for t in result["topologies"] if t.get("lowest_unsustainable_rate") is None]
        caveat = (
            f" ({' and '.join(capped)} sustained every rate offered: not a measured maximum)"
            if capped
            else ""
        )
        lines.append(f"microservices / monolith max sustainable throughput: {ratio:.2f}{caveat}")
    micro = result.get("micro")
    if micro:
        hop, loaded = micro["added_per_hop_ms"], micro["added_per_hop_at_10pct_load_ms"]
        lines.append(
            f"one service hop adds p50 {hop['p50']:.2f} ms, p99 {hop['p99']:.2f} ms "
            f"(at 10% load: {loaded['p50']:.2f} / {loaded['p99']:.2f} ms); through the gateway "
            f"{micro['hop_throughput_ratio']:.2f}x the direct throughput of a trivial route"
        )
        lines += _floor_lines(micro["bare_route_server_cpu_ms_per_call"], result["topologies"])
    return "\n".join(lines)


def _floor_lines(floor_ms: float, topologies: list[dict[str, Any]]) -> list[str]:
    """The monolith's operation costs as multiples of a bare route's, both measured in this run."""
    line = (
        f"for scale: a bare FastAPI route on uvicorn (a small JSON body in and out) cost its server "
        f"{floor_ms:.3f} ms of CPU per sequential call"
    )
    if floor_ms <= 0:
        return [line]
    costs: dict[str, Any] = next((t["operation_cost"] for t in topologies if t["topology"] == "monolith"), {})
    multiples = ", ".join(f"{kind} {cost['cpu_ms_per_call'] / floor_ms:.1f}x" for kind, cost in costs.items())
    return [line + (f"; the monolith's operations: {multiples}" if multiples else "")]


def _operation_cost_lines(costs: dict[str, Any], targets: dict[str, float]) -> list[str]:
    """One line per operation kind, with its target and whether this run met it."""
    if not costs:
        return []
    calls = ", ".join(sorted({str(cost["calls"]) for cost in costs.values()}))
    rounds = max(len(cost.get("cpu_ms_per_call_by_round", [])) for cost in costs.values())
    in_rounds = f" in {rounds} rounds" if rounds > 1 else ""
    lines = [
        f"  operation cost: {calls} sequential calls per kind{in_rounds}, CPU of every process per call "
        "(asynchronous work included); reads measured after a first pass over the same calls",
    ]
    split_by_process = any(len(cost["cpu_ms_by_process"]) > 1 for cost in costs.values())
    header = f"  {'kind':<13} {'cpu ms/call':>11} {'rounds':>11} {'first pass':>10} {'wall ms/call':>12} "
    header += f"{'errors':>6} {'stolen':>6}  {'target':<22} "
    lines.append((header + ("cpu ms/call by process" if split_by_process else "")).rstrip())
    for kind, cost in costs.items():
        split = cost["cpu_ms_by_process"]
        by_process = ", ".join(f"{k} {v:.3f}" for k, v in split.items()) if len(split) > 1 else ""
        spread = _spread(cost.get("cpu_ms_per_call_by_round", []))
        first_pass = cost.get("first_pass_cpu_ms_per_call")
        row = (
            f"  {kind:<13} {cost['cpu_ms_per_call']:>11.3f} {spread:>11} {_or_dash(first_pass, '.3f'):>10} "
            f"{cost['wall_ms_per_call']:>12.2f} {cost['errors']:>6} {_percent(cost.get('stolen_share')):>6}  "
            f"{_verdict(kind, cost, targets):<22} {by_process}"
        )
        lines.append(row.rstrip())
    idle = [cost["idle_cpu_ms_per_s"] for cost in costs.values() if cost["idle_cpu_ms_per_s"] is not None]
    if idle:
        idle_ms_per_s = sum(idle) / len(idle)
        walls = [cost["wall_ms_per_call"] for cost in costs.values()]
        lines.append(
            f"  included above: {idle_ms_per_s:.1f} ms of CPU per second the processes spend while idle, "
            f"so {idle_ms_per_s * min(walls) / 1000:.3f}-{idle_ms_per_s * max(walls) / 1000:.3f} ms per call"
        )
    for kind, cost in costs.items():
        if cost["errors"] or cost["warmup_errors"]:
            reasons = ", ".join(f"{reason} x{count}" for reason, count in cost["error_reasons"].items())
            lines.append(
                f"  note: {kind}: {cost['errors']} of {cost['calls']} measured calls failed "
                f"({reasons or '-'}), {cost['warmup_errors']} of {cost['warmup_calls']} warm-up calls"
            )
        if cost["items_per_call"] is not None and kind in targets and cost["items_per_call"] < PAGE_SIZE:
            lines.append(
                f"  note: {kind} answers held {cost['items_per_call']:.1f} posts on average; "
                f"the target is for {PAGE_SIZE}"
            )
    return lines


def _scale_lines(scale: dict[str, Any] | None) -> list[str]:
    """Feed reads as seeded and at the bulk-loaded size, against the target ratio."""
    if not scale:
        return []
    base, scaled = scale["feed_ms_base"], scale["feed_ms_scaled"]
    sizes = f"{scale['base_posts']:,} posts ({scale['db_mb_base']['total']:,.0f} MiB)"
    if base is None or scaled is None:
        return [f"  feed at scale: {sizes}; {scale['target_posts']:,} posts skipped: {scale['skipped']}"]
    verdict = {True: "met", False: "NOT met", None: "not measured"}[scale["met"]]
    errors = base["errors"] + scaled["errors"]
    lines = [
        f"  feed at scale: p50 {_or_dash(base['p50'])} ms at {sizes} -> {_or_dash(scaled['p50'])} ms at "
        f"{scale['scaled_posts']:,} posts ({scale['db_mb']['total']:,.0f} MiB): "
        f"{_or_dash(scale['ratio'], '.2f')}x, target <= {scale['target_ratio']:g}x: {verdict}"
        + (f" ({errors} errors)" if errors else ""),
        f"    p99 {_or_dash(base['p99'])} -> {_or_dash(scaled['p99'])} ms, CPU "
        f"{_or_dash(base['cpu_ms_per_call'], '.3f')} -> {_or_dash(scaled['cpu_ms_per_call'], '.3f')} ms "
        "a read; "
        f"{scaled['calls']} sequential reads of each, alternated in blocks of {scale['block_calls']}",
        f"    timeline rows {scale['timeline_rows_base']:,} -> {scale['timeline_rows']:,}; "
        f"first page unchanged in {scale['first_pages_unchanged']} reads",
        f"    {scale['bulk_posts']:,} posts bulk-loaded in {scale['load_s']:.0f} s "
        f"({scale['load_timeline_rows_per_s'] or 0:,} timeline rows/s)",
    ]
    if scale["stopped"]:
        lines.append(f"    note: {scale['stopped']}")
    items_base, items_scaled = base["items_per_call"], scaled["items_per_call"]
    if items_base != items_scaled:
        lines.append(
            f"    note: pages held {_or_dash(items_base, '.1f')} posts on average as seeded and "
            f"{_or_dash(items_scaled, '.1f')} at scale, so the p50s are of unequal pages"
        )
    return lines


def _spread(by_round: list[float]) -> str:
    """The lowest and highest of the rounds' figures, or a dash for fewer than two rounds."""
    if len(by_round) < 2:
        return "-"
    return f"{min(by_round):.2f}-{max(by_round):.2f}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _or_dash(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _verdict(kind: str, cost: dict[str, Any], targets: dict[str, float]) -> str:
    """`<= 0.5 ms: met` or `not met`, with what makes the figure doubtful."""
    target = targets.get(kind)
    if target is None:
        return ""
    verdict = f"<= {target:g} ms: {'met' if cost['cpu_ms_per_call'] <= target else 'NOT met'}"
    if cost["errors"]:
        verdict += " (errors)"
    if not cost["settled"]:
        verdict += " (never idle)"
    return verdict


def _plot(reports: list[TopologyReport], path: Path, bound_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for report in reports:
        rates = [s.load.offered_rate for s in report.steps]
        for pct, style in ((50, "-o"), (99, "--s")):
            axes.plot(
                rates,
                [s.load.percentile(pct) for s in report.steps],
                style,
                label=f"{report.topology} p{pct}",
            )
    axes.axhline(bound_ms, color="grey", linewidth=0.8, linestyle=":", label=f"p99 bound {bound_ms:.0f} ms")
    axes.set_xlabel("offered load (requests/s, open loop)")
    axes.set_ylabel("latency from intended send (ms)")
    axes.set_yscale("log")
    axes.set_title("Threadline: latency against offered load, social mix")
    axes.grid(True, which="both", linewidth=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


class _ProgressWriter(io.TextIOBase):
    """A text stream that hands each line the runner prints to the progress callback."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self._progress = progress
        self._buffer = ""

    def write(self, text: str) -> int:
        """Pass on every complete line."""
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self._progress(line)
        return len(text)
