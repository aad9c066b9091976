"""The seeded data set's plan, the social request mix, and seeding a real monolith."""

import json
import random
import statistics
import time
from collections import Counter
from functools import partial
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import start_system
from tests.support.polling import eventually
from threadline.bench.workload import Account, Dataset, Skewed, plan, seed, social_mix


def fake_dataset(users: int = 50, roots: int = 100) -> Dataset:
    """A data set that was never seeded anywhere."""
    accounts = [Account(handle=f"user_{i}", user_id=f"id{i}", token=f"token{i}") for i in range(users)]
    root_ids = [f"root{i}" for i in range(roots)]
    return Dataset(accounts=accounts, post_ids=[*root_ids, "reply0"], root_post_ids=root_ids)


def shares(kinds: list[str]) -> dict[str, float]:
    """Each kind's fraction of the list."""
    return {kind: count / len(kinds) for kind, count in Counter(kinds).items()}


def test_skewed_draws_favour_the_first_indexes() -> None:
    """Zipf-like: index 0 is drawn most, and the top 10% of 100 indexes get most draws."""
    rng = random.Random(1)
    counts = Counter(Skewed(100, 1.2).draw(rng) for _ in range(10_000))
    assert counts.most_common(1)[0][0] == 0
    assert sum(counts[i] for i in range(10)) > 0.6 * 10_000
    assert set(counts) <= set(range(100))


def test_plan_is_deterministic_for_a_seed() -> None:
    """The same seed and sizes plan the same data set; another seed plans another."""
    first = plan(users=50, posts=300, seed=7)
    assert plan(users=50, posts=300, seed=7) == first
    assert [first.text(i) for i in range(5)] == [plan(users=50, posts=300, seed=7).text(i) for i in range(5)]
    other = plan(users=50, posts=300, seed=8)
    assert (other.follows, other.authors) != (first.follows, first.authors)


def test_follow_graph_is_skewed() -> None:
    """Each of 1000 users follows 20 others; the most popular is followed by most, the median by few."""
    layout = plan(users=1000, posts=0, follows_per_user=20, seed=3)
    assert all(len(set(f)) == len(f) == 20 for f in layout.follows)
    assert all(i not in followees for i, followees in enumerate(layout.follows))
    followers = Counter(followee for followees in layout.follows for followee in followees)
    in_degrees = [followers[i] for i in range(1000)]
    assert in_degrees[0] > 500
    assert statistics.median(in_degrees) < 10
    assert len(set(layout.handles)) == 1000


def test_authors_are_uniform_and_replies_answer_earlier_posts() -> None:
    """Every account writes about as much; exactly `reply_ratio` of posts are replies, to earlier posts."""
    layout = plan(users=100, posts=5000, reply_ratio=0.3, seed=5)
    replies = [i for i, target in enumerate(layout.reply_to) if target >= 0]
    assert len(replies) == 1500
    assert all(0 <= layout.reply_to[i] < i for i in replies)
    written = Counter(layout.authors)
    assert set(written) == set(range(100))
    assert max(written.values()) < 2 * statistics.median(written.values())
    assert all(len(layout.text(i)) <= 500 for i in range(100))


def test_tiny_plans_cap_follows_at_the_other_accounts() -> None:
    """With 4 users each follows the 3 others; a lone user follows nobody; zero posts is allowed."""
    assert [sorted(f) for f in plan(users=4, posts=12, seed=1).follows] == [
        [1, 2, 3],
        [0, 2, 3],
        [0, 1, 3],
        [0, 1, 2],
    ]
    lone = plan(users=1, posts=3, seed=1)
    assert lone.follows == [[]]
    assert list(lone.authors) == [0, 0, 0]
    assert len(plan(users=3, posts=0).authors) == 0
    with pytest.raises(ValueError, match="users"):
        plan(users=0, posts=1)


def test_mix_is_60_30_10() -> None:
    """10,000 draws: 60% feed, 30% author posts, 10% compose, each within 2 points."""
    source = social_mix(fake_dataset())
    rng = random.Random(11)
    found = shares([source(rng).kind for _ in range(10_000)])
    assert set(found) == {"feed", "author_posts", "compose"}
    assert found["feed"] == pytest.approx(0.60, abs=0.02)
    assert found["author_posts"] == pytest.approx(0.30, abs=0.02)
    assert found["compose"] == pytest.approx(0.10, abs=0.02)


def test_thread_variant_splits_compose_into_compose_and_thread_reads() -> None:
    """With thread reads: 60% feed, 30% author posts, 5% compose, 5% thread."""
    source = social_mix(fake_dataset(), thread_reads=True)
    rng = random.Random(12)
    found = shares([source(rng).kind for _ in range(10_000)])
    assert found["feed"] == pytest.approx(0.60, abs=0.02)
    assert found["author_posts"] == pytest.approx(0.30, abs=0.02)
    assert found["compose"] == pytest.approx(0.05, abs=0.015)
    assert found["thread"] == pytest.approx(0.05, abs=0.015)


def test_mix_is_deterministic_for_a_seed() -> None:
    """The same seed draws the same requests."""
    source = social_mix(fake_dataset(), thread_reads=True)
    first, second, third = random.Random(3), random.Random(3), random.Random(4)
    assert [source(first) for _ in range(500)] == [source(second) for _ in range(500)]
    assert [source(first) for _ in range(500)] != [source(third) for _ in range(500)]


def test_mix_requests_are_well_formed_and_skewed() -> None:
    """Paths, bodies and auth headers match the API; every account acts, the most popular is read most."""
    dataset = fake_dataset()
    tokens = {f"Bearer {account.token}" for account in dataset.accounts}
    source = social_mix(dataset, thread_reads=True)
    rng = random.Random(9)
    actors: Counter[str] = Counter()
    authors_read: Counter[str] = Counter()
    for _ in range(5000):
        request = source(rng)
        assert request.headers["Authorization"] in tokens
        actors[request.headers["Authorization"]] += 1
        if request.kind == "feed":
            assert (request.method, request.path, request.body) == ("GET", "/api/v1/feed?limit=20", None)
        elif request.kind == "author_posts":
            handle = request.path.removeprefix("/api/v1/users/").removesuffix("/posts?limit=20")
            assert handle in {account.handle for account in dataset.accounts}
            authors_read[handle] += 1
            assert request.method == "GET"
        elif request.kind == "thread":
            assert request.path.removeprefix("/api/v1/threads/") in dataset.root_post_ids
        else:
            assert (request.method, request.path) == ("POST", "/api/v1/posts")
            assert request.headers["Content-Type"] == "application/json"
            assert request.body is not None
            assert 1 <= len(json.loads(request.body)["text"]) <= 500
    assert len(actors) == len(dataset.accounts)
    assert max(actors.values()) < 2 * min(actors.values())
    assert authors_read.most_common(1)[0][0] == dataset.accounts[0].handle


def test_thread_reads_need_root_posts() -> None:
    """A data set without posts cannot offer thread reads."""
    with pytest.raises(ValueError, match="root post"):
        social_mix(fake_dataset(roots=0), thread_reads=True)


async def assert_feed(session: aiohttp.ClientSession, api: str, token: str, expected: set[str]) -> None:
    """The home feed of `token`'s account holds exactly the `expected` post ids."""
    async with session.get(f"{api}/feed?limit=100", headers={"Authorization": f"Bearer {token}"}) as feed:
        assert feed.status == 200
        assert {post["id"] for post in (await feed.json())["items"]} == expected


@pytest.mark.e2e
async def test_seed_creates_the_data_set_through_a_real_monolith(tmp_path: Path) -> None:
    """Seeding 6 users and 20 posts: the API then shows those accounts, posts, replies and feeds."""
    system_run = start_system("monolith", tmp_path)
    system = next(system_run)
    try:
        lines: list[str] = []
        dataset = await seed(system.url, users=6, posts=20, follows_per_user=3, seed=2, progress=lines.append)
        assert dataset.to_dict() == {
            "users": 6,
            "posts": 20,
            "root_posts": 14,
            "replies": 6,
            "follows": 18,
            "zipf_s": 1.2,
        }
        assert any(line.startswith("seeding posts 20/20 (100%)") for line in lines)
        api = system.url + "/api/v1"
        async with aiohttp.ClientSession() as session:
            shown: dict[str, dict[str, object]] = {}
            for account in dataset.accounts:
                auth = {"Authorization": f"Bearer {account.token}"}
                async with session.get(f"{api}/me", headers=auth) as me:
                    assert (me.status, (await me.json())["id"]) == (200, account.user_id)
                async with session.get(f"{api}/users/{account.handle}/posts?limit=100") as page:
                    shown.update({post["id"]: post for post in (await page.json())["items"]})
                async with session.get(f"{api}/users/{account.handle}/following") as following:
                    assert len((await following.json())["items"]) == 3
            assert set(shown) == set(dataset.post_ids)
            assert {i for i, post in shown.items() if post["reply_to"] is None} == set(dataset.root_post_ids)
            layout = plan(users=6, posts=20, follows_per_user=3, seed=2)
            for reader, account in enumerate(dataset.accounts):
                visible = {reader, *layout.follows[reader]}
                expected = {dataset.post_ids[i] for i, by in enumerate(layout.authors) if by in visible}
                await eventually(partial(assert_feed, session, api, account.token, expected), within=10)
        again = await seed(system.url, users=6, posts=0, follows_per_user=3, seed=2, progress=lines.append)
        assert [a.user_id for a in again.accounts] == [a.user_id for a in dataset.accounts]
    finally:
        next(system_run, None)  # runs start_system past its yield, which stops the system


def test_a_dataset_knows_when_its_tokens_run_out() -> None:
    """Without a known expiry nothing is due; otherwise due once it falls within the time asked about."""
    data = fake_dataset()
    assert not data.tokens_expire_within(3600)
    data.tokens_expire_at = time.monotonic() + 60
    assert data.tokens_expire_within(61)
    assert not data.tokens_expire_within(30)
