"""Chassis test fixtures: NATS servers (per module, or owned by a test), a client pool, a refused port."""

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from threadline.platform.http_pool import HttpSession
from threadline.platform.nats_server import EmbeddedNats


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`THREADLINE_TEST_NATS_URL` if set, else the URL of an embedded server for this module."""
    url = os.environ.get("THREADLINE_TEST_NATS_URL")
    if url:
        yield url
        return
    with EmbeddedNats(tmp_path_factory.mktemp("nats")) as server:
        yield server.url


@pytest.fixture
def embedded_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A server of the test's own, which it may stop, kill or restart."""
    with EmbeddedNats(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def namespace() -> str:
    """An events namespace no other test uses, so tests never see each other's streams."""
    return f"test{uuid.uuid4().hex}"


@pytest.fixture
async def session() -> AsyncIterator[HttpSession]:
    """A connection pool of the test's own, closed afterwards."""
    session = HttpSession()
    yield session
    await session.close()


@pytest.fixture
def unused_socket() -> Iterator[socket.socket]:
    """A loopback port bound but not listening: connecting to it is refused, and nobody else can take it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()
