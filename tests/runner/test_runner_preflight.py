"""Checks made before anything starts: the data directory and the gateway's port."""

import json
from pathlib import Path

import pytest

from threadline.runner import MARKER_FILE, RunnerError, check_port_free, prepare_data_dir


def test_a_missing_data_dir_is_created_with_its_marker_and_logs_directory(tmp_path: Path) -> None:
    """First run: the directory, `threadline.json` ({"format": 1}) and `logs/` are created."""
    data_dir = tmp_path / "a" / "b"

    assert prepare_data_dir(data_dir) == data_dir

    assert json.loads((data_dir / MARKER_FILE).read_text()) == {"format": 1}
    assert (data_dir / "logs").is_dir()


def test_an_existing_data_dir_is_reused_as_it_is(tmp_path: Path) -> None:
    """Second run: a valid data directory and its contents are kept."""
    prepare_data_dir(tmp_path)
    (tmp_path / "users.db").write_text("data")

    prepare_data_dir(tmp_path)

    assert (tmp_path / "users.db").read_text() == "data"


def test_a_relative_data_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path handed to processes is absolute, whatever their working directory."""
    monkeypatch.chdir(tmp_path)

    assert prepare_data_dir(Path("rel")) == tmp_path / "rel"


def test_a_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    """A file where the data directory should be: clear message, nothing changed."""
    path = tmp_path / "file"
    path.write_text("x")

    with pytest.raises(RunnerError, match=r"exists but is not a directory .* pass another --data-dir"):
        prepare_data_dir(path)
    assert path.read_text() == "x"


def test_a_data_dir_below_a_file_cannot_be_created(tmp_path: Path) -> None:
    """A data directory that cannot be created: says so and what to do."""
    (tmp_path / "file").write_text("x")

    with pytest.raises(RunnerError, match=r"cannot create data directory .* pass another --data-dir"):
        prepare_data_dir(tmp_path / "file" / "data")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "is not valid JSON"),
        (b"\xff\xfe", "is not valid JSON"),
        (b"[1]", "has no data format"),
        (b'{"format": 99}', "has data format 99"),
    ],
)
def test_a_corrupt_marker_is_refused(tmp_path: Path, content: bytes, problem: str) -> None:
    """An unreadable marker or an unknown data format: the directory "looks corrupt"."""
    (tmp_path / MARKER_FILE).write_bytes(content)

    with pytest.raises(RunnerError) as raised:
        prepare_data_dir(tmp_path)

    message = str(raised.value)
    assert f"data directory {tmp_path} looks corrupt" in message
    assert problem in message
    assert "move it away or pass another --data-dir" in message


def test_a_port_in_use_is_refused(busy_port: int) -> None:
    """Something listening on the gateway's port: the message names it and the way out."""
    with pytest.raises(RunnerError) as raised:
        check_port_free("127.0.0.1", busy_port)

    assert str(raised.value) == (
        f"port {busy_port} on 127.0.0.1 is in use — stop what uses it or pass --port"
    )


def test_a_free_port_passes(free_port: int) -> None:
    """Nothing listening: the check passes."""
    check_port_free("127.0.0.1", free_port)
