"""Spawning, health-gating, watching and stopping processes (fake ones: a stdlib HTTP server)."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from threadline.platform.settings import Settings
from threadline.runner import (
    CommandFactory,
    ProcessSpec,
    Runner,
    RunningProcess,
    StartError,
    running,
    serve_command,
    service_urls,
)
from threadline.topology import parse_topology

SERVICES = ("users", "posts")
HERE = Path(__file__).parent
FAKE_PROCESS = HERE / "fake_process.py"
FAKE_UP = HERE / "fake_up.py"


def fake(**modes: str) -> CommandFactory:
    """Fake processes, `ready` unless a mode is given for the process's name."""

    def command(spec: ProcessSpec) -> list[str]:
        return [sys.executable, str(FAKE_PROCESS), modes.get(spec.name, "ready"), spec.name]

    return command


def get_json(url: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return json.load(response)


@pytest.fixture
def nats_url(busy_port: int) -> str:
    """Stands in for an external NATS server: the runner only checks that it accepts connections."""
    return f"nats://127.0.0.1:{busy_port}"


def _runner(topology: str, settings: Settings, out: io.StringIO, **options: Any) -> Runner:
    return Runner(parse_topology(topology, SERVICES), settings, out=out, **options)


def test_microservices_start_health_gated_with_a_status_table_and_stop_completely(
    tmp_path: Path, nats_url: str, pid_gone: Callable[[int], bool]
) -> None:
    """All processes are ready when start() returns, listed with pid/URL/state, gone after stop()."""
    out = io.StringIO()
    runner = _runner(
        "microservices", Settings(data_dir=tmp_path, port=0, nats_url=nats_url), out, command=fake()
    )
    runner.start()
    try:
        pids = [p.pid for p in runner.processes]
        assert [p.spec.name for p in runner.processes] == ["gateway", "users", "posts"]
        assert not any(pid_gone(pid) for pid in pids)
        for proc in runner.processes:
            assert f"✓ {proc.spec.name} ready (pid {proc.pid}, {proc.spec.url})" in out.getvalue()
        table = runner.status_table()
        for proc in runner.processes:
            assert re.search(rf"^  {proc.spec.name} +{proc.pid} +{proc.spec.url} +ready$", table, re.M)
        assert f"NATS:  {nats_url} (external)" in table
        assert f"Data:  {tmp_path}" in table
        assert f"Logs:  {tmp_path / 'logs'}" in table
        assert f"Gateway: {runner.gateway_url} — press Ctrl-C to stop" in table
    finally:
        runner.stop()
    assert all(pid_gone(pid) for pid in pids)
    for name in ("gateway", "users", "posts"):
        assert f"■ {name} stopped" in out.getvalue()


def test_each_process_gets_its_settings_and_its_own_log(tmp_path: Path, nats_url: str) -> None:
    """Children get THREADLINE_* (data dir, topology, URLs, NATS, host, port) and log to logs/<name>.log."""
    settings = Settings(data_dir=tmp_path, port=0, nats_url=nats_url)
    with_groups = _runner("users+posts", settings, io.StringIO(), command=fake())
    with_groups.start()
    try:
        proc = with_groups.processes[0]
        env = get_json(f"{proc.spec.url}/env")
        assert env["THREADLINE_DATA_DIR"] == str(tmp_path)
        assert env["THREADLINE_TOPOLOGY"] == "users+posts"
        assert json.loads(env["THREADLINE_SERVICE_URLS"]) == service_urls(with_groups.specs)
        assert env["THREADLINE_NATS_URL"] == nats_url
        assert env["THREADLINE_HOST"] == "127.0.0.1"
        assert env["THREADLINE_PORT"] == str(proc.spec.port)
        assert "users+posts listening" in (tmp_path / "logs" / "users+posts.log").read_text()
    finally:
        with_groups.stop()


def test_running_starts_for_a_with_block_and_stops_after_it(
    tmp_path: Path, pid_gone: Callable[[int], bool]
) -> None:
    """`with running(...)`: ready inside the block, every process gone after it."""
    topology = parse_topology("monolith", SERVICES)
    settings = Settings(data_dir=tmp_path, port=0)

    with running(topology, settings, command=fake(), out=io.StringIO()) as runner:
        (proc,) = runner.processes
        assert get_json(f"{proc.spec.url}/env")["THREADLINE_TOPOLOGY"] == "monolith"

    assert pid_gone(proc.pid)


def test_the_command_line_names_the_process() -> None:
    """`threadline serve <name> --port N`: ps and top show which process is which."""
    spec = ProcessSpec("users+posts", ("users", "posts"), "127.0.0.1", 4321, "http://127.0.0.1:4321")

    assert serve_command(spec) == [
        sys.executable,
        "-m",
        "threadline",
        "serve",
        "users+posts",
        "--port",
        "4321",
    ]


def test_a_monolith_uses_in_process_events_and_no_nats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pid_gone: Callable[[int], bool]
) -> None:
    """One process, no NATS started or passed on, even with THREADLINE_NATS_URL in the environment."""
    monkeypatch.setenv("THREADLINE_NATS_URL", "nats://127.0.0.1:1")
    out = io.StringIO()
    runner = _runner("monolith", Settings(data_dir=tmp_path, port=0), out, command=fake())
    runner.start()
    try:
        (proc,) = runner.processes
        env = get_json(f"{proc.spec.url}/env")
        assert "THREADLINE_NATS_URL" not in env
        assert runner.nats is None
        assert "NATS:  none — in-process events" in runner.status_table()
        assert re.search(rf"^  gateway\+users\+posts +{proc.pid} ", runner.status_table(), re.M)
    finally:
        runner.stop()
    assert pid_gone(proc.pid)


def test_microservices_without_a_nats_url_start_an_embedded_nats_and_stop_it_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pid_gone: Callable[[int], bool]
) -> None:
    """No --nats-url: NATS is started in <data dir>/nats, handed to every process, stopped after them."""
    monkeypatch.delenv("THREADLINE_NATS_URL", raising=False)
    out = io.StringIO()
    runner = _runner("microservices", Settings(data_dir=tmp_path, port=0), out, command=fake())
    runner.start()
    try:
        assert runner.nats is not None
        nats_pid, nats_url = runner.nats.pid, runner.nats.url
        assert nats_pid is not None
        assert not pid_gone(nats_pid)
        assert (tmp_path / "nats").is_dir()
        env = get_json(f"{runner.processes[1].spec.url}/env")
        assert env["THREADLINE_NATS_URL"] == nats_url
        assert f"NATS:  {nats_url} (embedded, pid {nats_pid}" in runner.status_table()
    finally:
        runner.stop()
    assert pid_gone(nats_pid)
    text = out.getvalue()
    assert text.index("■ posts stopped") < text.index("■ NATS stopped")


def test_a_process_that_exits_while_starting_stops_everything_and_shows_its_log(
    tmp_path: Path, nats_url: str, pid_gone: Callable[[int], bool]
) -> None:
    """A child exiting before ready: StartError with its log's last lines and path; nothing left running."""
    runner = _runner(
        "microservices",
        Settings(data_dir=tmp_path, port=0, nats_url=nats_url),
        io.StringIO(),
        command=fake(posts="crash"),
    )

    with pytest.raises(StartError) as raised:
        runner.start()

    message = str(raised.value)
    assert "posts exited with code 3 before it was ready" in message
    assert str(tmp_path / "logs" / "posts.log") in message
    assert "posts: boom, cannot open the store" in message
    assert all(pid_gone(p.pid) for p in runner.processes)


def test_a_process_not_ready_by_the_deadline_stops_everything(
    tmp_path: Path, nats_url: str, pid_gone: Callable[[int], bool]
) -> None:
    """A child never ready: StartError naming it after the ready timeout; nothing left running."""
    runner = _runner(
        "microservices",
        Settings(data_dir=tmp_path, port=0, nats_url=nats_url),
        io.StringIO(),
        command=fake(users="unready"),
        ready_timeout=1.0,
    )

    with pytest.raises(StartError, match=r"users was not ready after 1s .*/readyz.*--ready-timeout"):
        runner.start()

    assert all(pid_gone(p.pid) for p in runner.processes)


def test_a_process_that_dies_while_running_is_reported_and_the_others_keep_running(
    tmp_path: Path, nats_url: str, pid_gone: Callable[[int], bool], eventually: Callable[..., None]
) -> None:
    """A child dying after start: one line saying so, its state in the table, the rest untouched."""
    out = io.StringIO()
    runner = _runner(
        "microservices", Settings(data_dir=tmp_path, port=0, nats_url=nats_url), out, command=fake()
    )
    runner.start()
    try:
        gateway, users, posts = runner.processes
        os.kill(users.pid, signal.SIGKILL)
        died: list[RunningProcess] = []
        eventually(lambda: died.extend(runner.check()) or died, what="death noticed")

        assert died == [users]
        assert f"! users (pid {users.pid}) exited with code -9; the others keep running" in out.getvalue()
        assert re.search(rf"^  users +{users.pid} .* exited \(-9\)$", runner.status_table(), re.M)
        assert not pid_gone(gateway.pid)
        assert not pid_gone(posts.pid)
    finally:
        runner.stop()


def test_a_process_ignoring_sigterm_is_killed_after_the_stop_timeout(
    tmp_path: Path, nats_url: str, pid_gone: Callable[[int], bool]
) -> None:
    """Graceful stop is bounded: SIGKILL once the stop timeout has passed."""
    out = io.StringIO()
    runner = _runner(
        "microservices",
        Settings(data_dir=tmp_path, port=0, nats_url=nats_url),
        out,
        command=fake(users="stubborn"),
        stop_timeout=0.5,
    )
    runner.start()
    users = runner.processes[1]

    runner.stop()

    assert pid_gone(users.pid)
    assert "■ users killed" in out.getvalue()
    assert "■ posts stopped" in out.getvalue()


def _start_fake_up(
    tmp_path: Path, nats_url: str, env: dict[str, str], mode: str = "ready"
) -> tuple["subprocess.Popen[bytes]", Path]:
    output = tmp_path / "out.txt"
    with output.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, str(FAKE_UP), str(tmp_path / "data"), nats_url, mode],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return proc, output


def _table_pids(text: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"^  (?:gateway|users|posts) +(\d+) +http", text, re.M)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_stops_every_process_gracefully(
    tmp_path: Path,
    nats_url: str,
    child_env: dict[str, str],
    signum: signal.Signals,
    pid_gone: Callable[[int], bool],
    eventually: Callable[..., None],
) -> None:
    """Ctrl-C (or SIGTERM) on `up`: every process is stopped, each reported, exit code 0."""
    proc, output = _start_fake_up(tmp_path, nats_url, child_env)
    try:
        eventually(lambda: "press Ctrl-C to stop" in output.read_text(), timeout=60, what="status table")
        pids = _table_pids(output.read_text())
        assert len(pids) == 3

        proc.send_signal(signum)

        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert all(pid_gone(pid) for pid in pids)
    text = output.read_text()
    assert all(f"■ {name} stopped" in text for name in ("gateway", "users", "posts"))
    assert "Traceback" not in text


def test_a_stop_signal_while_starting_stops_what_was_started(
    tmp_path: Path,
    nats_url: str,
    child_env: dict[str, str],
    pid_gone: Callable[[int], bool],
    eventually: Callable[..., None],
) -> None:
    """Ctrl-C before everything is ready: all that was spawned is stopped, exit code 130."""
    proc, output = _start_fake_up(tmp_path, nats_url, child_env, mode="unready")
    try:
        eventually(lambda: "posts starting" in output.read_text(), timeout=60, what="posts spawned")
        pids = [int(pid) for pid in re.findall(r"starting \(pid (\d+),", output.read_text())]
        assert len(pids) == 3

        proc.send_signal(signal.SIGINT)

        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert all(pid_gone(pid) for pid in pids)
    assert "interrupted while starting" in output.read_text()


def test_processes_die_with_a_runner_that_is_killed(
    tmp_path: Path,
    nats_url: str,
    child_env: dict[str, str],
    pid_gone: Callable[[int], bool],
    eventually: Callable[..., None],
) -> None:
    """SIGKILL on the runner leaves no orphan: every child dies with it."""
    proc, output = _start_fake_up(tmp_path, nats_url, child_env)
    try:
        eventually(lambda: "press Ctrl-C to stop" in output.read_text(), timeout=60, what="status table")
        pids = _table_pids(output.read_text())
        assert len(pids) == 3
    finally:
        proc.kill()
        proc.wait()

    eventually(lambda: all(pid_gone(pid) for pid in pids), what="children gone")
