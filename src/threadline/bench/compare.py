"""`threadline bench`: the same workload against each topology on this machine, side by side.

For each topology: start it with the runner on a fresh data directory, seed the same data set
through the public API, then offer the social mix at rising fixed rates (open loop). Per rate it
records latency percentiles from each request's intended send time, CPU seconds per request
summed over every process (and per process, which in the microservices topology is per
service), and the peak resident memory of each process. The highest rate whose p99 stays under
the bound, with under 1% errors and at least 95% of the offered rate completed, is the max
sustainable throughput; after the first rate that is not, rates halfway between narrow it down
(`step_up`). Then, on the same running system, it measures the CPU cost of one
operation of each kind in the mix (`threadline.bench.opcost`), against the targets stated per
operation. Last, if asked, it grows the data set by bulk loading and measures feed reads at both
sizes (`threadline.bench.scale`); that changes the data, so nothing of that topology follows it.
"""

import io
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psutil
import uvloop

from threadline.bench.loadgen import LoadResult, MachineTimes, cpu_seconds, run_open_loop
from threadline.bench.opcost import (
    TARGET_CPU_MS_PER_CALL,
    OperationCost,
    measure_operation_costs,
    wait_until_idle,
)
from threadline.bench.scale import FEED_CALLS, ScaleReport, measure_at_scale
from threadline.bench.workload import PAGE as PAGE_SIZE
from threadline.bench.workload import Dataset, seed, social_mix
from threadline.platform.settings import Settings
from threadline.runner import Runner, running
from threadline.topology import SERVICES, parse_topology

__all__ = ["DEFAULT_RATES", "BenchConfig", "RateStep", "TopologyReport", "run_bench"]

Progress = Callable[[str], None]


# Steps of 100/s up to 800/s; then rates halfway between the highest sustainable and the lowest
# unsustainable one narrow that gap (by 4x with the default two), since a ratio of two maximum
# rates known only to a step of 100 or 200/s could be off by a fifth either way.
DEFAULT_RATES = (25, 50, 100, 200, 300, 400, 500, 600, 700, 800, 1000, 1200)
REFINE_STEPS = 2
RATE_RESOLUTION = 10.0

T = TypeVar("T")


@dataclass
class BenchConfig:
    """What to measure and how hard."""

    users: int = 1000
    posts: int = 50_000
    rates: list[float] = field(default_factory=lambda: list(DEFAULT_RATES))
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
    scale_posts: int = 0
    scale_calls: int = FEED_CALLS
    host: str = "127.0.0.1"


@dataclass
class RateStep:
    """One offered rate against one topology."""

    load: LoadResult
    cpu_s_by_process: dict[str, float]
    peak_rss_mb_by_process: dict[str, float]
    stolen_share: float | None = None

    @property
    def cpu_ms_per_request(self) -> float:
        """CPU time of every Threadline process (and NATS) per completed request."""
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
        return {
            **self.load.to_dict(),
            "cpu_ms_per_request": round(self.cpu_ms_per_request, 4),
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
    reports = [_bench_topology(name, config, progress) for name in config.topologies]
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
            "refine_steps": config.refine_steps,
            "duration_s": config.duration_s,
            "p99_bound_ms": config.p99_bound_ms,
            "thread_reads": config.thread_reads,
            "seed": config.seed,
            "op_calls": config.op_calls,
            "scale_posts": config.scale_posts,
            "scale_calls": config.scale_calls,
        },
        "operation_cost_targets_ms": TARGET_CPU_MS_PER_CALL,
        "topologies": [report.to_dict() for report in reports],
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


def _bench_topology(name: str, config: BenchConfig, progress: Progress) -> TopologyReport:
    progress(f"==> {name}: starting")
    data_dir = Path(tempfile.mkdtemp(prefix=f"threadline-bench-{name}-"))
    # Tokens minted while seeding must outlive the whole run.
    settings = Settings(
        data_dir=data_dir, topology=name, port=0, host=config.host, access_token_ttl_seconds=86_400
    )
    phase_s: dict[str, float] = {}
    try:
        with running(parse_topology(name, SERVICES), settings, out=_ProgressWriter(progress)) as runner:
            url = runner.gateway_url
            progress(f"==> {name}: seeding {config.users} users, {config.posts} posts at {url}")
            began = time.monotonic()
            dataset = uvloop.run(
                seed(url, users=config.users, posts=config.posts, seed=config.seed, progress=progress)
            )
            phase_s["seed"] = time.monotonic() - began
            source = social_mix(dataset, thread_reads=config.thread_reads)
            progress(f"==> {name}: warming up for {config.warmup_s:.0f} s")
            began = time.monotonic()
            uvloop.run(run_open_loop(url, source, rate=config.rates[0], duration_s=config.warmup_s))
            processes = _processes(runner)

            def measure(rate: float) -> RateStep:
                # Whatever an earlier rate left queued (fan-outs, events) must not burden this one.
                uvloop.run(wait_until_idle(processes))
                step = _measure(processes, url, source, rate, config)
                load = step.load
                verdict = "" if step.sustainable(config.p99_bound_ms) else "  not sustainable"
                progress(
                    f"    {name} {rate:>7.0f}/s: p50 {load.percentile(50):7.1f} ms  "
                    f"p99 {load.percentile(99):7.1f} ms  done {load.achieved_rate:7.1f}/s  "
                    f"errors {load.errors + load.client_errors}  "
                    f"cpu {step.cpu_ms_per_request:.2f} ms/req{verdict}"
                )
                return step

            steps = step_up(
                config.rates,
                measure,
                lambda step: step.sustainable(config.p99_bound_ms),
                refine=config.refine_steps,
            )
            phase_s["rates"] = time.monotonic() - began
            operation_cost: dict[str, OperationCost] = {}
            if config.op_calls > 0:
                progress(f"==> {name}: CPU per operation, {config.op_calls} sequential calls of each kind")
                began = time.monotonic()
                operation_cost = uvloop.run(
                    measure_operation_costs(
                        url,
                        processes,
                        social_mix(dataset, thread_reads=True),
                        calls=config.op_calls,
                        seed=config.seed,
                        progress=progress,
                        label=name,
                    )
                )
                phase_s["operation_cost"] = time.monotonic() - began
            scale: ScaleReport | None = None
            if config.scale_posts > 0:
                # Last: it grows the data set for good.
                progress(
                    f"==> {name}: feed reads as seeded, then bulk-loaded to {config.scale_posts:,} posts"
                )
                began = time.monotonic()
                scale = uvloop.run(
                    measure_at_scale(
                        url,
                        settings,
                        dataset,
                        target_posts=config.scale_posts,
                        calls=config.scale_calls,
                        seed=config.seed,
                        progress=progress,
                        label=name,
                    )
                )
                phase_s["scale"] = time.monotonic() - began
            return TopologyReport(
                topology=name,
                processes=[p.spec.name for p in runner.processes],
                dataset=_dataset_summary(dataset),
                steps=steps,
                p99_bound_ms=config.p99_bound_ms,
                operation_cost=operation_cost,
                scale=scale,
                phase_s=phase_s,
            )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def step_up(
    rates: Sequence[float], measure: Callable[[float], T], sustainable: Callable[[T], bool], *, refine: int
) -> list[T]:
    """Measure rising `rates` until one is not sustainable, then up to `refine` rates halfway between.

    Each halfway rate lies between the highest sustainable rate measured and the lowest
    unsustainable one above it, to the nearest `RATE_RESOLUTION`; it stops early once they are
    that close. The steps come back in the order of their rates.
    """
    measured: list[tuple[float, T]] = []
    for rate in rates:
        step = measure(rate)
        measured.append((rate, step))
        if not sustainable(step):
            break
    else:
        return [step for _, step in measured]
    high = measured[-1][0]
    low = max((rate for rate, step in measured if sustainable(step)), default=0.0)
    for _ in range(refine):
        rate = round((low + high) / 2 / RATE_RESOLUTION) * RATE_RESOLUTION
        if not low < rate < high:
            break
        step = measure(rate)
        measured.append((rate, step))
        if sustainable(step):
            low = rate
        else:
            high = rate
    return [step for _, step in sorted(measured, key=lambda pair: pair[0])]


def _measure(
    processes: dict[str, psutil.Process], url: str, source: Any, rate: float, config: BenchConfig
) -> RateStep:
    machine, before = MachineTimes.now(), cpu_seconds(processes)
    load = uvloop.run(run_open_loop(url, source, rate=rate, duration_s=config.duration_s))
    after = cpu_seconds(processes)
    return RateStep(
        load=load,
        cpu_s_by_process={name: after[name] - before[name] for name in processes},
        peak_rss_mb_by_process={name: _peak_rss_mb(proc) for name, proc in processes.items()},
        stolen_share=MachineTimes.now().stolen_share_since(machine),
    )


def _processes(runner: Runner) -> dict[str, psutil.Process]:
    found = {p.spec.name: psutil.Process(p.pid) for p in runner.processes}
    nats_pid = runner.nats.pid if runner.nats is not None else None
    if nats_pid is not None:
        found["nats"] = psutil.Process(nats_pid)
    return found


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
        above = "" if unsustainable is None else f", {unsustainable:.0f} was not"
        lines.append(
            f"{topo['topology']}: max sustainable {topo['max_sustainable_rate']:.0f} req/s "
            f"(p99 <= {result['config']['p99_bound_ms']:.0f} ms{above})  "
            f"processes: {', '.join(topo['processes'])}"
        )
        lines.append(
            f"  {'offered/s':>9} {'done/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
            f"{'errors':>6} {'cpu ms/req':>10} {'stolen':>6}  peak RSS MiB"
        )
        for step in topo["steps"]:
            rss = ", ".join(f"{k} {v:.0f}" for k, v in step["peak_rss_mb_by_process"].items())
            lines.append(
                f"  {step['offered_rate']:>9.0f} {step['achieved_rate']:>8.1f} {step['p50_ms']:>8.1f} "
                f"{step['p90_ms']:>8.1f} {step['p99_ms']:>8.1f} {step['errors'] + step['client_errors']:>6} "
                f"{step['cpu_ms_per_request']:>10.2f} {_percent(step.get('stolen_share')):>6}  {rss}"
            )
        if topo["steps"]:
            split = topo["steps"][-1]["cpu_ms_per_request_by_process"]
            lines.append("  cpu ms/req by process: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))
        targets = result.get("operation_cost_targets_ms", {}).get(topo["topology"], {})
        lines += _operation_cost_lines(topo.get("operation_cost", {}), targets)
        lines += _scale_lines(topo.get("scale"))
        lines.append("")
    rates = {t["topology"]: t["max_sustainable_rate"] for t in result["topologies"]}
    if rates.get("monolith") and "microservices" in rates:
        ratio = rates["microservices"] / rates["monolith"]
        lines.append(f"microservices / monolith max sustainable throughput: {ratio:.2f}")
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
    lines = [
        f"  operation cost: {calls} sequential calls per kind, CPU of every process per call "
        "(asynchronous work included)",
    ]
    split_by_process = any(len(cost["cpu_ms_by_process"]) > 1 for cost in costs.values())
    header = f"  {'kind':<13} {'cpu ms/call':>11} {'wall ms/call':>12} {'errors':>6} {'stolen':>6}  "
    header += f"{'target':<22} "
    lines.append((header + ("cpu ms/call by process" if split_by_process else "")).rstrip())
    for kind, cost in costs.items():
        split = cost["cpu_ms_by_process"]
        by_process = ", ".join(f"{k} {v:.3f}" for k, v in split.items()) if len(split) > 1 else ""
        row = (
            f"  {kind:<13} {cost['cpu_ms_per_call']:>11.3f} {cost['wall_ms_per_call']:>12.2f} "
            f"{cost['errors']:>6} {_percent(cost.get('stolen_share')):>6}  "
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
    if scale["skipped"] or scaled is None:
        return [
            f"  feed at scale: p50 {_or_dash(base['p50'])} ms at {sizes}; "
            f"{scale['target_posts']:,} posts skipped: {scale['skipped']}"
        ]
    verdict = {True: "met", False: "NOT met", None: "not measured"}[scale["met"]]
    errors = base["errors"] + scaled["errors"]
    lines = [
        f"  feed at scale: p50 {_or_dash(base['p50'])} ms at {sizes} -> {_or_dash(scaled['p50'])} ms at "
        f"{scale['scaled_posts']:,} posts ({scale['db_mb']['total']:,.0f} MiB): "
        f"{_or_dash(scale['ratio'], '.2f')}x, target <= {scale['target_ratio']:g}x: {verdict}"
        + (f" ({errors} errors)" if errors else ""),
        f"    p99 {_or_dash(base['p99'])} -> {_or_dash(scaled['p99'])} ms over {scaled['calls']} sequential "
        f"reads each; timeline rows {scale['timeline_rows_base']:,} -> {scale['timeline_rows']:,}; "
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
