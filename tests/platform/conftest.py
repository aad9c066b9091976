"""NATS servers for the chassis tests: a shared one per module, or one a test owns and restarts."""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

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
