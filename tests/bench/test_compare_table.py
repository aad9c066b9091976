"""The bench's terminal table puts the monolith's operation costs beside a bare route's, from one run."""

from typing import Any

from threadline.bench.compare import render_table


def cost(cpu_ms: float) -> dict[str, Any]:
    """One operation kind's cost, as the bench records it."""
    return {
        "calls": 100,
        "cpu_ms_per_call": cpu_ms,
        "cpu_ms_by_process": {"monolith": cpu_ms},
        "wall_ms_per_call": 2 * cpu_ms,
        "errors": 0,
        "error_reasons": {},
        "warmup_calls": 10,
        "warmup_errors": 0,
        "items_per_call": None,
        "settled": True,
        "settle_s": 0.0,
        "idle_cpu_ms_per_s": 1.0,
    }


def result(floor_ms: float) -> dict[str, Any]:
    """A bench result of one monolith with two operation kinds and the microbenchmarks' summary."""
    return {
        "config": {"p99_bound_ms": 200.0},
        "operation_cost_targets_ms": {"monolith": {"feed": 0.5}},
        "topologies": [
            {
                "topology": "monolith",
                "max_sustainable_rate": 100,
                "processes": ["monolith"],
                "steps": [],
                "operation_cost": {"feed": cost(1.2), "compose": cost(3.0)},
            }
        ],
        "micro": {
            "added_per_hop_ms": {"p50": 0.2, "p99": 0.4},
            "added_per_hop_at_10pct_load_ms": {"p50": 0.25, "p99": 0.5},
            "hop_throughput_ratio": 0.7,
            "bare_route_server_cpu_ms_per_call": floor_ms,
        },
    }


def test_operation_costs_are_given_as_multiples_of_a_bare_route() -> None:
    """Each monolith operation's CPU is divided by the bare route's CPU per call of the same run."""
    table = render_table(result(0.3))
    floor_line = table.splitlines()[-1]
    assert "0.300 ms of CPU per sequential call" in floor_line
    assert "feed 4.0x" in floor_line
    assert "compose 10.0x" in floor_line


def test_a_zero_floor_gives_no_multiples() -> None:
    """A bare route measured at no CPU gives its figure but no division by zero."""
    floor_line = render_table(result(0.0)).splitlines()[-1]
    assert "0.000 ms of CPU per sequential call" in floor_line
    assert "x" not in floor_line.split("call")[-1]


def test_each_operation_shows_the_share_of_time_the_host_lent_away() -> None:
    """The stolen column gives the share as a percentage, or a dash where the system does not say."""
    run = result(0.3)
    run["topologies"][0]["operation_cost"]["feed"]["stolen_share"] = 0.123
    lines = render_table(run).splitlines()
    assert "stolen" in next(line for line in lines if line.strip().startswith("kind"))
    assert next(line for line in lines if line.strip().startswith("feed")).split()[6] == "12.3%"
    assert next(line for line in lines if line.strip().startswith("compose")).split()[6] == "-"


def test_each_operation_shows_the_range_of_its_rounds() -> None:
    """The rounds column gives the lowest and highest round, or a dash for a single round."""
    run = result(0.3)
    run["topologies"][0]["operation_cost"]["feed"]["cpu_ms_per_call_by_round"] = [1.25, 1.1, 1.31]
    run["topologies"][0]["operation_cost"]["compose"]["cpu_ms_per_call_by_round"] = [3.0]
    lines = render_table(run).splitlines()
    assert "100 sequential calls per kind in 3 rounds" in next(
        line for line in lines if "operation cost" in line
    )
    assert "rounds" in next(line for line in lines if line.strip().startswith("kind"))
    assert next(line for line in lines if line.strip().startswith("feed")).split()[2] == "1.10-1.31"
    assert next(line for line in lines if line.strip().startswith("compose")).split()[2] == "-"


def test_a_read_shows_what_its_first_pass_cost() -> None:
    """The first-pass column gives a read's CPU per call with its caches cold; a dash for a write."""
    run = result(0.3)
    run["topologies"][0]["operation_cost"]["feed"]["first_pass_cpu_ms_per_call"] = 1.875
    lines = render_table(run).splitlines()
    assert "first pass" in next(line for line in lines if line.strip().startswith("kind"))
    heading = next(line for line in lines if "operation cost" in line)
    assert "after a first pass over the same calls" in heading
    assert next(line for line in lines if line.strip().startswith("feed")).split()[3] == "1.875"
    assert next(line for line in lines if line.strip().startswith("compose")).split()[3] == "-"


def test_a_step_that_completed_nothing_shows_dashes_for_its_percentiles() -> None:
    """All of a step's requests failing leaves its percentiles null: the table still renders, with dashes."""
    run = result(0.3)
    run["topologies"][0]["steps"] = [
        {
            "offered_rate": 10,
            "achieved_rate": 0.0,
            "p50_ms": None,
            "p90_ms": None,
            "p99_ms": None,
            "errors": 20,
            "client_errors": 0,
            "cpu_ms_per_request": None,
            "cpu_ms_per_request_by_process": {},
            "peak_rss_mb_by_process": {},
            "stolen_share": None,
        }
    ]
    row = next(line for line in render_table(run).splitlines() if line.split()[:1] == ["10"])
    assert row.split()[:7] == ["10", "0.0", "-", "-", "-", "20", "-"]
