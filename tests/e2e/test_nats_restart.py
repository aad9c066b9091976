"""Events survive a restart of NATS in the middle of the scenario: nothing lost, nothing applied twice."""

import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import nats
import pytest

from tests.e2e.client import Api
from tests.e2e.conftest import System, start_system
from tests.support.polling import eventually
from threadline.platform.nats_bus import NatsBus
from threadline.platform.nats_server import EmbeddedNats


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """A NATS server this module owns, so it may stop and restart it."""
    with EmbeddedNats(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="module")
def restartable(nats_server: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """The microservices topology on the module's NATS server."""
    yield from start_system("microservices", tmp_path_factory.mktemp("restart"), nats_server.url)


@pytest.fixture
async def api(restartable: System) -> AsyncIterator[Api]:
    """A client of the gateway."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield Api(restartable.url, session)


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


async def _stream_messages(url: str, stream: str) -> int:
    client = await nats.connect(url)
    try:
        info = await client.jetstream().stream_info(stream)
        return int(info.state.messages)
    finally:
        await client.close()


async def test_events_survive_a_nats_restart(
    restartable: System, nats_server: EmbeddedNats, api: Api
) -> None:
    """Events written while NATS is down are published after it returns, each handled exactly once."""
    users_db = restartable.data_dir / "users.db"
    posts_db = restartable.data_dir / "posts.db"
    alice, token = await api.sign_up("alice", "Alice")
    post = await api.call("POST", "/api/v1/posts", json={"text": "before the outage"}, token=token)
    assert post.status == 201

    nats_server.stop()
    renamed = await api.call("PATCH", "/api/v1/me", json={"display_name": "Alice (offline)"}, token=token)
    assert renamed.status == 200
    bob, _ = await api.sign_up("bob", "Bob")
    unsent = _rows(users_db, "SELECT type FROM outbox WHERE sent_at IS NULL ORDER BY seq")
    assert ("user.updated",) in unsent
    assert ("user.registered",) in unsent

    nats_server.start()

    async def renamed_on_old_post() -> None:
        seen = await api.call("GET", f"/api/v1/posts/{post.body['id']}")
        assert seen.body["author"]["display_name"] == "Alice (offline)"

    await eventually(renamed_on_old_post, within=60)

    async def outboxes_drained() -> None:
        for db in (users_db, posts_db):
            assert _rows(db, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == [(0,)]

    await eventually(outboxes_drained, within=60)

    published = sum(int(_rows(db, "SELECT count(*) FROM outbox")[0][0]) for db in (users_db, posts_db))
    stream = NatsBus(nats_server.url, restartable.runner.settings.events_namespace).stream
    assert await _stream_messages(nats_server.url, stream) == published

    profile_events = {
        str(event_id)
        for (event_id,) in _rows(
            users_db, "SELECT event_id FROM outbox WHERE type IN ('user.registered', 'user.updated')"
        )
    }

    async def each_handled_once() -> None:
        handled = [str(e) for (e,) in _rows(posts_db, "SELECT event_id FROM processed_events")]
        assert sorted(handled) == sorted(profile_events)

    await eventually(each_handled_once, within=60)
    assert bob["display_name"] == "Bob"
    assert alice["id"] != bob["id"]
