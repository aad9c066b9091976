"""The microbenchmarks run end to end on a few calls, return well-formed rows and leave no process behind."""

import json
import statistics
import subprocess
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

from threadline.bench.micro import (
    ADAPTER,
    ADDED,
    ADDED_LOADED,
    BACKGROUND,
    HELLO,
    HELLO_LOADED,
    HELLO_SATURATED,
    HOP,
    HOP_LOADED,
    HOP_SATURATED,
    HTTPX,
    LOCAL,
    NATS,
    RAW_AIOHTTP,
    RESULT_NAMES,
    MicroResult,
    micro_report,
    run_micro,
)

CALLS = 200
ROUNDS = 2
DERIVED = {ADDED, ADDED_LOADED}
SATURATED = {HELLO_SATURATED, HOP_SATURATED}
SEQUENTIAL = set(RESULT_NAMES) - DERIVED - SATURATED - {BACKGROUND}


@dataclass
class Run:
    """The rows of one run, the processes it started, and the children we had before it."""

    results: list[MicroResult]
    spawned: list[tuple[int, float | None]]
    children_before: set[int]
    progress: list[str]

    def row(self, name: str) -> MicroResult:
        """The row called `name`."""
        return next(result for result in self.results if result.name == name)


@pytest.fixture(scope="module")
def run() -> Run:
    """One small run, recording every process it starts (servers, load generator, NATS)."""
    spawned: list[tuple[int, float | None]] = []

    class RecordingPopen(subprocess.Popen[bytes]):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            try:
                spawned.append((self.pid, psutil.Process(self.pid).create_time()))
            except psutil.NoSuchProcess:
                spawned.append((self.pid, None))

    children_before = {child.pid for child in psutil.Process().children(recursive=True)}
    progress: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", RecordingPopen)
        results = run_micro(calls=CALLS, warmup=20, saturation_rounds=ROUNDS, progress=progress.append)
    return Run(results, spawned, children_before, progress)


def test_every_row_is_present_in_a_stable_order(run: Run) -> None:
    """The rows are exactly RESULT_NAMES, in that order."""
    assert [result.name for result in run.results] == list(RESULT_NAMES)


def test_sequential_rows_count_every_timed_call(run: Run) -> None:
    """Each sequential series times exactly `calls` calls; the others count what they completed."""
    for name in SEQUENTIAL | DERIVED:
        assert run.row(name).calls == CALLS, name
    for name in SATURATED | {BACKGROUND}:
        assert run.row(name).calls > 0, name


def test_measured_percentiles_are_positive_and_ordered(run: Run) -> None:
    """Every measured row has 0 < p50 <= p90 <= p99 and a positive rate."""
    for name in set(RESULT_NAMES) - DERIVED:
        result = run.row(name)
        assert 0 < result.p50_us <= result.p90_us <= result.p99_us, name
        assert result.calls_per_s > 0, name


def test_added_rows_are_the_hop_minus_the_direct_route(run: Run) -> None:
    """ "Added by one hop" is the gateway hop's percentiles minus the bare route's, unloaded and loaded."""
    for added, hop, hello in [(ADDED, HOP, HELLO), (ADDED_LOADED, HOP_LOADED, HELLO_LOADED)]:
        for field in ("p50_us", "p90_us", "p99_us"):
            expected = getattr(run.row(hop), field) - getattr(run.row(hello), field)
            assert getattr(run.row(added), field) == pytest.approx(expected), (added, field)
        assert run.row(added).calls_per_s == 0


def test_saturation_rows_carry_cpu_per_call_of_each_process(run: Run) -> None:
    """The 32-caller rows say how much CPU the caller, the gateway and the echo server spent per call."""
    assert run.row(HELLO_SATURATED).cpu_us_per_call["echo"] > 0
    assert run.row(HOP_SATURATED).cpu_us_per_call["gateway"] > 0
    assert set(run.row(HOP_SATURATED).cpu_us_per_call) == {"caller", "gateway", "echo"}


def test_saturation_takes_the_direct_route_and_the_hop_in_turns_round_by_round(run: Run) -> None:
    """Each round measures both, the one that went second in a round going first in the next."""
    rounds = [line for line in run.progress if ", round " in line]
    assert [line.split(", round ")[0].removeprefix("micro: ") for line in rounds] == [
        HELLO_SATURATED,
        HOP_SATURATED,
        HOP_SATURATED,
        HELLO_SATURATED,
    ]
    for name in SATURATED:
        row = run.row(name)
        assert len(row.rounds_calls_per_s) == ROUNDS, name
        assert row.calls_per_s == pytest.approx(statistics.median(row.rounds_calls_per_s)), name


def _saturated(name: str, rates: list[float]) -> MicroResult:
    cpu = {"echo": 1.0, "gateway": 1.0}
    return MicroResult(name, 100, 1.0, 2.0, 3.0, statistics.median(rates), cpu, rates)


def test_throughput_ratio_is_the_median_of_the_rounds_ratios() -> None:
    """Each round's hop rate is set against the same round's direct rate, not against another round's."""
    rows = {name: MicroResult(name, 1, 1.0, 1.0, 1.0, 1.0) for name in RESULT_NAMES}
    rows[HELLO_SATURATED] = _saturated(HELLO_SATURATED, [1000.0, 2000.0, 3000.0])
    rows[HOP_SATURATED] = _saturated(HOP_SATURATED, [600.0, 800.0, 1500.0])
    rows[ADAPTER] = MicroResult(ADAPTER, 1, 1.0, 1.0, 1.0, 1.0, {"caller": 1.0, "echo": 1.0})
    report = micro_report([rows[name] for name in RESULT_NAMES])
    # The rounds' ratios are 0.6, 0.4 and 0.5; the ratio of the median rates would be 0.4.
    assert report["hop_throughput_ratio_by_round"] == [0.6, 0.4, 0.5]
    assert report["hop_throughput_ratio"] == 0.5
    assert report["meets_targets"]["hop_throughput_ratio"] is True


def test_rows_of_one_call_each_way_carry_the_cpu_of_caller_and_echo_server(run: Run) -> None:
    """Local adapter to NATS: CPU per call of caller and echo server; a hop costs the caller far more."""
    for name in (LOCAL, ADAPTER, RAW_AIOHTTP, HTTPX, NATS):
        assert set(run.row(name).cpu_us_per_call) == {"caller", "echo"}, name
        assert run.row(name).cpu_us_per_call["caller"] > 0, name
    # A hop makes the caller encode, write, read and decode: far more than a function call.
    for name in (ADAPTER, RAW_AIOHTTP, HTTPX, NATS):
        assert run.row(name).cpu_us_per_call["caller"] > 10 * run.row(LOCAL).cpu_us_per_call["caller"], name


def test_local_adapter_is_faster_than_any_call_over_the_network(run: Run) -> None:
    """An in-process call does no network I/O, so it beats every hop at p50 and p99."""
    local = run.row(LOCAL)
    for name in SEQUENTIAL - {LOCAL}:
        assert local.p50_us < run.row(name).p50_us, name
        assert local.p99_us < run.row(name).p99_us, name


def test_report_is_json_and_summarizes_the_hop(run: Run) -> None:
    """The report survives a JSON round trip and carries the per-hop cost, the ratio and the verdicts."""
    report = json.loads(json.dumps(micro_report(run.results)))
    assert [row["name"] for row in report["results"]] == list(RESULT_NAMES)
    assert set(report["added_per_hop_ms"]) == {"p50", "p99"}
    assert set(report["added_per_hop_at_10pct_load_ms"]) == {"p50", "p99"}
    assert report["added_per_hop_ms"]["p50"] == pytest.approx(run.row(ADDED).p50_us / 1000, abs=1e-3)
    assert report["hop_throughput_ratio"] > 0
    assert report["hop_throughput_ratio_per_core"] > 0
    assert report["bare_route_server_cpu_ms_per_call"] == pytest.approx(
        run.row(ADAPTER).cpu_us_per_call["echo"] / 1000, abs=1e-4
    )
    assert report["bare_route_server_cpu_ms_per_call"] > 0
    assert set(report["meets_targets"]) == {"added_p50", "added_p99", "hop_throughput_ratio"}
    assert all(isinstance(met, bool) for met in report["meets_targets"].values())


def test_report_refuses_results_with_rows_missing(run: Run) -> None:
    """A report needs every row; a partial list is an error, not a report with holes."""
    with pytest.raises(ValueError, match="lack"):
        micro_report(run.results[:-1])


def test_no_process_it_started_outlives_the_run(run: Run) -> None:
    """The servers, the load generator and NATS are all gone (reaped, not zombies) after the run."""
    assert len(run.spawned) >= 4
    for pid, created in run.spawned:
        try:
            process = psutil.Process(pid)
            same = created is None or process.create_time() == created
        except psutil.NoSuchProcess:
            continue
        assert not same, f"process {pid} ({process.cmdline()}) is still there"
    children_after = {child.pid for child in psutil.Process().children(recursive=True)}
    assert children_after <= run.children_before
