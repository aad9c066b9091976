"""Stepping up the offered rate, then narrowing the gap between the last rate sustained and the first not."""

from collections.abc import Callable

from threadline.bench.compare import render_table, step_up


def capacity(limit: float) -> tuple[list[float], Callable[[float], float], Callable[[float], bool]]:
    """A fake system that sustains rates up to `limit`; the measured rates, the measure and the verdict."""
    measured: list[float] = []

    def measure(rate: float) -> float:
        measured.append(rate)
        return rate

    return measured, measure, lambda rate: rate <= limit


def test_rates_all_sustained_are_each_measured_once_and_not_refined() -> None:
    """No unsustainable rate: nothing to narrow down."""
    measured, measure, sustainable = capacity(5000)
    steps = step_up([25, 50, 100], measure, sustainable, refine=2)
    assert steps == measured == [25, 50, 100]


def test_halfway_rates_narrow_the_gap_and_come_back_in_order() -> None:
    """800 held and 1000 did not: 900 (held) then 950 (did not) are tried; steps come back sorted."""
    measured, measure, sustainable = capacity(930)
    steps = step_up([400, 800, 1000, 1200], measure, sustainable, refine=2)
    assert measured == [400, 800, 1000, 900, 950]
    assert steps == [400, 800, 900, 950, 1000]


def test_refining_stops_at_the_resolution_and_can_be_turned_off() -> None:
    """Halfway rates are whole tens: none is tried once the gap is that small, and none with refine=0."""
    measured, measure, sustainable = capacity(100)
    assert step_up([100, 105], measure, sustainable, refine=5) == [100, 105]
    assert measured == [100, 105]
    measured, measure, sustainable = capacity(850)
    assert step_up([800, 1000], measure, sustainable, refine=0) == [800, 1000]


def test_a_first_rate_already_too_high_is_refined_from_zero() -> None:
    """Nothing sustained: the halfway rates go down from the first rate towards zero."""
    measured, measure, sustainable = capacity(12)
    assert step_up([50, 100], measure, sustainable, refine=2) == [10, 20, 50]
    assert measured == [50, 20, 10]


def test_the_table_names_the_lowest_rate_that_was_not_sustained() -> None:
    """Beside the maximum sustainable rate, the table says which rate above it failed."""
    topology = {
        "topology": "monolith",
        "max_sustainable_rate": 900,
        "lowest_unsustainable_rate": 950,
        "processes": ["monolith"],
        "steps": [],
    }
    table = render_table({"config": {"p99_bound_ms": 200.0}, "topologies": [topology]})
    assert "max sustainable 900 req/s (p99 <= 200 ms, 950 was not)" in table
