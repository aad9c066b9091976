"""`threadline bench` runs end to end on a tiny workload and writes well-formed results."""

import json
from pathlib import Path

import pytest

from threadline.cli import main

# CPU time is read in nanoseconds, so a few dozen calls of each kind give it a reading.
OP_CALLS = 30
OP_ROUNDS = 2


def test_bench_runs_both_topologies_and_writes_json_and_png(tmp_path: Path) -> None:
    """Both topologies are measured per rate and per operation kind; the JSON has it all; the plot is PNG."""
    code = main(
        [
            "bench",
            "--users", "4",
            "--posts", "12",
            "--rates", "5,10",
            "--duration", "1",
            "--warmup", "0.5",
            "--p99-bound", "5000",
            "--micro-calls", "0",
            "--op-calls", str(OP_CALLS),
            "--op-rounds", str(OP_ROUNDS),
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads((tmp_path / "latest.json").read_text())
    assert [t["topology"] for t in result["topologies"]] == ["monolith", "microservices"]
    # The topologies take turns rate by rate, who goes first alternating.
    assert [(turn["topology"], turn["rate"]) for turn in result["rates_in_order"]] == [
        ("monolith", 5),
        ("microservices", 5),
        ("microservices", 10),
        ("monolith", 10),
    ]
    for topology in result["topologies"]:
        assert [s["offered_rate"] for s in topology["steps"]] == [5, 10]
        assert topology["max_sustainable_rate"] == 10
        assert topology["lowest_unsustainable_rate"] is None
        for step in topology["steps"]:
            assert step["completed"] == step["sent"] > 0
            assert 0 < step["p50_ms"] <= step["p90_ms"] <= step["p99_ms"]
            assert step["cpu_ms_per_request"] > 0
            assert set(step["peak_rss_mb_by_process"]) >= set(topology["processes"])
            assert all(mb > 10 for mb in step["peak_rss_mb_by_process"].values())
            assert 0.0 <= step["stolen_share"] <= 1.0
    monolith, micro = result["topologies"]
    assert monolith["processes"] == ["gateway+users+posts+threads+feed+payments"]
    assert set(micro["processes"]) == {"gateway", "users", "posts", "threads", "feed", "payments"}
    assert "nats" in micro["steps"][0]["cpu_ms_per_request_by_process"]
    for topology, extra in ((monolith, set()), (micro, {"nats"})):
        costs = topology["operation_cost"]
        assert set(costs) == {"feed", "author_posts", "compose", "thread"}
        for cost in costs.values():
            assert cost["calls"] == OP_CALLS
            assert len(cost["cpu_ms_per_call_by_round"]) == OP_ROUNDS
            assert cost["errors"] == 0
            assert cost["cpu_ms_per_call"] > 0
            assert set(cost["cpu_ms_by_process"]) == set(topology["processes"]) | extra
            assert cost["wall_ms_per_call"] > 0
            assert 0.0 <= cost["stolen_share"] <= 1.0
    assert result["operation_cost_targets_ms"]["monolith"] == {"feed": 0.5, "compose": 1.0}
    assert result["machine"]["cpus"] >= 1
    png = (tmp_path / "latency.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000


def test_bench_refuses_fewer_operation_calls_than_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    """A round without calls would measure nothing: the command says what to change, starting nothing."""
    assert main(["bench", "--op-calls", "3", "--op-rounds", "4"]) == 2
    assert "--op-calls 3 cannot be split into 4 rounds" in capsys.readouterr().err
