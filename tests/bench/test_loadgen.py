"""The open-loop load generator against tiny aiohttp servers on loopback ports in the test process."""

import asyncio
import json
import math
import random
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from threadline.bench.loadgen import LoadResult, MachineTimes, Request, RequestSource, run_open_loop


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on a free loopback port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()
        sock.close()


class Routes:
    """A tiny server: fast, slow, failing and echoing routes, and what it saw."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = asyncio.Event()
        self.received: list[tuple[str, bytes, str | None, str | None]] = []
        self.app = web.Application()
        self.app.router.add_get("/ok", self.ok)
        self.app.router.add_get("/slow", self.slow)
        self.app.router.add_get("/stuck", self.stuck)
        self.app.router.add_get("/fail", self.fail)
        self.app.router.add_post("/echo", self.echo)

    async def ok(self, request: web.Request) -> web.Response:
        """A trivial answer."""
        return web.json_response({"ok": True})

    async def slow(self, request: web.Request) -> web.Response:
        """An answer after 0.2 s, counting how many overlap."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.2)
        finally:
            self.in_flight -= 1
        return web.json_response({"slow": True})

    async def stuck(self, request: web.Request) -> web.Response:
        """An answer only once the test releases it."""
        await self.release.wait()
        return web.json_response({})

    async def fail(self, request: web.Request) -> web.Response:
        """A server error."""
        return web.json_response({"error": {"code": "boom", "message": "boom"}}, status=500)

    async def echo(self, request: web.Request) -> web.Response:
        """Records the body and headers it got."""
        body = await request.read()
        auth = request.headers.get("Authorization")
        self.received.append((request.method, body, request.content_type, auth))
        return web.json_response({"size": len(body)}, status=201)


def fixed(path: str, kind: str = "") -> RequestSource:
    """A request source that always sends GET `path`."""
    request = Request("GET", path, kind=kind)
    return lambda rng: request


def _lists_in(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [found for item in value.values() for found in _lists_in(item)]
    if isinstance(value, list):
        return [value]
    return []


async def test_sends_rate_times_duration_and_keeps_up_at_a_modest_rate() -> None:
    """At 200 req/s for 2 s exactly 400 requests go out, each within 50 ms of its due time."""
    routes = Routes()
    async with serving(routes.app) as url:
        result = await run_open_loop(url, fixed("/ok", "ok"), rate=200, duration_s=2)
    assert result.sent == 400
    assert result.completed == 400
    assert result.errors == result.client_errors == 0
    assert len(result.latencies_ms) == 400
    assert list(result.by_kind) == ["ok"]
    assert len(result.by_kind["ok"]) == 400
    assert result.max_send_lag_ms < 50
    assert result.generator_cpu_s > 0
    assert result.achieved_rate == 200


async def test_slow_answers_do_not_slow_the_schedule() -> None:
    """With 0.2 s answers, 100 req/s for 1 s overlap, take about 1.2 s in all, and show >= 200 ms latency."""
    routes = Routes()
    async with serving(routes.app) as url:
        started = time.monotonic()
        result = await run_open_loop(url, fixed("/slow"), rate=100, duration_s=1)
        wall = time.monotonic() - started
    assert result.sent == result.completed == 100
    assert result.percentile(50) >= 200
    assert routes.max_in_flight >= 10
    assert 1.15 <= wall < 2.0  # closed loop would take 100 x 0.2 s = 20 s
    assert 1.15 <= result.wall_s < 2.0


async def test_a_late_generator_shows_up_in_latency_and_lag() -> None:
    """A 0.3 s stall in the generator makes the requests due meanwhile late, and their latency shows it."""
    routes = Routes()
    request = Request("GET", "/ok")
    calls = 0

    def stalling(rng: random.Random) -> Request:
        nonlocal calls
        calls += 1
        if calls == 20:
            time.sleep(0.3)  # the generator itself stalls, as under a GC pause or an overloaded core
        return request

    async with serving(routes.app) as url:
        result = await run_open_loop(url, stalling, rate=100, duration_s=1)
    assert result.sent == result.completed == 100
    assert result.max_send_lag_ms >= 250
    assert result.percentile(100) >= 250
    assert result.percentile(50) < 250


async def test_server_and_client_errors_are_counted_apart() -> None:
    """A 500 counts in `errors`, a 404 in `client_errors`; neither has a latency."""
    routes = Routes()
    fail, missing = Request("GET", "/fail"), Request("GET", "/missing")
    async with serving(routes.app) as url:
        result = await run_open_loop(
            url, lambda rng: fail if rng.random() < 0.5 else missing, rate=100, duration_s=0.5, seed=4
        )
    assert result.sent == 50
    assert result.completed == 0
    assert result.errors + result.client_errors == 50
    assert result.errors > 0
    assert result.client_errors > 0
    assert result.error_reasons == {"500": result.errors, "404": result.client_errors}
    assert math.isnan(result.percentile(50))


async def test_a_closed_port_counts_every_request_as_an_error() -> None:
    """Nothing listening: every request is a transport error, and the run still ends on time."""
    result = await run_open_loop(f"http://127.0.0.1:{_free_port()}", fixed("/ok"), rate=50, duration_s=0.5)
    assert result.sent == result.errors == 25
    assert result.completed == 0
    assert result.wall_s < 2


async def test_requests_beyond_max_in_flight_are_dropped_not_queued() -> None:
    """With at most 5 outstanding and 0.2 s answers, the rest of the schedule is dropped as errors."""
    routes = Routes()
    async with serving(routes.app) as url:
        result = await run_open_loop(url, fixed("/slow"), rate=100, duration_s=0.5, max_in_flight=5)
    assert result.sent == 50
    assert result.dropped > 0
    assert result.error_reasons["dropped"] == result.dropped
    assert result.completed + result.errors == 50
    assert routes.max_in_flight <= 5
    assert result.wall_s < 1.5


async def test_unfinished_requests_time_out_as_errors() -> None:
    """Requests unanswered within `timeout_s` are errors, and the run does not wait for them longer."""
    routes = Routes()
    async with serving(routes.app) as url:
        result = await run_open_loop(url, fixed("/stuck"), rate=20, duration_s=0.5, timeout_s=0.3)
        routes.release.set()
    assert result.sent == result.errors == 10
    assert result.wall_s < 2


async def test_bodies_and_headers_are_sent() -> None:
    """A POST carries its body and headers, and is labelled by its kind."""
    routes = Routes()
    headers = {"Authorization": "Bearer t0k", "Content-Type": "application/json"}
    request = Request("POST", "/echo", body=b'{"text":"hi"}', headers=headers, kind="compose")
    async with serving(routes.app) as url:
        result = await run_open_loop(url, lambda rng: request, rate=20, duration_s=0.5)
    assert result.completed == 10
    assert set(routes.received) == {("POST", b'{"text":"hi"}', "application/json", "Bearer t0k")}
    assert len(result.by_kind["compose"]) == 10


def _result(latencies: list[float]) -> LoadResult:
    return LoadResult(
        offered_rate=10,
        duration_s=1,
        sent=len(latencies),
        completed=len(latencies),
        errors=0,
        client_errors=0,
        latencies_ms=latencies,
        by_kind={"feed": latencies},
        achieved_rate=len(latencies),
        generator_cpu_s=0.01,
        max_send_lag_ms=0.5,
        wall_s=1.0,
    )


def test_percentile_is_nearest_rank() -> None:
    """Nearest rank: the smallest value with at least p% of the values at or below it."""
    result = _result([50, 15, 40, 35, 20])
    assert [result.percentile(p) for p in (0, 5, 30, 40, 50, 100)] == [15, 15, 20, 20, 35, 50]
    hundred = _result([float(v) for v in range(100, 0, -1)])
    assert [hundred.percentile(p) for p in (1, 50, 90, 99, 99.5, 100)] == [1, 50, 90, 99, 100, 100]
    assert math.isnan(_result([]).percentile(50))


def test_to_dict_is_a_json_summary_without_raw_lists() -> None:
    """The summary is strict JSON, has the percentiles and no list of latencies, even when empty."""
    summary = _result([float(v) for v in range(1, 101)]).to_dict()
    json.dumps(summary, allow_nan=False)
    assert _lists_in(summary) == []
    assert (summary["p50_ms"], summary["p90_ms"], summary["p99_ms"], summary["max_ms"]) == (50, 90, 99, 100)
    assert summary["by_kind"]["feed"] == {"completed": 100, "p50_ms": 50, "p99_ms": 99}
    assert summary["generator_cpu_s"] == 0.01
    assert summary["max_send_lag_ms"] == 0.5
    empty = _result([]).to_dict()
    json.dumps(empty, allow_nan=False)
    assert empty["p99_ms"] is None


def test_stolen_share_is_the_hosts_share_of_the_time_between_two_readings() -> None:
    """Steal time over all CPU time between readings; unknown without steal figures or elapsed time."""
    earlier = MachineTimes(total_s=100.0, stolen_s=2.0)
    assert MachineTimes(total_s=120.0, stolen_s=7.0).stolen_share_since(earlier) == 0.25
    assert MachineTimes(total_s=120.0, stolen_s=2.0).stolen_share_since(earlier) == 0.0
    assert MachineTimes(total_s=120.0, stolen_s=None).stolen_share_since(earlier) is None
    assert MachineTimes(total_s=100.0, stolen_s=3.0).stolen_share_since(earlier) is None


def test_machine_readings_grow_with_work_and_give_a_share() -> None:
    """Real readings of this (Linux) machine: time passes, and the share lies between 0 and 1."""
    earlier = MachineTimes.now()
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        pass
    later = MachineTimes.now()
    assert later.total_s > earlier.total_s
    share = later.stolen_share_since(earlier)
    assert share is not None
    assert 0.0 <= share <= 1.0
