"""Fixtures for runner tests: ports held busy, process liveness, polling with deadlines."""

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import threadline

SERVICES = ("users", "posts")
SRC_DIR = str(Path(threadline.__file__).resolve().parents[1])


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port with something listening on it for the duration of the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def child_env() -> dict[str, str]:
    """The environment for a Python child that must import this checkout's threadline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC_DIR, env.get("PYTHONPATH")) if p)
    return env


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _eventually(condition: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout}s")
        time.sleep(0.05)


@pytest.fixture
def pid_gone() -> Callable[[int], bool]:
    """Whether a process no longer runs (a zombie nobody reaped counts as gone)."""
    return _pid_gone


@pytest.fixture
def eventually() -> Callable[..., None]:
    """Poll a condition until it is truthy, failing the test after a timeout (15 s by default)."""
    return _eventually
