"""Data persists in the data directory between runs, and a damaged one gets a clear message."""

from pathlib import Path

import aiohttp
import pytest

from tests.e2e.client import Api
from tests.e2e.conftest import free_port, start_system
from threadline.platform.settings import Settings
from threadline.runner import StartError, prepare_data_dir, running
from threadline.topology import SERVICES, parse_topology


async def _sign_up_and_post(url: str) -> tuple[str, str]:
    async with aiohttp.ClientSession() as session:
        api = Api(url, session)
        user, token = await api.sign_up("keeper")
        post = await api.call("POST", "/api/v1/posts", json={"text": "kept"}, token=token)
        return user["handle"], post.body["id"]


async def test_data_survives_a_restart(tmp_path: Path) -> None:
    """Accounts and posts written in one run are there in the next."""
    run = start_system("monolith", tmp_path)
    system = next(run)
    handle, post_id = await _sign_up_and_post(system.url)
    run.close()
    again = start_system("monolith", tmp_path)
    system = next(again)
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(system.url, session)
            assert (await api.call("GET", f"/api/v1/users/{handle}")).status == 200
            assert (await api.call("GET", f"/api/v1/posts/{post_id}")).body["text"] == "kept"
            login = await api.call(
                "POST", "/api/v1/sessions", json={"handle": handle, "password": "a good password"}
            )
            assert login.status == 200
    finally:
        again.close()


def test_a_damaged_database_is_reported_clearly(tmp_path: Path) -> None:
    """A service database that is not a database stops the start with advice, not a traceback."""
    prepare_data_dir(tmp_path)
    (tmp_path / "users.db").write_bytes(b"this is not an SQLite database" * 100)
    settings = Settings(data_dir=tmp_path, topology="monolith", port=free_port())
    with pytest.raises(StartError) as caught, running(parse_topology("monolith", SERVICES), settings):
        pass
    message = str(caught.value)
    assert "damaged" in message
    assert "--data-dir" in message
    assert "Traceback" not in message
