"""Microbenchmarks of one service-to-service call: what a hop costs next to the in-process call it replaces.

Everything runs on loopback on this machine. The callee is a separate OS process (this module's
`serve` command): a bare FastAPI app on uvicorn with uvloop and httptools (served as the services
are, `threadline.platform.http_server`), answering `GET /hello` and `POST /echo`, and answering
NATS requests on `bench.echo` through an embedded NATS server. A second such process is a
gateway that forwards `GET /hop` to the first one's `/hello` the way Threadline's gateway
forwards its hot routes (`threadline.platform.forwarding` over the chassis `ServiceClient`). The
caller is this process, on uvloop; it calls /hello and /hop through the same connection pool the
services use, the cheapest client here, so that it takes as little as it can of the cores the
two servers need.

Each latency row comes from one caller making sequential calls after a warm-up, each timed with
`perf_counter_ns`, summarized as nearest-rank percentiles; its calls/s is that caller's rate
(1 / mean latency). The /hello and /hop series are interleaved call by call, so both see the same
machine; "added by one hop" is the difference of their percentiles.

A lone sequential caller never has two requests in flight, so the callee is idle whenever a call
arrives: that is zero load, not low load, because it leaves out the waiting behind other
requests that load adds. Hence the per-hop target ("at 10% load") gets its own rows: the same
interleaved series run again while another process (this module's `load` command) sends
open-loop requests through /hop at 10% of the maximum rate through /hop. That is 10% of the
capacity of the path under test, whose bottleneck is the gateway; 10% of the direct /hello
maximum would run a gateway that sustains a fraction of that rate at several times 10%. That
process sends through the services' connection pool too: with aiohttp it spent three times the
CPU per call, taken from the servers measured, and the added p99 was 1.7-2.1 ms in three runs
with it against 1.1-1.2 ms in two without.

Both maxima come from 32 closed-loop callers (a saturation measurement), in rounds: each round
measures the direct route and the hop for 2 s each, back to back, who goes first alternating from
round to round. The throughput ratio reported is the median of the rounds' ratios, each of two
figures taken a few seconds apart: on a shared machine whose speed drifts, a single pair of
windows had put the ratio anywhere from 0.46 to 0.68 on the same code. On a small machine the
caller, the gateway and the echo server compete for the same cores, so those rows say what one
box sustains with all three on it. They also carry each process's CPU time per call, from which
the report derives the ratio that holds when the gateway has a core of its own.
"""

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Annotated, Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import nats
import orjson
import psutil
import uvicorn
import uvloop
from fastapi import Body, FastAPI

from threadline.bench.loadgen import cpu_seconds
from threadline.platform.forwarding import Forward, Forwarding
from threadline.platform.http_client import ServiceClient
from threadline.platform.http_pool import HttpAnswer, HttpSession
from threadline.platform.http_server import CoalescingHttpToolsProtocol
from threadline.platform.nats_server import EmbeddedNats
from threadline.platform.processes import die_with_parent
from threadline.runner import free_ports

__all__ = [
    "ADAPTER",
    "ADDED",
    "ADDED_LOADED",
    "BACKGROUND",
    "HELLO",
    "HELLO_LOADED",
    "HELLO_SATURATED",
    "HOP",
    "HOP_LOADED",
    "HOP_SATURATED",
    "HTTPX",
    "LOCAL",
    "NATS",
    "RAW_AIOHTTP",
    "RESULT_NAMES",
    "SATURATION_ROUNDS",
    "TARGET_ADDED_P50_MS",
    "TARGET_ADDED_P99_MS",
    "TARGET_HOP_THROUGHPUT_RATIO",
    "MicroResult",
    "main",
    "micro_report",
    "render_table",
    "run_micro",
]

LOCAL = "local adapter"
ADAPTER = "threadline HTTP adapter (httptools pool)"
RAW_AIOHTTP = "raw aiohttp"
HTTPX = "httpx"
NATS = "NATS request/reply"
HELLO = "bare hello route (uvicorn+httptools)"
HOP = "gateway hop"
ADDED = "added by one hop"
HELLO_LOADED = "bare hello route at 10% load"
HOP_LOADED = "gateway hop at 10% load"
ADDED_LOADED = "added by one hop at 10% load"
BACKGROUND = "10% load through the hop (open loop)"
HELLO_SATURATED = "bare hello route, 32 callers"
HOP_SATURATED = "gateway hop, 32 callers"
RESULT_NAMES = (
    LOCAL,
    ADAPTER,
    RAW_AIOHTTP,
    HTTPX,
    NATS,
    HELLO,
    HOP,
    ADDED,
    HELLO_LOADED,
    HOP_LOADED,
    ADDED_LOADED,
    BACKGROUND,
    HELLO_SATURATED,
    HOP_SATURATED,
)
"""Every row `run_micro` returns, in the order it returns them."""

TARGET_ADDED_P50_MS = 0.5
TARGET_ADDED_P99_MS = 2.0
TARGET_HOP_THROUGHPUT_RATIO = 0.5

SATURATION_ROUNDS = 5
"""Rounds of the saturation measurement, each the direct route and the hop once."""
_SATURATION_CALLERS = 32
_SATURATION_SECONDS = 2.0
_SATURATION_WARMUP_SECONDS = 0.3
_LOAD_FRACTION = 0.1
_LOAD_WARMUP_SECONDS = 0.3
_READY_TIMEOUT_SECONDS = 30.0
_STOP_TIMEOUT_SECONDS = 10.0
_START_ATTEMPTS = 3
_SUBJECT = "bench.echo"
_CALL_TIMEOUT_S = 30.0

# About 200 bytes of JSON, shaped like a post passing between services.
_PAYLOAD: dict[str, Any] = {
    "id": "0190f7a2-6c1e-7b3a-9f4e-2d8c5b1a7e60",
    "author_id": "0190f7a1-12ab-7c3d-8e4f-5a6b7c8d9e0f",
    "text": "a small post body, as one service would pass it to another",
    "likes": 42,
    "subscriber_only": False,
    "tags": ["bench", "hop"],
}
_HELLO = {"hello": "world"}

Call = Callable[[], Awaitable[Any]]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class MicroResult:
    """Latency percentiles (µs) and throughput of one kind of call.

    `calls_per_s` is one sequential caller's rate for the latency rows, all callers' rate for the
    32-caller rows, the achieved rate of the open-loop load, and 0 for the derived "added" rows.
    `cpu_us_per_call` is CPU µs per call of each process: caller and echo server on the rows of
    one call made each way (local adapter to NATS), caller, gateway and echo on the 32-caller rows;
    empty elsewhere. On the 32-caller rows, `rounds_calls_per_s` is each round's rate, in round
    order, and `calls_per_s` their median.
    """

    name: str
    calls: int
    p50_us: float
    p90_us: float
    p99_us: float
    calls_per_s: float
    cpu_us_per_call: dict[str, float] = field(default_factory=dict)
    rounds_calls_per_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON-friendly values."""
        return asdict(self)


def run_micro(
    *,
    calls: int = 5000,
    warmup: int = 500,
    saturation_rounds: int = SATURATION_ROUNDS,
    progress: Progress = print,
) -> list[MicroResult]:
    """Measure one call every way Threadline can make it; print a table; return rows in `RESULT_NAMES` order.

    Starts an embedded NATS server, an echo server process and a gateway process on free loopback
    ports, and stops all of them before returning, whatever happens.
    """
    if calls < 1 or warmup < 0 or saturation_rounds < 1:
        raise ValueError("calls and saturation_rounds must be at least 1 and warmup at least 0")
    with tempfile.TemporaryDirectory(prefix="threadline-micro-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        progress("micro: starting an embedded NATS server, an echo server process and a gateway process")
        nats_server = stack.enter_context(EmbeddedNats(workdir / "nats"))
        echo = stack.enter_context(_server(workdir, "echo", ["--nats-url", nats_server.url]))
        gateway = stack.enter_context(_server(workdir, "gateway", ["--upstream", echo.url]))
        bench = _Bench(calls, warmup, saturation_rounds, progress, workdir, echo, gateway, nats_server.url)
        rows = uvloop.run(bench.run())
    results = [rows[name] for name in RESULT_NAMES]
    progress(render_table(results))
    return results


def micro_report(results: Sequence[MicroResult]) -> dict[str, Any]:
    """A JSON-friendly summary: every row, the per-hop cost in ms, the throughput ratio, and the targets."""
    rows = {result.name: result for result in results}
    missing = [name for name in RESULT_NAMES if name not in rows]
    if missing:
        raise ValueError(f"results lack the rows {missing}")
    added, added_loaded = rows[ADDED], rows[ADDED_LOADED]
    direct, through_hop = rows[HELLO_SATURATED], rows[HOP_SATURATED]
    round_ratios = [
        hop / hello
        for hop, hello in zip(through_hop.rounds_calls_per_s, direct.rounds_calls_per_s, strict=True)
    ]
    ratio = statistics.median(round_ratios)
    # Each server's own ceiling is one core over its CPU per call; their ratio is what the
    # gateway sustains relative to the route when neither shares a core.
    echo_cpu, gateway_cpu = direct.cpu_us_per_call.get("echo"), through_hop.cpu_us_per_call.get("gateway")
    per_core = round(echo_cpu / gateway_cpu, 3) if echo_cpu and gateway_cpu else None
    adapter, raw = rows[ADAPTER], rows[RAW_AIOHTTP]
    return {
        "results": [result.to_dict() for result in results],
        "added_per_hop_ms": {"p50": _ms(added.p50_us), "p99": _ms(added.p99_us)},
        "added_per_hop_at_10pct_load_ms": {"p50": _ms(added_loaded.p50_us), "p99": _ms(added_loaded.p99_us)},
        "direct_max_calls_per_s": round(direct.calls_per_s, 1),
        "hop_max_calls_per_s": round(through_hop.calls_per_s, 1),
        "hop_throughput_ratio": round(ratio, 3),
        "hop_throughput_ratio_by_round": [round(each, 3) for each in round_ratios],
        "hop_throughput_ratio_per_core": per_core,
        "cpu_us_per_call": {"direct": direct.cpu_us_per_call, "hop": through_hop.cpu_us_per_call},
        "saturation_callers": _SATURATION_CALLERS,
        "background_load_calls_per_s": round(rows[BACKGROUND].calls_per_s, 1),
        # What a bare FastAPI route on uvicorn (a small JSON body in and out) cost its server per
        # sequential call: the floor any route of ours stands on, measured in the same run.
        "bare_route_server_cpu_ms_per_call": round(adapter.cpu_us_per_call["echo"] / 1000, 4),
        "adapter_vs_raw_aiohttp_p50_us": round(adapter.p50_us - raw.p50_us, 1),
        "httpx_vs_aiohttp_p50": round(rows[HTTPX].p50_us / raw.p50_us, 2),
        "targets": {
            "added_p50_ms_at_most": TARGET_ADDED_P50_MS,
            "added_p99_ms_at_most": TARGET_ADDED_P99_MS,
            "hop_throughput_ratio_at_least": TARGET_HOP_THROUGHPUT_RATIO,
        },
        "meets_targets": {
            "added_p50": added_loaded.p50_us <= TARGET_ADDED_P50_MS * 1000,
            "added_p99": added_loaded.p99_us <= TARGET_ADDED_P99_MS * 1000,
            "hop_throughput_ratio": ratio >= TARGET_HOP_THROUGHPUT_RATIO,
        },
        "cpus": os.cpu_count(),
    }


def render_table(results: Sequence[MicroResult]) -> str:
    """The rows as an aligned text table, then the per-hop summary against the targets."""
    width = max(len(result.name) for result in results)
    lines = [
        f"{'call':<{width}}  {'calls':>7}  {'p50 µs':>9}  {'p90 µs':>9}  {'p99 µs':>9}  {'calls/s':>9}"
        f"  {'caller CPU µs':>13}"
    ]
    for r in results:
        rate = f"{r.calls_per_s:9,.0f}" if r.calls_per_s else f"{'—':>9}"
        caller = r.cpu_us_per_call.get("caller")
        cpu = f"{caller:13.1f}" if caller is not None else f"{'—':>13}"
        percentiles = f"{r.p50_us:>9.1f}  {r.p90_us:>9.1f}  {r.p99_us:>9.1f}"
        lines.append(f"{r.name:<{width}}  {r.calls:>7}  {percentiles}  {rate}  {cpu}")
    report = micro_report(results)
    added, loaded, met = (
        report["added_per_hop_ms"],
        report["added_per_hop_at_10pct_load_ms"],
        report["meets_targets"],
    )
    hop_rate, direct_rate, ratio, rounds = (
        report["hop_max_calls_per_s"],
        report["direct_max_calls_per_s"],
        report["hop_throughput_ratio"],
        report["hop_throughput_ratio_by_round"],
    )
    lines += [
        "",
        f"one hop adds {added['p50']:.3f} ms at p50 and {added['p99']:.3f} ms at p99 unloaded; "
        f"{loaded['p50']:.3f} / {loaded['p99']:.3f} ms at 10% load "
        f"(target ≤ {TARGET_ADDED_P50_MS} / ≤ {TARGET_ADDED_P99_MS} ms: "
        f"{_verdict(met['added_p50'] and met['added_p99'])})",
        f"through the gateway: {hop_rate:,.0f} calls/s vs {direct_rate:,.0f} direct, "
        f"{ratio:.2f}x (median of {len(rounds)} rounds, from {min(rounds):.2f} to {max(rounds):.2f}; "
        f"target ≥ {TARGET_HOP_THROUGHPUT_RATIO}x: {_verdict(met['hop_throughput_ratio'])}), "
        f"{_SATURATION_CALLERS} callers, {report['cpus']} CPUs; "
        f"from CPU per call, {_ratio(report['hop_throughput_ratio_per_core'])} "
        "if gateway and route had a core each",
    ]
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}x"


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def _ms(us: float) -> float:
    return round(us / 1000, 3)


def _percentile(ordered: Sequence[int], p: float) -> int:
    """The nearest-rank `p`th percentile of a sorted, non-empty sequence."""
    rank = max(1, math.ceil(p * len(ordered) / 100))
    return ordered[rank - 1]


def _row(name: str, samples_ns: Sequence[int], calls_per_s: float | None = None) -> MicroResult:
    ordered = sorted(samples_ns)
    if calls_per_s is None:
        calls_per_s = len(ordered) * 1e9 / sum(ordered)
    return MicroResult(
        name=name,
        calls=len(ordered),
        p50_us=_percentile(ordered, 50) / 1000,
        p90_us=_percentile(ordered, 90) / 1000,
        p99_us=_percentile(ordered, 99) / 1000,
        calls_per_s=calls_per_s,
    )


def _difference(name: str, slower: MicroResult, faster: MicroResult) -> MicroResult:
    return MicroResult(
        name=name,
        calls=slower.calls,
        p50_us=slower.p50_us - faster.p50_us,
        p90_us=slower.p90_us - faster.p90_us,
        p99_us=slower.p99_us - faster.p99_us,
        calls_per_s=0.0,
    )


@dataclass
class _Window:
    """One saturation window: the latencies timed in it, every call made, each process's CPU seconds."""

    samples_ns: list[int]
    completed: int
    cpu_seconds: dict[str, float]

    @property
    def calls_per_s(self) -> float:
        """Calls completed per second of the window."""
        return len(self.samples_ns) / _SATURATION_SECONDS

    def cpu_us_per_call(self) -> dict[str, float]:
        """Each process's CPU µs per call made."""
        return {who: seconds * 1e6 / self.completed for who, seconds in self.cpu_seconds.items()}


def _saturated_row(name: str, windows: Sequence[_Window]) -> MicroResult:
    """Latencies of every window's calls; the median window's rate; CPU per call over all windows."""
    made = sum(window.completed for window in windows)
    cpu = {
        who: round(sum(window.cpu_seconds[who] for window in windows) * 1e6 / made, 1)
        for who in windows[0].cpu_seconds
    }
    rates = [window.calls_per_s for window in windows]
    row = _row(name, [sample for window in windows for sample in window.samples_ns])
    return replace(row, calls_per_s=statistics.median(rates), cpu_us_per_call=cpu, rounds_calls_per_s=rates)


class _EchoService:
    """What a monolith calls instead of a remote service: a plain object in the same process."""

    async def echo(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Return the payload."""
        return payload


@dataclass(frozen=True)
class _Server:
    """A running server process of this module's `serve` command."""

    process: subprocess.Popen[bytes]
    url: str


class _Bench:
    """The measurements, run inside one event loop of the calling process."""

    def __init__(
        self,
        calls: int,
        warmup: int,
        saturation_rounds: int,
        progress: Progress,
        workdir: Path,
        echo: _Server,
        gateway: _Server,
        nats_url: str,
    ) -> None:
        self.calls = calls
        self.warmup = warmup
        self.saturation_rounds = saturation_rounds
        self.progress = progress
        self.workdir = workdir
        self.echo = echo
        self.gateway = gateway
        self.nats_url = nats_url
        self.rows: dict[str, MicroResult] = {}

    async def run(self) -> dict[str, MicroResult]:
        """Every row, keyed by name."""
        async with contextlib.AsyncExitStack() as stack:
            chassis = HttpSession()
            stack.push_async_callback(chassis.close)
            adapter = ServiceClient("echo", self.echo.url, chassis)
            raw = await stack.enter_async_context(aiohttp.ClientSession(json_serialize=_dumps))
            # trust_env off: a proxy from the environment must never sit between two local processes.
            httpx_client = await stack.enter_async_context(httpx.AsyncClient(trust_env=False))
            nc = await nats.connect(self.nats_url)
            stack.push_async_callback(nc.close)
            service = _EchoService()
            echo_url = f"{self.echo.url}/echo"

            async def local() -> Any:
                return await service.echo(_PAYLOAD)

            async def via_adapter() -> Any:
                return await adapter.call("POST", "/echo", json=_PAYLOAD)

            async def via_raw() -> Any:
                return await _fetch(raw.post(echo_url, json=_PAYLOAD))

            async def via_httpx() -> Any:
                response = await httpx_client.post(echo_url, json=_PAYLOAD)
                response.raise_for_status()
                return response.json()

            async def via_nats() -> Any:
                reply = await nc.request(_SUBJECT, orjson.dumps(_PAYLOAD), timeout=5.0)
                return orjson.loads(reply.data)

            # The hello and hop series call through the pool the services use: the cheapest client
            # here, so the caller takes as little as it can of the cores the servers measured need.
            to_echo, to_gateway = chassis.origin(self.echo.url), chassis.origin(self.gateway.url)

            async def hello() -> Any:
                return _decoded(await to_echo.request("GET", "/hello", timeout_seconds=_CALL_TIMEOUT_S))

            async def hop() -> Any:
                return _decoded(await to_gateway.request("GET", "/hop", timeout_seconds=_CALL_TIMEOUT_S))

            for name, call in [
                (LOCAL, local),
                (ADAPTER, via_adapter),
                (RAW_AIOHTTP, via_raw),
                (HTTPX, via_httpx),
                (NATS, via_nats),
            ]:
                await self._expect(name, call, _PAYLOAD)
                # The caller's CPU and the echo server's, each from its process's CPU clock.
                caller_before = time.process_time()
                with _cpu_seconds({"echo": self.echo.process.pid}) as used:
                    samples_ns = await _sequential(call, self.calls, self.warmup)
                used["caller"] = time.process_time() - caller_before
                made = self.calls + self.warmup
                cpu = {who: round(used[who] * 1e6 / made, 1) for who in ("caller", "echo")}
                self._add(replace(_row(name, samples_ns), cpu_us_per_call=cpu))
            await self._expect(HELLO, hello, _HELLO)
            await self._expect(HOP, hop, _HELLO)
            await self._interleaved(hello, hop, HELLO, HOP, ADDED)
            await self._saturate_in_rounds(hello, hop)
            await self._under_load(hello, hop)
        return self.rows

    def _add(self, row: MicroResult) -> None:
        self.rows[row.name] = row
        rate = f"{row.calls_per_s:,.0f} calls/s" if row.calls_per_s else "derived"
        self.progress(f"micro: {row.name}: p50 {row.p50_us:.1f} µs, p99 {row.p99_us:.1f} µs, {rate}")

    async def _expect(self, name: str, call: Call, expected: Any) -> None:
        answer = await call()
        if answer != expected:
            raise RuntimeError(f"{name} answered {answer!r}, expected {expected!r}")

    async def _interleaved(self, hello: Call, hop: Call, hello_name: str, hop_name: str, added: str) -> None:
        hello_ns, hop_ns = await _paired(hello, hop, self.calls, self.warmup)
        hello_row, hop_row = _row(hello_name, hello_ns), _row(hop_name, hop_ns)
        self._add(hello_row)
        self._add(hop_row)
        self._add(_difference(added, hop_row, hello_row))

    async def _saturate_in_rounds(self, hello: Call, hop: Call) -> None:
        """The 32-caller rows: the direct route and the hop back to back in each round, in turns."""
        windows: dict[str, list[_Window]] = {HELLO_SATURATED: [], HOP_SATURATED: []}
        for round_index in range(self.saturation_rounds):
            pair = [(HELLO_SATURATED, hello), (HOP_SATURATED, hop)]
            for name, call in pair if round_index % 2 == 0 else reversed(pair):
                window = await self._saturate(call)
                windows[name].append(window)
                per_call = ", ".join(f"{who} {us:.0f}" for who, us in window.cpu_us_per_call().items())
                self.progress(
                    f"micro: {name}, round {round_index + 1}/{self.saturation_rounds}: "
                    f"{window.calls_per_s:,.0f} calls/s; CPU µs per call: {per_call}"
                )
        for name, measured in windows.items():
            self._add(_saturated_row(name, measured))

    async def _saturate(self, call: Call) -> _Window:
        pids = {"caller": os.getpid(), "gateway": self.gateway.process.pid, "echo": self.echo.process.pid}
        with _cpu_seconds(pids) as used:
            samples_ns, completed = await _closed_loop(call, _SATURATION_CALLERS, _SATURATION_SECONDS)
        return _Window(samples_ns, completed, used)

    async def _under_load(self, hello: Call, hop: Call) -> None:
        rate = _LOAD_FRACTION * self.rows[HOP_SATURATED].calls_per_s
        self.progress(f"micro: open-loop background load through /hop at {rate:,.0f} calls/s")
        async with _background_load(self.workdir, f"{self.gateway.url}/hop", rate) as summary:
            await self._interleaved(hello, hop, HELLO_LOADED, HOP_LOADED, ADDED_LOADED)
        if summary["errors"] or not summary["latencies_ns"]:
            raise RuntimeError(f"the background load failed: {summary['errors']} errors")
        achieved = summary["sent"] / summary["seconds"]
        self._add(_row(BACKGROUND, summary["latencies_ns"], calls_per_s=achieved))


async def _fetch(request: Any) -> Any:
    """The decoded JSON answer of an aiohttp request context, which must be a 200."""
    async with request as response:
        return _decoded(HttpAnswer(response.status, await response.read()))


def _decoded(answer: HttpAnswer) -> Any:
    """The decoded JSON of an answer, which must be a 200."""
    if answer.status != 200:
        raise RuntimeError(f"HTTP {answer.status}: {answer.body[:200]!r}")
    return orjson.loads(answer.body)


async def _sequential(call: Call, calls: int, warmup: int) -> list[int]:
    """Per-call nanoseconds of `calls` sequential calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(calls):
        started = time.perf_counter_ns()
        await call()
        samples.append(time.perf_counter_ns() - started)
    return samples


async def _paired(first: Call, second: Call, calls: int, warmup: int) -> tuple[list[int], list[int]]:
    """Sequential calls of both, alternating which goes first, so both see the same conditions."""
    for _ in range(warmup):
        await first()
        await second()
    first_ns: list[int] = []
    second_ns: list[int] = []
    for i in range(calls):
        order = [(first, first_ns), (second, second_ns)]
        for call, samples in order if i % 2 == 0 else reversed(order):
            started = time.perf_counter_ns()
            await call()
            samples.append(time.perf_counter_ns() - started)
    return first_ns, second_ns


async def _closed_loop(call: Call, callers: int, seconds: float) -> tuple[list[int], int]:
    """Latencies of the calls `callers` back-to-back callers complete in a `seconds` window after a
    warm-up, and the count of all calls made, warm-up included."""
    window_start = time.perf_counter_ns() + int(_SATURATION_WARMUP_SECONDS * 1e9)
    window_end = window_start + int(seconds * 1e9)
    samples: list[int] = []
    completed = 0

    async def caller() -> None:
        nonlocal completed
        while (started := time.perf_counter_ns()) < window_end:
            await call()
            ended = time.perf_counter_ns()
            completed += 1
            if window_start <= ended <= window_end:
                samples.append(ended - started)

    await asyncio.gather(*(caller() for _ in range(callers)))
    return samples, completed


@contextlib.contextmanager
def _cpu_seconds(pids: dict[str, int]) -> Iterator[dict[str, float]]:
    """Fills the yielded dict with each process's CPU seconds (user + system) spent in the block."""
    processes = {who: psutil.Process(pid) for who, pid in pids.items()}
    before = cpu_seconds(processes)
    used: dict[str, float] = {}
    yield used
    after = cpu_seconds(processes)
    used.update({who: after[who] - before[who] for who in processes})


# -- helper processes --------------------------------------------------------------------------


def _spawn(args: list[str], log_path: Path, *, stdout_pipe: bool = False) -> subprocess.Popen[bytes]:
    """Start `python -m threadline.bench.micro ARGS`, logging to `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "threadline.bench.micro", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
            # Its own session, so a Ctrl-C reaches only us and we stop it; the death signal still
            # ends it if we are killed outright.
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it lingers; reaped either way."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()
    if process.stdout is not None:
        process.stdout.close()


@contextlib.contextmanager
def _server(workdir: Path, role: str, options: list[str]) -> Iterator[_Server]:
    """A `serve` process on a free port, once it answers; retried on another port if it loses a race."""
    for attempt in range(1, _START_ATTEMPTS + 1):
        port = free_ports("127.0.0.1", 1)[0]
        log_path = workdir / f"{role}-{attempt}.log"
        process = _spawn(["serve", "--port", str(port), *options], log_path)
        try:
            if _wait_until_answering(process, port, log_path):
                yield _Server(process, f"http://127.0.0.1:{port}")
                return
        finally:
            _stop(process)
        if b"address already in use" not in log_path.read_bytes().lower():
            break
    raise RuntimeError(f"the {role} server process did not start; its log:\n{_tail(log_path)}")


def _wait_until_answering(process: subprocess.Popen[bytes], port: int, log_path: Path) -> bool:
    """True once GET /hello answers 200; False if the process exits first."""
    deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
    while process.poll() is None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
            try:
                connection.request("GET", "/hello")
                if connection.getresponse().status == 200:
                    return True
            finally:
                connection.close()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"a server process did not answer within {_READY_TIMEOUT_SECONDS:.0f} s; "
                f"its log:\n{_tail(log_path)}"
            )
        time.sleep(0.05)
    return False


@asynccontextmanager
async def _background_load(workdir: Path, url: str, rate: float) -> AsyncIterator[dict[str, Any]]:
    """A `load` process offering `rate` calls/s to `url` in the block; yields its summary, filled after it."""
    log_path = workdir / "load.log"
    process = _spawn(["load", "--url", url, "--rate", str(rate)], log_path, stdout_pipe=True)
    summary: dict[str, Any] = {}
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), _READY_TIMEOUT_SECONDS)
        if line.strip() != b"ready":
            raise RuntimeError(f"the load process did not start; its log:\n{_tail(log_path)}")
        yield summary
        process.send_signal(signal.SIGTERM)
        out = await asyncio.wait_for(asyncio.to_thread(process.stdout.read), _STOP_TIMEOUT_SECONDS)
        summary.update(json.loads(out))
    finally:
        _stop(process)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


# -- the `serve` and `load` commands, run in child processes --------------------------------------


def _server_app(nats_url: str | None, upstream: str | None) -> FastAPI:
    """/hello and /echo; a NATS responder on `bench.echo` with `nats_url`; /hop to `upstream` with one."""

    # The gateway forwards GET /hop to the echo server's /hello as Threadline's gateway forwards
    # its hot routes: the chassis Forwarding middleware over a ServiceClient.
    session = HttpSession()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(session.close)
            if nats_url is not None:
                nc = await nats.connect(nats_url)
                stack.push_async_callback(nc.close)

                async def respond(msg: Any) -> None:
                    await msg.respond(orjson.dumps(orjson.loads(msg.data)))

                await nc.subscribe(_SUBJECT, cb=respond)
                await nc.flush()  # subscribed at the server before /hello first answers
            yield

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return _HELLO

    @app.post("/echo")
    async def echo(payload: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        return payload

    if upstream is not None:
        app.add_middleware(
            Forwarding,
            forwards=[Forward("GET", "/hop", "echo", "/hello")],
            clients={"echo": ServiceClient("echo", upstream, session)},
        )

    return app


async def _serve(port: int, nats_url: str | None, upstream: str | None) -> None:
    config = uvicorn.Config(
        _server_app(nats_url, upstream),
        host="127.0.0.1",
        port=port,
        http=CoalescingHttpToolsProtocol,
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    await uvicorn.Server(config).serve()


async def _load(url: str, rate: float, out: IO[str]) -> None:
    """Poisson arrivals at `rate` until SIGTERM; latency from each request's intended send time.

    Unlike `threadline.bench.loadgen.run_open_loop`, which runs for a set duration, this runs until
    told to stop, so it covers exactly the series it accompanies. It says `ready` after a warm-up
    and, when stopped, writes a JSON summary of the requests intended after that.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(stop_signal, stop.set)
    rng = random.Random(1)
    latencies: list[int] = []
    sent = 0
    measuring_from = time.perf_counter_ns() + int(_LOAD_WARMUP_SECONDS * 1e9)
    pending: set[asyncio.Task[None]] = set()
    # The services' own pool: a third of aiohttp's CPU per call, left to the servers measured.
    target = urlsplit(url)
    session = HttpSession()
    origin = session.origin(f"{target.scheme}://{target.netloc}")
    try:

        async def send(intended: int) -> None:
            with contextlib.suppress(OSError, TimeoutError):
                answer = await origin.request(
                    "GET", target.path, query=target.query, timeout_seconds=_CALL_TIMEOUT_S
                )
                if answer.status == 200 and intended >= measuring_from:
                    latencies.append(time.perf_counter_ns() - intended)

        intended = time.perf_counter_ns()
        said_ready = False
        while True:
            intended += int(rng.expovariate(rate) * 1e9)
            delay = (intended - time.perf_counter_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            if stop.is_set():
                break
            if intended >= measuring_from:
                sent += 1
                if not said_ready:
                    print("ready", file=out, flush=True)
                    said_ready = True
            task = asyncio.create_task(send(intended))
            pending.add(task)
            task.add_done_callback(pending.discard)
        seconds = (time.perf_counter_ns() - measuring_from) / 1e9
        if pending:
            _, unfinished = await asyncio.wait(pending, timeout=_STOP_TIMEOUT_SECONDS / 2)
            for task in unfinished:
                task.cancel()
    finally:
        await session.close()
    # Failed requests, and those still unanswered after the grace period, are the errors.
    errors = sent - len(latencies)
    print(
        json.dumps({"sent": sent, "errors": errors, "seconds": seconds, "latencies_ns": latencies}), file=out
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m threadline.bench.micro [run|serve|load]`: the benchmark, or one of its helper processes."""
    parser = argparse.ArgumentParser(
        prog="python -m threadline.bench.micro",
        description="Microbenchmarks of one service-to-service call.",
    )
    parser.set_defaults(calls=5000, warmup=500, json=None)
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="run the microbenchmarks and print the table (the default)")
    run.add_argument("--calls", type=int, default=5000)
    run.add_argument("--warmup", type=int, default=500)
    run.add_argument("--json", type=Path, help="also write the report here")
    serve = commands.add_parser("serve", help="serve /hello, /echo and optionally /hop and NATS bench.echo")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--nats-url", help="also answer NATS requests on bench.echo")
    serve.add_argument("--upstream", help="also serve GET /hop, calling GET /hello at this base URL")
    load = commands.add_parser("load", help="open-loop GETs of --url at --rate until SIGTERM")
    load.add_argument("--url", required=True)
    load.add_argument("--rate", type=float, required=True)
    args = parser.parse_args(argv)
    if args.command == "serve":
        uvloop.run(_serve(args.port, args.nats_url, args.upstream))
    elif args.command == "load":
        uvloop.run(_load(args.url, args.rate, sys.stdout))
    else:
        results = run_micro(calls=args.calls, warmup=args.warmup)
        if args.json is not None:
            args.json.write_text(json.dumps(micro_report(results), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
