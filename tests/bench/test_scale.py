"""The scale phase: bulk-loaded posts land where the services would put them; both sizes read side by side."""

import asyncio
import json
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from fastapi import FastAPI, Request

from tests.e2e.conftest import start_system
from tests.support.servers import serving
from threadline.bench.loadgen import Request as LoadRequest
from threadline.bench.scale import (
    SystemCopy,
    alternate_reads,
    bulk_load,
    copy_databases,
    measure_at_scale,
    started_like,
)
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


def feed_app(name: str, seen: list[tuple[str, str]]) -> FastAPI:
    """A feed route that notes (server, query) and answers a page naming the server and the visit."""
    app = FastAPI()

    @app.get("/api/v1/feed")
    async def feed(request: Request) -> dict[str, list[dict[str, str]]]:
        seen.append((name, request.url.query))
        visit = seen.count((name, request.url.query))
        return {"items": [{"id": f"{name}-{request.url.query}-visit-{visit}"}]}

    return app


async def test_reads_alternate_between_the_sizes_in_blocks_after_a_pass_over_each() -> None:
    """Each system first gets every read once, untimed; then blocks go to both, which goes first swapping."""
    seen: list[tuple[str, str]] = []
    requests = [LoadRequest("GET", f"/api/v1/feed?n={n}") for n in range(5)]
    me = {"test": psutil.Process()}
    async with serving(feed_app("small", seen)) as small, serving(feed_app("large", seen)) as large:
        reads = await alternate_reads((SystemCopy(small, me), SystemCopy(large, me)), requests, block_calls=2)

    queries = [f"n={n}" for n in range(5)]
    passes = [("small", q) for q in queries] + [("large", q) for q in queries]
    blocks = [("small", queries[0:2]), ("large", queries[0:2])]
    blocks += [("large", queries[2:4]), ("small", queries[2:4])]
    blocks += [("small", queries[4:]), ("large", queries[4:])]
    assert seen == passes + [(name, q) for name, block in blocks for q in block]
    for name, found in zip(("small", "large"), reads, strict=True):
        assert found.first_pages == [[f"{name}-{q}-visit-2"] for q in queries]
        assert found.errors == 0
        assert len(found.latencies_ms) == len(requests)
        assert found.cpu_s > 0
        assert found.to_dict()["cpu_ms_per_call"] == round(1000 * found.cpu_s / len(requests), 4)


@pytest.mark.e2e
async def test_bulk_load_fans_out_like_the_services_and_keeps_seeded_posts_on_top(tmp_path: Path) -> None:
    """Loading a copy to 300 posts: each bulk post gets its row, thread node, copy and timeline entries."""
    system_run = start_system("monolith", tmp_path / "system")
    system = next(system_run)
    try:
        dataset = await seed(
            system.url, users=6, posts=SEEDED_POSTS, follows_per_user=3, seed=4, progress=print
        )
        settings = system.runner.settings
        before = await first_pages(system.url, dataset)
        copy = tmp_path / "copy"
        copy_databases(settings, copy)
        lines: list[str] = []
        outcome = bulk_load(
            {service: copy / f"{service}.db" for service in ("posts", "feed", "threads")},
            dataset,
            TARGET_POSTS,
            progress=lines.append,
        )
        assert outcome.posts == TARGET_POSTS - SEEDED_POSTS
        assert any(line.startswith("    scale: 270/270 posts (100%)") for line in lines)
        assert rows(tmp_path / "system" / "posts.db", "SELECT count(*) FROM posts") == [(SEEDED_POSTS,)]

        authors = dict(rows(copy / "posts.db", "SELECT id, author_id FROM posts"))
        assert len(authors) == TARGET_POSTS
        bulk = set(authors) - set(dataset.post_ids)
        assert len(bulk) == TARGET_POSTS - SEEDED_POSTS
        assert max(bulk) < min(dataset.post_ids)  # all dated before the seeded posts
        followers: dict[str, set[str]] = defaultdict(set)
        for follower, followee in rows(
            copy / "feed.db", "SELECT follower_id, followee_id FROM follows WHERE following"
        ):
            followers[followee].add(follower)
        expected = {(owner, post) for post in bulk for owner in {authors[post], *followers[authors[post]]}}
        entries = set(rows(copy / "feed.db", "SELECT owner_id, post_id FROM timeline_entries"))
        assert {(owner, post) for owner, post in entries if post in bulk} == expected
        assert len({owner for owner, _ in expected}) > 1
        copies = rows(copy / "feed.db", "SELECT id, author_id FROM post_copies")
        assert {post: author for post, author in copies if post in bulk} == {
            post: authors[post] for post in bulk
        }
        nodes = rows(copy / "threads.db", "SELECT id, parent_id, root_id FROM thread_nodes")
        assert {node for node in nodes if node[0] in bulk} == {(post, None, post) for post in bulk}

        with started_like(settings)(copy) as grown:
            after = await first_pages(grown.url, dataset)
        seeded = set(dataset.post_ids)
        for reader, page in after.items():
            assert page[: len(before[reader])] == before[reader]
            assert all(post in bulk for post in page[len(before[reader]) :])
            assert len(page) == 20
        assert any(post in seeded for page in after.values() for post in page)
    finally:
        next(system_run, None)  # runs start_system past its yield, which stops the system


@pytest.mark.e2e
async def test_the_phase_reads_two_copies_and_leaves_the_system_as_it_was(tmp_path: Path) -> None:
    """Skipped when the disk is short; otherwise both sizes are read, and the copies are gone at the end."""
    system_run = start_system("monolith", tmp_path)
    system = next(system_run)
    try:
        dataset = await seed(
            system.url, users=6, posts=SEEDED_POSTS, follows_per_user=3, seed=4, progress=print
        )
        settings = system.runner.settings

        def measure(**options: Any) -> Any:
            return asyncio.to_thread(
                measure_at_scale,
                settings,
                dataset,
                target_posts=TARGET_POSTS,
                calls=CALLS,
                block_calls=7,
                **options,
            )

        skipped = await measure(disk_reserve_bytes=2**62)
        assert skipped.skipped is not None
        assert "GiB" in skipped.skipped
        assert skipped.to_dict()["met"] is None
        assert skipped.load is None
        assert skipped.reads_base is None

        lines: list[str] = []
        report = await measure(progress=lines.append)

        assert rows(tmp_path / "posts.db", "SELECT count(*) FROM posts") == [(SEEDED_POSTS,)]
        assert not (tmp_path / "scale").exists()
        result = json.loads(json.dumps(report.to_dict()))
        assert result["base_posts"] == SEEDED_POSTS
        assert result["scaled_posts"] == TARGET_POSTS
        assert result["bulk_posts"] == TARGET_POSTS - SEEDED_POSTS
        assert result["timeline_rows"] > result["timeline_rows_base"]
        for size in ("feed_ms_base", "feed_ms_scaled"):
            assert result[size]["calls"] == CALLS
            assert result[size]["errors"] == 0
            assert result[size]["cpu_ms_per_call"] > 0
        assert result["feed_untimed_pass_calls"] == CALLS
        assert result["block_calls"] == 7
        assert result["first_pages_unchanged"] == CALLS
        assert result["ratio"] == pytest.approx(
            result["feed_p50_ms_scaled"] / result["feed_p50_ms_base"], rel=0.01
        )
        assert result["target_ratio"] == 1.2
        assert result["met"] is (result["ratio"] <= 1.2)
        assert result["skipped"] is None
        assert result["stopped"] is None
        assert set(result["db_mb"]) == {"posts", "feed", "threads", "total"}
        assert any("alternated in blocks of 7" in line for line in lines)
    finally:
        next(system_run, None)


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
    out = capsys.readouterr().out
    assert "feed at scale: p50" in out
    assert f"alternated in blocks of {CALLS}" in out  # a block is never longer than the reads
    assert scale["block_calls"] == CALLS
