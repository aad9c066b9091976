"""The scale phase: bulk-loaded posts land where the services would put them; feed reads still work."""

import json
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fastapi import FastAPI, Request

from tests.e2e.conftest import start_system
from tests.support.servers import serving
from threadline.bench.loadgen import Request as LoadRequest
from threadline.bench.scale import measure_at_scale, warm_then_read_feeds
from threadline.bench.workload import Dataset, seed
from threadline.cli import main

SEEDED_POSTS = 30
TARGET_POSTS = 300
CALLS = 20


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """Every row of one query against a service's database."""
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


async def first_pages(url: str, dataset: Dataset) -> dict[str, list[str]]:
    """Each account's first page of its home feed (20 posts); asserts every read answered 200."""
    pages = {}
    async with aiohttp.ClientSession() as session:
        for account in dataset.accounts:
            headers = {"Authorization": f"Bearer {account.token}"}
            async with session.get(f"{url}/api/v1/feed?limit=20", headers=headers) as answer:
                assert answer.status == 200
                pages[account.user_id] = [post["id"] for post in (await answer.json())["items"]]
    return pages


async def test_each_series_of_reads_is_timed_on_its_second_pass_over_the_same_requests() -> None:
    """Both sizes are read with what a pass over the same reads left cached; the first pass is not timed."""
    seen: list[tuple[str, str]] = []
    app = FastAPI()

    @app.get("/api/v1/feed")
    async def feed(request: Request) -> dict[str, list[dict[str, str]]]:
        reader = request.headers["authorization"]
        seen.append((request.url.query, reader))
        visit = seen.count((request.url.query, reader))
        return {"items": [{"id": f"{reader}-visit-{visit}"}]}

    readers = ["Bearer a", "Bearer b", "Bearer a", "Bearer c"]
    requests = [
        LoadRequest("GET", f"/api/v1/feed?n={n}", headers={"Authorization": reader})
        for n, reader in enumerate(readers)
    ]
    async with serving(app) as url:
        reads = await warm_then_read_feeds(url, requests)

    sent = [(f"n={n}", reader) for n, reader in enumerate(readers)]
    assert seen == sent + sent
    assert reads.calls == len(requests)
    assert reads.errors == 0
    assert reads.first_pages == [[f"{reader}-visit-2"] for reader in readers]
    assert len(reads.latencies_ms) == len(requests)


@pytest.mark.e2e
async def test_bulk_load_fans_out_like_the_services_and_keeps_seeded_posts_on_top(tmp_path: Path) -> None:
    """Loading to 300 posts: each bulk post gets its row, thread node, copy and timeline entries."""
    system_run = start_system("monolith", tmp_path)
    system = next(system_run)
    try:
        lines: list[str] = []
        dataset = await seed(
            system.url, users=6, posts=SEEDED_POSTS, follows_per_user=3, seed=4, progress=lines.append
        )
        settings = system.runner.settings
        skipped = await measure_at_scale(
            system.url, settings, dataset, target_posts=TARGET_POSTS, calls=CALLS, disk_reserve_bytes=2**62
        )
        assert skipped.skipped is not None
        assert "GiB" in skipped.skipped
        assert skipped.to_dict()["met"] is None
        assert skipped.load is None
        assert rows(tmp_path / "posts.db", "SELECT count(*) FROM posts") == [(SEEDED_POSTS,)]
        before = await first_pages(system.url, dataset)

        report = await measure_at_scale(
            system.url, settings, dataset, target_posts=TARGET_POSTS, calls=CALLS, progress=lines.append
        )

        authors = dict(rows(tmp_path / "posts.db", "SELECT id, author_id FROM posts"))
        assert len(authors) == TARGET_POSTS
        bulk = set(authors) - set(dataset.post_ids)
        assert len(bulk) == TARGET_POSTS - SEEDED_POSTS
        assert max(bulk) < min(dataset.post_ids)  # all dated before the seeded posts
        followers: dict[str, set[str]] = defaultdict(set)
        for follower, followee in rows(
            tmp_path / "feed.db", "SELECT follower_id, followee_id FROM follows WHERE following"
        ):
            followers[followee].add(follower)
        expected = {(owner, post) for post in bulk for owner in {authors[post], *followers[authors[post]]}}
        entries = set(rows(tmp_path / "feed.db", "SELECT owner_id, post_id FROM timeline_entries"))
        assert {(owner, post) for owner, post in entries if post in bulk} == expected
        assert len({owner for owner, _ in expected}) > 1
        copies = rows(tmp_path / "feed.db", "SELECT id, author_id FROM post_copies")
        assert {post: author for post, author in copies if post in bulk} == {
            post: authors[post] for post in bulk
        }
        nodes = rows(tmp_path / "threads.db", "SELECT id, parent_id, root_id FROM thread_nodes")
        assert {node for node in nodes if node[0] in bulk} == {(post, None, post) for post in bulk}

        after = await first_pages(system.url, dataset)
        seeded = set(dataset.post_ids)
        for reader, page in after.items():
            assert page[: len(before[reader])] == before[reader]
            assert all(post in bulk for post in page[len(before[reader]) :])
            assert len(page) == 20
        assert any(post in seeded for page in after.values() for post in page)

        result = json.loads(json.dumps(report.to_dict()))
        assert result["base_posts"] == SEEDED_POSTS
        assert result["scaled_posts"] == TARGET_POSTS
        assert result["bulk_posts"] == TARGET_POSTS - SEEDED_POSTS
        assert result["timeline_rows"] == result["timeline_rows_base"] + len(expected)
        assert result["feed_ms_base"]["calls"] == result["feed_ms_scaled"]["calls"] == CALLS
        assert result["feed_untimed_pass_calls"] == CALLS
        assert result["feed_ms_base"]["errors"] == result["feed_ms_scaled"]["errors"] == 0
        assert result["first_pages_unchanged"] == CALLS
        assert result["ratio"] > 0
        assert result["target_ratio"] == 1.2
        assert result["met"] in (True, False)
        assert result["skipped"] is None
        assert result["stopped"] is None
        assert set(result["db_mb"]) == {"posts", "feed", "threads", "total"}
        assert any(line.startswith("    scale: 270/270 posts (100%)") for line in lines)
    finally:
        next(system_run, None)  # runs start_system past its yield, which stops the system


def test_bench_reports_the_scale_phase(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`threadline bench --scale-posts 300` puts a scale section into the JSON and a line into the table."""
    code = main(
        [
            "bench",
            "--users", "4",
            "--posts", "12",
            "--rates", "5",
            "--duration", "1",
            "--warmup", "0.5",
            "--p99-bound", "5000",
            "--topologies", "monolith",
            "--micro-calls", "0",
            "--op-calls", "0",
            "--scale-posts", str(TARGET_POSTS),
            "--scale-calls", str(CALLS),
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads((tmp_path / "latest.json").read_text())
    assert result["config"]["scale_posts"] == TARGET_POSTS
    (topology,) = result["topologies"]
    scale = topology["scale"]
    assert scale["base_posts"] >= 12
    assert scale["scaled_posts"] == TARGET_POSTS
    assert scale["timeline_rows"] > scale["timeline_rows_base"] > 0
    assert scale["feed_p50_ms_base"] > 0
    assert scale["feed_p50_ms_scaled"] > 0
    assert scale["ratio"] == pytest.approx(scale["feed_p50_ms_scaled"] / scale["feed_p50_ms_base"], rel=0.01)
    assert scale["met"] is (scale["ratio"] <= 1.2)
    assert scale["first_pages_unchanged"] == CALLS
    assert set(topology["phase_s"]) == {"seed", "rates", "scale"}
    assert "feed at scale: p50" in capsys.readouterr().out
