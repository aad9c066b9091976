"""`threadline up` and `threadline serve`: mistakes the user can fix give one message and exit 2."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from threadline import cli
from threadline.runner import MARKER_FILE


def _up(tmp_path: Path, *args: str) -> list[str]:
    return ["up", "--data-dir", str(tmp_path / "data"), *args]


def test_an_unknown_topology_component_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--topology users+bogus`: names the unknown component and the known ones; exit 2."""
    code = cli.main(_up(tmp_path, "--topology", "users+bogus"))

    err = capsys.readouterr().err
    assert code == 2
    assert "unknown component 'bogus'" in err
    assert "known: gateway, users, posts" in err
    assert "Traceback" not in err
    assert not (tmp_path / "data").exists()


def test_a_gateway_port_in_use_is_refused(
    tmp_path: Path, busy_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--port N` with N taken: one clear message, exit 2, nothing started."""
    code = cli.main(_up(tmp_path, "--topology", "monolith", "--port", str(busy_port)))

    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == (
        f"threadline: port {busy_port} on 127.0.0.1 is in use — stop what uses it or pass --port\n"
    )
    assert "Starting" not in captured.out


def test_a_data_dir_that_is_a_file_is_refused(
    tmp_path: Path, free_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--data-dir` naming a file: one clear message, exit 2."""
    path = tmp_path / "file"
    path.write_text("x")

    code = cli.main(["up", "--data-dir", str(path), "--port", str(free_port)])

    err = capsys.readouterr().err
    assert code == 2
    assert f"data directory {path} exists but is not a directory" in err
    assert "Traceback" not in err


def test_a_corrupt_data_dir_is_refused(
    tmp_path: Path, free_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """A data directory whose marker is not valid JSON "looks corrupt": exit 2, left as it was."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / MARKER_FILE).write_text("{garbage")

    code = cli.main(_up(tmp_path, "--port", str(free_port)))

    err = capsys.readouterr().err
    assert code == 2
    assert f"data directory {data_dir} looks corrupt" in err
    assert "move it away or pass another --data-dir" in err
    assert (data_dir / MARKER_FILE).read_text() == "{garbage"


def test_an_invalid_environment_setting_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed THREADLINE_* variable: names the variable, exit 2."""
    monkeypatch.setenv("THREADLINE_PORT", "eighty")

    code = cli.main(["up", "--data-dir", str(tmp_path)])

    err = capsys.readouterr().err
    assert code == 2
    assert "invalid setting port (THREADLINE_PORT or --port)" in err


def test_a_malformed_json_setting_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """THREADLINE_SERVICE_URLS that is not JSON: names the field, exit 2."""
    monkeypatch.setenv("THREADLINE_SERVICE_URLS", "{not json")

    code = cli.main(["up", "--data-dir", str(tmp_path)])

    err = capsys.readouterr().err
    assert code == 2
    assert "service_urls" in err


def test_an_unreachable_nats_url_is_refused(
    tmp_path: Path, free_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--nats-url` where nothing listens: says so and how to use the embedded one, exit 2."""
    code = cli.main(_up(tmp_path, "--port", "0", "--nats-url", f"nats://127.0.0.1:{free_port}"))

    err = capsys.readouterr().err
    assert code == 2
    assert f"NATS at nats://127.0.0.1:{free_port} does not accept connections" in err


@pytest.mark.parametrize("group", ["users+bogus", "users,posts", "monolith"])
def test_serve_refuses_what_is_not_one_process_group(group: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`serve` takes one group of known components, e.g. users+posts; anything else exits 2."""
    code = cli.main(["serve", group])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("threadline: ")
    assert "Traceback" not in err


def test_a_port_out_of_range_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """`--port 70000`: argparse's usage error, exit 2."""
    with pytest.raises(SystemExit) as raised:
        cli.main(["up", "--port", "70000"])

    assert raised.value.code == 2
    assert "is not a port number" in capsys.readouterr().err


def test_python_m_threadline_reports_errors_without_a_traceback(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    """`python -m threadline up --topology nonsense` in a real process: exit 2, message, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "threadline", *_up(tmp_path, "--topology", "nonsense")],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=60,
    )

    assert result.returncode == 2
    assert "unknown component 'nonsense'" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_the_marker_written_on_first_run_says_format_1(tmp_path: Path, busy_port: int) -> None:
    """A run that gets past the data directory leaves `threadline.json` = {"format": 1}."""
    cli.main(_up(tmp_path, "--port", str(busy_port)))

    assert json.loads((tmp_path / "data" / MARKER_FILE).read_text()) == {"format": 1}


def test_up_gives_each_process_the_ready_timeout_it_is_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--ready-timeout 300` reaches the runner (a large migration may need minutes); 60 s by default."""
    timeouts: list[float] = []

    def recording_runner(*args: Any, ready_timeout: float, **options: Any) -> object:
        timeouts.append(ready_timeout)
        return object()

    monkeypatch.setattr(cli, "Runner", recording_runner)
    monkeypatch.setattr(cli, "run", lambda runner: 0)

    assert cli.main(["up", "--data-dir", str(tmp_path), "--ready-timeout", "300"]) == 0
    assert cli.main(["up", "--data-dir", str(tmp_path)]) == 0
    assert timeouts == [300, 60]


def test_a_ready_timeout_that_is_not_positive_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """`--ready-timeout 0`: argparse's usage error, exit 2."""
    with pytest.raises(SystemExit) as raised:
        cli.main(["up", "--ready-timeout", "0"])

    assert raised.value.code == 2
    assert "is not a positive whole number" in capsys.readouterr().err
