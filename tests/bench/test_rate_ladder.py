"""Stepping up the offered rate, then narrowing the gap between the last rate sustained and the first not."""

from threadline.bench.compare import RateLadder, render_table


def climb(
    rates: list[float], limit: float, *, refine: int, slow_moments: int = 0, climb_past_rates: bool = False
) -> list[float]:
    """The rates a ladder has measured, in order, against a fake system sustaining rates up to `limit`.

    The first `slow_moments` steps fail whatever their rate, as a step does when the machine stalls.
    """
    ladder = RateLadder(rates, refine=refine, climb_past_rates=climb_past_rates)
    measured: list[float] = []
    while (rate := ladder.next_rate()) is not None:
        measured.append(rate)
        ladder.record(rate, sustained=rate <= limit and len(measured) > slow_moments)
    return measured


def test_rates_all_sustained_are_each_measured_once_and_not_refined() -> None:
    """No unsustainable rate: nothing to narrow down."""
    assert climb([25, 50, 100], 5000, refine=2) == [25, 50, 100]


def test_a_ladder_told_to_climb_on_rises_by_a_quarter_past_its_rates_until_one_is_not_sustained() -> None:
    """Every rate given held: 250, 310 (312.5 to the nearest ten), 390, then 490, which fails twice."""
    assert climb([100, 200], 390, refine=0, climb_past_rates=True) == [100, 200, 250, 310, 390, 490, 490]
    assert climb([100, 200], 390, refine=1, climb_past_rates=True)[-1] == 440


def test_climbing_on_stops_at_the_ceiling() -> None:
    """A system that sustains anything is offered the ceiling, and no more."""
    assert climb([40_000], float("inf"), refine=2, climb_past_rates=True) == [40_000, 50_000]


def test_halfway_rates_narrow_the_gap() -> None:
    """800 held and 1000 did not, twice: 900 (held) then 950 (did not, twice) are tried, none above 1000."""
    assert climb([400, 800, 1000, 1200], 930, refine=2) == [400, 800, 1000, 1000, 900, 950, 950]
    assert climb([400, 800, 1000, 1200], 910, refine=3) == [400, 800, 1000, 1000, 900, 950, 950, 920, 920]


def test_a_rate_not_sustained_once_is_tried_again_before_it_counts() -> None:
    """A step spoilt by one slow moment does not end the climb; failing its second try too does."""
    assert climb([100, 200, 300], 1000, refine=2, slow_moments=1) == [100, 100, 200, 300]
    assert climb([100, 200, 300], 1000, refine=0, slow_moments=2) == [100, 100]


def test_refining_stops_at_the_resolution_and_can_be_turned_off() -> None:
    """Halfway rates are whole tens: none is tried once the gap is that small, and none with refine=0."""
    assert climb([100, 105], 100, refine=5) == [100, 105, 105]
    assert climb([800, 1000], 850, refine=0) == [800, 1000, 1000]


def test_a_first_rate_already_too_high_is_refined_from_zero() -> None:
    """Nothing sustained: the halfway rates go down from the first rate towards zero."""
    assert climb([50, 100], 12, refine=2) == [50, 50, 20, 20, 10]


def test_ladders_climbed_in_turns_keep_apart() -> None:
    """Two topologies taking turns: each ladder follows only its own verdicts."""
    fast, slow = RateLadder([100, 200, 300], refine=1), RateLadder([100, 200, 300], refine=1)
    turns: list[tuple[str, float]] = []
    while due := [(name, ladder) for name, ladder in (("fast", fast), ("slow", slow)) if ladder.next_rate()]:
        for name, ladder in due:
            rate = ladder.next_rate()
            assert rate is not None
            turns.append((name, rate))
            ladder.record(rate, sustained=rate <= (1000 if name == "fast" else 120))
    assert turns == [
        ("fast", 100),
        ("slow", 100),
        ("fast", 200),
        ("slow", 200),
        ("fast", 300),
        ("slow", 200),
        ("slow", 150),
        ("slow", 150),
    ]


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


def test_the_table_says_when_a_maximum_is_only_the_highest_rate_offered() -> None:
    """A topology that sustained every rate has no measured maximum, and the ratio says so."""
    steps: list[dict[str, object]] = []
    monolith = {"topology": "monolith", "max_sustainable_rate": 1200, "lowest_unsustainable_rate": None}
    micro = {"topology": "microservices", "max_sustainable_rate": 900, "lowest_unsustainable_rate": 1000}
    topologies = [{**topo, "processes": [topo["topology"]], "steps": steps} for topo in (monolith, micro)]
    table = render_table({"config": {"p99_bound_ms": 200.0}, "topologies": topologies})
    assert "max sustainable 1200 req/s (p99 <= 200 ms, the highest rate offered)" in table
    assert "max sustainable 900 req/s (p99 <= 200 ms, 1000 was not)" in table
    assert "throughput: 0.75 (monolith sustained every rate offered: not a measured maximum)" in table
