"""The composition root: builds one process of a topology, choosing every adapter.

A dependency on a service in the same process gets that service's application object (the
local adapter); one in another process gets its HTTP client. Events stay in the process when
the whole topology is one process, and go through NATS JetStream otherwise. Nothing else in
Threadline reads the topology.
"""

import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import uvicorn
import uvloop
from fastapi import APIRouter, FastAPI
from sqlalchemy.exc import DatabaseError
from starlette.middleware import Middleware

from threadline.gateway.routes import AccountIds, ServiceState, forwards
from threadline.gateway.routes import build_router as gateway_router
from threadline.platform.component import Component
from threadline.platform.events import Bus, InProcessBus
from threadline.platform.forwarding import Forwarding
from threadline.platform.http_client import ServiceClient
from threadline.platform.http_pool import HttpSession
from threadline.platform.http_server import CoalescingHttpToolsProtocol
from threadline.platform.nats_bus import NatsBus
from threadline.platform.outbox import OutboxRelay
from threadline.platform.settings import Settings
from threadline.platform.tokens import TokenVerifier
from threadline.platform.web import ReadinessCheck, create_app
from threadline.services.feed import app as feed_app
from threadline.services.feed.http import FeedClient
from threadline.services.payments import app as payments_app
from threadline.services.payments.http import PaymentsClient
from threadline.services.posts import app as posts_app
from threadline.services.posts.http import PostsClient
from threadline.services.threads import app as threads_app
from threadline.services.threads.http import ThreadsClient
from threadline.services.users import app as users_app
from threadline.services.users.http import UsersClient
from threadline.services.users.store import SigningKeyUnreadable
from threadline.topology import GATEWAY, SERVICES, Topology, parse_topology

__all__ = ["Process", "build_process", "running", "serve"]

log = logging.getLogger(__name__)


Resolve = Callable[[str], Any]
"""Gives the adapter (local object or HTTP client) through which a service reaches another."""


@dataclass(frozen=True)
class _ServiceKind:
    build: Callable[[Settings, Resolve], Component]
    client: type[ServiceClient]


_KINDS: dict[str, _ServiceKind] = {
    "users": _ServiceKind(lambda settings, _: users_app.build(settings), UsersClient),
    "posts": _ServiceKind(
        lambda settings, api: posts_app.build(settings, payments=api("payments")), PostsClient
    ),
    "threads": _ServiceKind(
        lambda settings, api: threads_app.build(settings, posts=api("posts")), ThreadsClient
    ),
    "feed": _ServiceKind(lambda settings, api: feed_app.build(settings, posts=api("posts")), FeedClient),
    "payments": _ServiceKind(lambda settings, _: payments_app.build(settings), PaymentsClient),
}
assert set(_KINDS) == set(SERVICES), "every service in topology.SERVICES needs a _ServiceKind"


@dataclass
class Process:
    """One running process: its ASGI app plus what must start before and stop after serving."""

    app: FastAPI
    components: dict[str, Component]
    bus: Bus | None
    session: HttpSession
    relays: list[OutboxRelay]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        """Open every database (migrating it), connect the bus, start relays and background work."""
        for component in self.components.values():
            # Said first: a migration that rebuilds a large table can take minutes.
            log.info("%s: opening its database, applying any pending migrations", component.name)
            await component.database.open(component.migrations)
        if self.bus is not None:
            await self.bus.start()
        self.tasks = [asyncio.create_task(relay.run()) for relay in self.relays]
        for component in self.components.values():
            self.tasks += [asyncio.create_task(work()) for work in component.background]

    async def stop(self) -> None:
        """Stop relays and background work, disconnect the bus, close databases and client connections."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.bus is not None:
            await self.bus.close()
        for component in self.components.values():
            await component.database.close()
        await self.session.close()


def build_process(group: tuple[str, ...], settings: Settings) -> Process:
    """Assemble the components of `group` with the adapters the topology calls for."""
    topology = parse_topology(settings.topology, SERVICES)
    session = HttpSession()
    components: dict[str, Component] = {}
    clients: dict[str, ServiceClient] = {}

    def api(name: str) -> Any:
        if name in group:
            if name not in components:
                components[name] = _KINDS[name].build(settings, api)
            return components[name].service
        if name not in clients:
            url = settings.service_urls.get(name)
            if url is None:
                raise RuntimeError(f"no URL for service {name!r}: set THREADLINE_SERVICE_URLS")
            clients[name] = _KINDS[name].client(
                name, url, session, timeout_seconds=settings.call_timeout_seconds
            )
        return clients[name]

    for name in group:
        if name != GATEWAY:
            api(name)

    verifier = TokenVerifier(api("users").jwks)
    routers: list[APIRouter] = [component.router for component in components.values()]
    middleware: list[Middleware] = []
    if GATEWAY in group:
        account_ids = AccountIds(api("users"))
        # The public routes first: every request is matched against the routes in order.
        routers.insert(
            0,
            gateway_router(
                users=api("users"),
                posts=api("posts"),
                threads=api("threads"),
                feed=api("feed"),
                payments=api("payments"),
                topology=topology.name,
                status=_status_probe(components, settings, session),
                account_ids=account_ids,
            ),
        )
        remote = [forward for forward in forwards(account_ids) if forward.service in clients]
        if remote:
            middleware.append(Middleware(Forwarding, forwards=remote, clients=clients))
    bus = _bus(topology, settings) if components else None
    relays = []
    for component in components.values():
        for event_type, handler in component.handlers.items():
            assert bus is not None
            bus.subscribe(component.name, event_type, handler)
        assert bus is not None
        relays.append(OutboxRelay(component.database, bus, name=component.name))
    readiness: dict[str, ReadinessCheck] = {
        f"{name}_database": component.database.ping for name, component in components.items()
    }
    if bus is not None:
        readiness["bus"] = _connected(bus)
    process = Process(
        app=create_app(
            title=f"threadline {Topology.process_name(group)}",
            routers=routers,
            readiness=readiness,
            token_verifier=verifier,
            max_body_bytes=settings.max_body_bytes,
            middleware=middleware,
        ),
        components=components,
        bus=bus,
        session=session,
        relays=relays,
    )
    return process


def _bus(topology: Topology, settings: Settings) -> Bus:
    if topology.single_process:
        return InProcessBus()
    if settings.nats_url is None:
        raise RuntimeError("this topology needs NATS: set THREADLINE_NATS_URL")
    return NatsBus(settings.nats_url, settings.events_namespace)


def _connected(bus: Bus) -> ReadinessCheck:
    async def check() -> bool:
        return bus.connected

    return check


def _status_probe(local: dict[str, Component], settings: Settings, session: HttpSession) -> Callable[[], Any]:
    async def probe(name: str) -> ServiceState:
        if name in local:
            up = await local[name].database.ping()
        else:
            up = await _ready(session, settings.service_urls.get(name))
        return ServiceState(status="up" if up else "down", replicas=1)

    async def status() -> dict[str, ServiceState]:
        states = await asyncio.gather(*(probe(name) for name in SERVICES))
        return dict(zip(SERVICES, states, strict=True))

    return status


async def _ready(session: HttpSession, url: str | None) -> bool:
    if url is None:
        return False
    try:
        answer = await session.origin(url).request("GET", "/readyz", timeout_seconds=1.0)
    except (TimeoutError, OSError):
        return False
    return answer.status == 200


def serve(group: tuple[str, ...], settings: Settings) -> None:
    """Run one process of the topology until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s {Topology.process_name(group)} %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uvloop.run(_serve(group, settings))


async def _serve(group: tuple[str, ...], settings: Settings) -> None:
    process = build_process(group, settings)
    name = Topology.process_name(group)
    try:
        await process.start()
    except DatabaseError as exc:
        await process.stop()
        _fail(
            f"{name}: a database in {settings.data_dir} cannot be opened ({exc.orig}). "
            "It may be damaged: move the data directory away or pass another --data-dir."
        )
    except SigningKeyUnreadable as exc:
        await process.stop()
        _fail(f"{name}: {exc}")
    # uvicorn over granian, measured here (2026-11-26, one core, a route with one dependency):
    # the same throughput (~7,100 req/s) and CPU at full load, and granian ~20% more CPU per
    # request at light load, where services spend most time; granian's in-loop server, which
    # our background tasks need, is also marked experimental.
    config = uvicorn.Config(
        process.app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        # httptools, with each answer's head and body sent in one write.
        http=CoalescingHttpToolsProtocol,
        # Callers connect directly (no proxy in front adds X-Forwarded-For): skip that layer.
        proxy_headers=False,
        timeout_graceful_shutdown=10,
    )
    try:
        sock = config.bind_socket()
    except (OSError, SystemExit):
        await process.stop()
        _fail(
            f"{name}: cannot listen on {settings.host}:{settings.port}, it is in use; "
            "stop what uses it or choose another port"
        )
    server = _Server(config)
    loop = asyncio.get_running_loop()
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(stop_signal, server.handle_exit, stop_signal, None)
    print(f"threadline {name} serving on http://{settings.host}:{settings.port}", flush=True)
    try:
        await server.serve(sockets=[sock])
    finally:
        await process.stop()
    print(f"threadline {name} stopped", flush=True)


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handling: it re-raises the signal after serving, which
    would end the process before the outbox relays, bus and databases are closed."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave signals to the handlers `_serve` installed on the loop."""
        yield


def _fail(message: str) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(2)


@asynccontextmanager
async def running(process: Process) -> AsyncIterator[Process]:
    """Start a process's parts for the duration of a block (used by tests and tools)."""
    await process.start()
    try:
        yield process
    finally:
        await process.stop()
