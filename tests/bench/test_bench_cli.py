"""`threadline bench` runs end to end on a tiny workload and writes well-formed results."""

import json
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from threadline.bench import compare
from threadline.bench.compare import BenchError, Target
from threadline.bench.workload import SeedingError
from threadline.cli import main
from threadline.platform.settings import Settings
from threadline.runner import free_ports, running
from threadline.topology import SERVICES, parse_topology

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


def test_bench_measures_a_system_running_already_from_outside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A target is seeded and offered the rates, its tokens renewed; what needs its processes is left out."""
    # Tokens that run out before the run ends (three 2 s steps after seeding and warming up): the
    # requests of the last steps would be refused (401) unless the bench logs the accounts in again.
    settings = Settings(
        data_dir=tmp_path / "data",
        topology="monolith",
        port=free_ports("127.0.0.1", 1)[0],
        access_token_ttl_seconds=5,
    )
    with running(parse_topology("monolith", SERVICES), settings) as runner:
        code = main(
            [
                "bench",
                "--target", runner.gateway_url,
                "--users", "4",
                "--posts", "12",
                "--rates", "5,10,15",
                "--duration", "2",
                "--warmup", "0.5",
                "--p99-bound", "5000",
                "--micro-calls", "0",
                "--op-calls", str(OP_CALLS),
                "--op-rounds", str(OP_ROUNDS),
                "--scale-posts", "100",
                "--out", str(tmp_path / "results"),
            ]
        )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "logging the seeded accounts in again" in printed
    assert "CPU per operation skipped" in printed
    assert "not measured at scale" in printed
    result = json.loads((tmp_path / "results" / "latest.json").read_text())
    assert result["config"]["targets"] == {"monolith": runner.gateway_url}
    [target] = result["topologies"]
    assert target["topology"] == "monolith"
    assert target["processes"] == []
    assert target["operation_cost"] == {}
    assert target["scale"] is None
    assert target["dataset"]["posts"] == 12
    assert [s["offered_rate"] for s in target["steps"]] == [5, 10, 15]
    for step in target["steps"]:
        assert step["completed"] == step["sent"] > 0
        assert step["errors"] == step["client_errors"] == 0
        assert step["cpu_ms_per_request"] is None
        assert step["peak_rss_mb_by_process"] == {}
    assert (tmp_path / "results" / "latency.png").read_bytes().startswith(b"\x89PNG")


def test_bench_says_what_to_do_when_nothing_answers_at_a_target(capsys: pytest.CaptureFixture[str]) -> None:
    """Checked before any seeding: the error names the address and how to start Threadline there."""
    url = f"http://127.0.0.1:{free_ports('127.0.0.1', 1)[0]}"
    assert main(["bench", "--target", url, "--micro-calls", "0"]) == 2
    error = capsys.readouterr().err
    assert f"nothing answers at {url}" in error
    assert "threadline up" in error


class _RefusesAccounts(BaseHTTPRequestHandler):
    """Says it is a gateway, then refuses every account it is asked to create."""

    def do_GET(self) -> None:
        self._answer(200, {"topology": "refusing"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._answer(422, {"error": {"code": "invalid_request", "message": "no accounts here"}})

    def _answer(self, status: int, body: dict[str, object]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def refusing_gateway() -> Iterator[str]:
    """The URL of a server that answers /api/v1/status but refuses to create accounts."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RefusesAccounts)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_bench_says_why_when_seeding_fails(refusing_gateway: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A refused seeding request ends the run with the request and its answer, not a traceback."""
    code = main(["bench", "--target", refusing_gateway, "--users", "2", "--posts", "2", "--micro-calls", "0"])
    assert code == 1
    error = capsys.readouterr().err
    assert "seeding failed, so nothing was measured" in error
    assert "no accounts here" in error


def test_a_topology_started_here_keeps_its_data_and_logs_when_the_run_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run that did not finish keeps the topology's data directory, logs included, and says where."""

    async def refused(*_: object, **__: object) -> None:
        raise SeedingError("POST /users: expected 201, got 503")

    monkeypatch.setattr(compare, "seed", refused)
    assert main(["bench", "--topologies", "monolith", "--micro-calls", "0"]) == 1
    kept = re.search(r"its data and logs are kept in (\S+)", capsys.readouterr().out)
    assert kept is not None
    data_dir = Path(kept.group(1))
    try:
        assert any((data_dir / "logs").iterdir())
    finally:
        shutil.rmtree(data_dir)


def test_bench_takes_topologies_or_targets_not_both(capsys: pytest.CaptureFixture[str]) -> None:
    """Starting some topologies and measuring others would compare unlike things: refused, saying so."""
    assert main(["bench", "--topologies", "monolith", "--target", "http://127.0.0.1:8000"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("http://127.0.0.1:8000", Target("http://127.0.0.1:8000")),
        ("http://127.0.0.1:8000/", Target("http://127.0.0.1:8000")),
        ("big=https://threadline.example", Target("https://threadline.example", "big")),
        ("a=b=http://h:1", Target("http://h:1", "a=b")),
    ],
)
def test_a_target_is_a_base_url_with_an_optional_name(text: str, target: Target) -> None:
    """The URL is kept without a trailing slash; a name is whatever precedes its last '='."""
    assert Target.parse(text) == target


@pytest.mark.parametrize(
    "text", ["127.0.0.1:8000", "ftp://h:1", "http://h:1/api/v1", "http://h:1/?a=b", "name=", "http://"]
)
def test_a_target_that_is_not_a_gateway_base_url_is_refused(text: str) -> None:
    """Anything but scheme, host and port would be joined with the API paths into nonsense."""
    with pytest.raises(BenchError, match=r"base URL|not a URL"):
        Target.parse(text)
