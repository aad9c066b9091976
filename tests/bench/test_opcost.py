"""CPU per operation is measured in rounds, the kinds taking turns, against a real local server."""

import random
from typing import Any

import psutil
import pytest

from tests.support.servers import serving
from threadline.bench import opcost
from threadline.bench.loadgen import Request
from threadline.bench.opcost import OperationCost, measure_operation_costs


class RecordingApp:
    """An ASGI app that answers every request with an empty JSON object and notes its method and path."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Answer one HTTP request."""
        if scope["type"] != "http":
            return
        self.seen.append(f"{scope['method']} {scope['path']}")
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": b"{}"})


def reads_and_writes(rng: random.Random) -> Request:
    """Half reads, half writes; each request's path says which of its kind it is, and which draw."""
    if rng.random() < 0.5:
        return Request("GET", f"/read/{rng.randrange(10**9)}", kind="read")
    return Request("POST", f"/write/{rng.randrange(10**9)}", body=b"{}", kind="write")


def cost(cpu_s: float, calls: int, **fields: Any) -> OperationCost:
    """One round's cost of one kind in a one-process system."""
    defaults: dict[str, Any] = {
        "kind": "read",
        "calls": calls,
        "errors": 0,
        "cpu_s_by_process": {"app": cpu_s},
        "wall_s": calls * 0.002,
        "settled": True,
        "settle_s": 0.1,
        "idle_cpu_s_per_s": 0.002,
    }
    return OperationCost(**{**defaults, **fields})


async def test_rounds_take_turns_between_kinds_and_keep_each_rounds_figure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reads then writes in every round, warmed up only before the first; every call counted once.

    A read is warmed up by a first pass over the very reads then measured (its CPU reported on its
    own), a write by writes of its own.
    """
    monkeypatch.setattr(opcost, "QUIET_S", 0.05)
    app = RecordingApp()
    progress: list[str] = []
    async with serving(app) as url:
        costs = await measure_operation_costs(
            url,
            {"test": psutil.Process()},
            reads_and_writes,
            calls=6,
            rounds=3,
            warmup_calls=1,
            progress=progress.append,
        )
    kinds = [seen.split("/")[1] for seen in app.seen]
    assert kinds == ["read"] * 8 + ["write"] * 3 + ["read", "read", "write", "write"] * 2
    reads = [seen for seen in app.seen if seen.startswith("GET /read/")]
    writes = [seen for seen in app.seen if seen.startswith("POST /write/")]
    assert reads[:6] == reads[6:]
    assert len(set(reads)) > 1
    assert writes[0] not in writes[1:]
    assert list(costs) == ["read", "write"]
    assert costs["read"].warmup_calls == 6
    assert costs["write"].warmup_calls == 1
    first_pass = costs["read"].first_pass_cpu_ms_per_call
    assert first_pass is not None
    assert first_pass > 0
    assert costs["read"].to_dict()["first_pass_cpu_ms_per_call"] == round(first_pass, 4)
    assert costs["write"].first_pass_cpu_ms_per_call is None
    for found in costs.values():
        assert found.calls == 6
        assert found.errors == 0
        assert len(found.cpu_ms_per_call_by_round) == 3
        # The headline is every call's CPU together; each round's figure is its own.
        total_ms = 1000 * sum(found.cpu_s_by_process.values())
        assert found.cpu_ms_per_call == pytest.approx(total_ms / 6)
        assert sum(found.cpu_ms_per_call_by_round) * 2 == pytest.approx(total_ms)
        assert found.to_dict()["cpu_ms_per_call_by_round"] == [
            round(ms, 4) for ms in found.cpu_ms_per_call_by_round
        ]
    assert sum("round 3/3" in line for line in progress) == 2


async def test_calls_that_cannot_fill_every_round_are_refused() -> None:
    """Fewer calls than rounds would leave a round empty: refused before anything is sent."""
    with pytest.raises(ValueError, match="cannot be split"):
        await measure_operation_costs("http://127.0.0.1:9", {}, reads_and_writes, calls=2, rounds=3)


def test_rounds_combine_into_sums_with_weighted_means() -> None:
    """Calls, CPU, time and errors add up; posts per answer and the host's share are averaged."""
    rounds = [
        cost(0.010, 10, items_per_call=20.0, stolen_share=0.02, errors=1, error_reasons={"500": 1}),
        cost(0.030, 30, items_per_call=10.0, stolen_share=None, settled=False, settle_s=2.0),
        cost(0.020, 10, items_per_call=20.0, stolen_share=0.04, error_reasons={"500": 0, "timeout": 0}),
    ]
    combined = OperationCost.of_rounds(rounds)
    assert combined.calls == 50
    assert combined.cpu_s_by_process == {"app": pytest.approx(0.060)}
    assert combined.cpu_ms_per_call == pytest.approx(1.2)
    assert combined.cpu_ms_per_call_by_round == pytest.approx([1.0, 1.0, 2.0])
    assert combined.wall_s == pytest.approx(0.1)
    assert combined.errors == 1
    assert combined.error_reasons == {"500": 1, "timeout": 0}
    assert combined.items_per_call == pytest.approx((10 * 20 + 30 * 10 + 10 * 20) / 50)
    assert combined.stolen_share == pytest.approx(0.03)
    assert combined.settled is False
    assert combined.settle_s == 2.0


def test_posts_per_answer_stay_unknown_if_any_round_lacks_them() -> None:
    """A round whose answers were not all pages leaves the average unknown rather than skewed."""
    combined = OperationCost.of_rounds([cost(0.01, 10, items_per_call=20.0), cost(0.01, 10)])
    assert combined.items_per_call is None
