"""The core scenario of the foundation, through the gateway, in every topology and on PostgreSQL too."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.client import Api
from tests.e2e.conftest import TOPOLOGIES, System, start_system
from tests.support.polling import eventually
from tests.support.postgres import DatabasePool
from threadline.topology import SERVICES

ON_POSTGRESQL = "microservices-on-postgresql"


@pytest.fixture(scope="module", params=[*TOPOLOGIES, ON_POSTGRESQL])
def system(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """Each topology on SQLite, and the microservices with every service but payments on PostgreSQL
    (payments keeps its SQLite file, whose ledger every test checks afterwards)."""
    data_dir = tmp_path_factory.mktemp(request.param)
    if request.param != ON_POSTGRESQL:
        yield from start_system(request.param, data_dir)
        return
    pool: DatabasePool = request.getfixturevalue("postgres")
    on_postgresql = [service for service in SERVICES if service != "payments"]
    with pool.databases_outside_a_loop(len(on_postgresql)) as urls:
        yield from start_system(
            "microservices", data_dir, database_urls=dict(zip(on_postgresql, urls, strict=True))
        )


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


async def test_each_component_runs_where_the_topology_says(system: System, api: Api) -> None:
    """Microservices: one OS process per component, named on its command line; monolith: one."""
    processes = system.runner.processes
    assert all(process.alive for process in processes)
    if system.runner.topology.name == "monolith":
        assert len(processes) == 1
    else:
        names = {process.spec.name for process in processes}
        assert names == {"gateway", *SERVICES}
        assert len({process.pid for process in processes}) == len(processes)
    for process in processes:
        assert f"serve {process.spec.name}" in _cmdline(process.pid)
    status = await api.call("GET", "/api/v1/status")
    assert status.status == 200
    assert status.body["topology"] == system.runner.topology.name
    assert status.body["services"] == {name: {"status": "up", "replicas": 1} for name in SERVICES}


async def test_each_service_keeps_its_data_where_its_settings_say(system: System, api: Api) -> None:
    """A service given a database URL has no SQLite file; the others have theirs, written to."""
    await api.sign_up("keeper")
    configured = system.runner.settings.database_urls
    for service in SERVICES:
        assert (system.data_dir / f"{service}.db").exists() is (service not in configured), service


async def test_health_and_readiness(system: System, api: Api) -> None:
    """The gateway answers /healthz and /readyz."""
    assert (await api.call("GET", "/healthz")).status == 200
    assert (await api.call("GET", "/readyz")).status == 200


async def test_social_scenario(api: Api) -> None:
    """Two users: follow, post, reply, like, rename (seen on old posts), delete."""
    alice, alice_token = await api.sign_up("alice", "Alice")
    bob, bob_token = await api.sign_up("bob")
    assert bob["display_name"] == bob["handle"]

    me = await api.call("GET", "/api/v1/me", token=alice_token)
    assert (me.status, me.body["id"]) == (200, alice["id"])

    follow = await api.call("PUT", f"/api/v1/me/following/{alice['handle']}", token=bob_token)
    assert follow.status == 204
    followers = await api.call("GET", f"/api/v1/users/{alice['handle']}/followers")
    assert [u["handle"] for u in followers.body["items"]] == [bob["handle"]]
    profile = await api.call("GET", f"/api/v1/users/{alice['handle']}")
    assert profile.body["followers_count"] == 1
    following = await api.call("GET", f"/api/v1/users/{bob['handle']}/following")
    assert [u["handle"] for u in following.body["items"]] == [alice["handle"]]

    post = await api.call("POST", "/api/v1/posts", json={"text": "hello world"}, token=alice_token)
    assert post.status == 201
    assert post.body["author"] == {"id": alice["id"], "handle": alice["handle"], "display_name": "Alice"}
    reply = await api.call(
        "POST", "/api/v1/posts", json={"text": "hi!", "reply_to": post.body["id"]}, token=bob_token
    )
    assert reply.status == 201
    assert (reply.body["reply_to"], reply.body["root_id"]) == (post.body["id"], post.body["root_id"])

    like = await api.call("PUT", f"/api/v1/posts/{post.body['id']}/like", token=bob_token)
    assert like.status == 204
    seen_by_bob = await api.call("GET", f"/api/v1/posts/{post.body['id']}", token=bob_token)
    assert seen_by_bob.body["like_count"] == 1
    assert seen_by_bob.body["liked_by_me"] is True
    assert seen_by_bob.body["reply_count"] == 1
    anonymous = await api.call("GET", f"/api/v1/posts/{post.body['id']}")
    assert anonymous.body["liked_by_me"] is False
    unlike = await api.call("DELETE", f"/api/v1/posts/{post.body['id']}/like", token=bob_token)
    assert unlike.status == 204
    unliked = await api.call("GET", f"/api/v1/posts/{post.body['id']}", token=bob_token)
    assert (unliked.body["like_count"], unliked.body["liked_by_me"]) == (0, False)
    assert (await api.call("PUT", f"/api/v1/posts/{post.body['id']}/like", token=bob_token)).status == 204

    renamed = await api.call("PATCH", "/api/v1/me", json={"display_name": "Alice A."}, token=alice_token)
    assert (renamed.status, renamed.body["display_name"]) == (200, "Alice A.")

    async def old_post_shows_new_name() -> None:
        page = await api.call("GET", f"/api/v1/users/{alice['handle']}/posts")
        assert [p["author"]["display_name"] for p in page.body["items"]] == ["Alice A."]

    await eventually(old_post_shows_new_name)

    forbidden = await api.call("DELETE", f"/api/v1/posts/{post.body['id']}", token=bob_token)
    assert (forbidden.status, forbidden.error_code) == (403, "not_author")
    deleted = await api.call("DELETE", f"/api/v1/posts/{reply.body['id']}", token=bob_token)
    assert deleted.status == 204
    gone = await api.call("GET", f"/api/v1/posts/{reply.body['id']}")
    assert gone.status == 404
    after = await api.call("GET", f"/api/v1/posts/{post.body['id']}")
    assert after.body["reply_count"] == 0
    unfollow = await api.call("DELETE", f"/api/v1/me/following/{alice['handle']}", token=bob_token)
    assert unfollow.status == 204
    assert (await api.call("GET", f"/api/v1/users/{alice['handle']}")).body["followers_count"] == 0


async def test_author_posts_page_by_cursor(api: Api) -> None:
    """An author's posts page newest first with a cursor that chains to the end."""
    author, token = await api.sign_up("pager")
    texts = [f"post {i}" for i in range(5)]
    for text in texts:
        assert (await api.call("POST", "/api/v1/posts", json={"text": text}, token=token)).status == 201
    seen: list[str] = []
    path = f"/api/v1/users/{author['handle']}/posts?limit=2"
    while True:
        page = await api.call("GET", path)
        seen += [post["text"] for post in page.body["items"]]
        if page.body["next_cursor"] is None:
            break
        path = f"/api/v1/users/{author['handle']}/posts?limit=2&cursor={page.body['next_cursor']}"
    assert seen == list(reversed(texts))
