"""Fixtures for every test: the PostgreSQL server, and settings that put services on either database."""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.postgres import DatabasePool, postgres_server
from threadline.platform.settings import Settings
from threadline.topology import SERVICES


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabasePool]:
    """Empty databases on a PostgreSQL server for the whole run (see `tests.support.postgres`)."""
    with postgres_server(tmp_path_factory.mktemp("postgres")) as url:
        yield DatabasePool(url)


@pytest.fixture
async def postgres_database(postgres: DatabasePool) -> AsyncIterator[str]:
    """An empty database of the test's own, as a SQLAlchemy asyncpg URL."""
    async with postgres.databases(1) as (url,):
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def monolith_settings(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Settings]:
    """Monolith settings with every service on a fresh database: SQLite files, or PostgreSQL databases."""
    if request.param == "sqlite":
        yield Settings(data_dir=tmp_path, topology="monolith")
        return
    pool: DatabasePool = request.getfixturevalue("postgres")
    async with pool.databases(len(SERVICES)) as urls:
        yield Settings(
            data_dir=tmp_path, topology="monolith", database_urls=dict(zip(SERVICES, urls, strict=True))
        )


@pytest.fixture(params=["fake", "sqlite", "postgresql"])
def store_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """None for a store's in-memory fake; else the URL of a fresh SQLite file or PostgreSQL database."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_database")
        return url
    return None if request.param == "fake" else f"sqlite:///{tmp_path / 'store.db'}"
