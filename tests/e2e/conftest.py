"""Real Threadline processes started by the runner, driven through the gateway."""

import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.client import Api
from threadline.platform.settings import Settings
from threadline.runner import Runner, free_ports, running
from threadline.topology import SERVICES, parse_topology

TOPOLOGIES = ["microservices", "monolith"]


@dataclass
class System:
    """A running topology: its runner (processes, pids, data directory) and the gateway URL."""

    runner: Runner
    url: str

    @property
    def data_dir(self) -> Path:
        """Where the services keep their databases."""
        return self.runner.data_dir


def free_port() -> int:
    """A loopback port nobody listens on right now, chosen as the runner chooses its services' ports."""
    return free_ports("127.0.0.1", 1)[0]


def start_system(
    topology: str, data_dir: Path, nats_url: str | None = None, database_urls: dict[str, str] | None = None
) -> Iterator[System]:
    """Run `topology` until the generator is closed; a shared NATS gets a namespace of its own.

    Services not named in `database_urls` keep SQLite files in `data_dir`.
    """
    nats_url = nats_url or os.environ.get("THREADLINE_TEST_NATS_URL") or None
    settings = Settings(
        data_dir=data_dir,
        topology=topology,
        port=free_port(),
        nats_url=nats_url,
        events_namespace=f"e2e{uuid.uuid4().hex[:12]}",
        database_urls=database_urls or {},
    )
    with running(parse_topology(topology, SERVICES), settings, ready_timeout=120) as runner:
        yield System(runner, runner.gateway_url)


@pytest.fixture(scope="module", params=TOPOLOGIES)
def system(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """One running system per topology, shared by the tests of a module."""
    yield from start_system(request.param, tmp_path_factory.mktemp(request.param))


def assert_ledger_balanced(data_dir: Path) -> None:
    """Every ledger transaction in the payments database sums to zero, and so does the whole ledger."""
    with sqlite3.connect(data_dir / "payments.db") as db:
        unbalanced = db.execute(
            "SELECT transaction_id FROM ledger_entries GROUP BY transaction_id HAVING sum(amount_cents) != 0"
        ).fetchall()
        (total,) = db.execute("SELECT coalesce(sum(amount_cents), 0) FROM ledger_entries").fetchone()
    assert unbalanced == []
    assert total == 0


@pytest.fixture
async def api(system: System) -> AsyncIterator[Api]:
    """A client of the system's gateway; after each test the ledger must still balance."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield Api(system.url, session)
    assert_ledger_balanced(system.data_dir)
