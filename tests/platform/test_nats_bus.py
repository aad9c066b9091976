"""The JetStream bus against a real NATS server."""

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from tests.support.databases import commit_waits_for_the_disk, syncs_written
from tests.support.polling import eventually as poll_until
from threadline.platform.db import Database, Transaction
from threadline.platform.events import Event
from threadline.platform.nats_bus import NatsBus, NatsUnavailableError
from threadline.platform.nats_server import EmbeddedNats

DEADLINE_SECONDS = 60.0

MakeBus = Callable[..., NatsBus]


class Inbox:
    """A handler that records what it is given; it fails the first `failures` deliveries."""

    def __init__(self, failures: int = 0) -> None:
        self.events: list[Event] = []
        self.attempts = 0
        self._failures = failures

    async def __call__(self, event: Event) -> None:
        self.attempts += 1
        if self.attempts <= self._failures:
            raise RuntimeError("the handler fails this time")
        self.events.append(event)

    @property
    def ids(self) -> list[str]:
        return [event.id for event in self.events]


async def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {DEADLINE_SECONDS:.0f}s: {what}")
        await asyncio.sleep(0.05)


async def publish_until_stored(bus: NatsBus, event: Event) -> None:
    """Publish as the outbox relay does: retry until JetStream acknowledges."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        try:
            await bus.publish(event)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def user_updated(n: int) -> Event:
    return Event(type="user.updated", source="users", data={"n": n})


async def delete_stream(url: str, stream: str) -> None:
    nc = Client()
    try:
        await nc.connect(url, allow_reconnect=False, connect_timeout=2)
    except Exception:
        return
    try:
        with contextlib.suppress(NotFoundError):
            await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


@pytest.fixture
async def make_bus(namespace: str) -> AsyncIterator[MakeBus]:
    """Buses in the test's namespace; closed, and their stream deleted, after the test."""
    made: list[tuple[str, NatsBus]] = []

    def make(url: str, **options: Any) -> NatsBus:
        bus = NatsBus(url, namespace, **options)
        made.append((url, bus))
        return bus

    yield make
    for _, bus in made:
        await bus.close()
    for url in {url for url, _ in made}:
        await delete_stream(url, made[0][1].stream)


async def test_published_event_reaches_subscriber(nats_url: str, make_bus: MakeBus) -> None:
    """An event published on the bus is handed, intact, to the handler subscribed to its type."""
    inbox = Inbox()
    bus = make_bus(nats_url)
    bus.subscribe("posts", "user.updated", inbox)
    await bus.start()
    event = user_updated(1)

    await bus.publish(event)

    await eventually(lambda: len(inbox.events) == 1, "the event is delivered")
    assert inbox.events == [event]


async def test_an_event_reaches_a_waiting_consumer_without_waiting_out_its_fetch(
    nats_url: str, make_bus: MakeBus
) -> None:
    """Events published one at a time, each while the consumer waits in a long fetch, are handed
    over as they arrive (a fetch of a whole batch held one until the fetch's time was up)."""
    inbox = Inbox()
    bus = make_bus(nats_url, fetch_seconds=10 * DEADLINE_SECONDS)
    bus.subscribe("posts", "user.updated", inbox)
    await bus.start()
    nc = Client()
    await nc.connect(nats_url)
    try:
        published: list[str] = []

        async def consumer_waits_in_a_fetch() -> None:
            info = await nc.jetstream().consumer_info(bus.stream, "posts__user_updated")
            assert info.num_waiting, "the consumer is not waiting in a fetch"

        # Sixteen: a stale end-of-fetch status made the old fetch wait in about half of the rounds.
        for n in range(16):
            await poll_until(consumer_waits_in_a_fetch, within=DEADLINE_SECONDS)
            event = user_updated(n)
            await bus.publish(event)
            published.append(event.id)
            await eventually(lambda: inbox.ids == published, f"event {n} is delivered before the fetch ends")
    finally:
        await nc.close()


async def test_duplicate_publish_is_delivered_once(nats_url: str, make_bus: MakeBus) -> None:
    """Publishing the same event id twice (a relay retry) delivers it once."""
    inbox = Inbox()
    bus = make_bus(nats_url)
    bus.subscribe("posts", "user.updated", inbox)
    await bus.start()
    event, marker = user_updated(1), user_updated(2)

    await bus.publish(event)
    await bus.publish(event)
    await bus.publish(marker)

    await eventually(lambda: marker.id in inbox.ids, "the marker is delivered")
    assert inbox.ids == [event.id, marker.id]


async def test_failing_handler_gets_the_event_again(nats_url: str, make_bus: MakeBus) -> None:
    """A handler that raises is given the same event again until it succeeds."""
    inbox = Inbox(failures=1)
    bus = make_bus(nats_url)
    bus.subscribe("posts", "user.updated", inbox)
    await bus.start()
    event = user_updated(1)

    await bus.publish(event)

    await eventually(lambda: len(inbox.events) == 1, "the event is redelivered")
    assert inbox.ids == [event.id]
    assert inbox.attempts == 2


async def test_every_consumer_of_a_type_gets_each_event(nats_url: str, make_bus: MakeBus) -> None:
    """Two consumers of one event type, in different processes, each get every event."""
    feed, threads = Inbox(), Inbox()
    feed_bus, threads_bus, publisher = make_bus(nats_url), make_bus(nats_url), make_bus(nats_url)
    feed_bus.subscribe("feed", "post.created", feed)
    threads_bus.subscribe("threads", "post.created", threads)
    for bus in (feed_bus, threads_bus, publisher):
        await bus.start()
    event = Event(type="post.created", source="posts", data={"id": "p1"})

    await publisher.publish(event)

    await eventually(lambda: bool(feed.events and threads.events), "both consumers get the event")
    assert feed.ids == threads.ids == [event.id]


async def test_events_published_before_a_consumer_starts_are_delivered(
    nats_url: str, make_bus: MakeBus
) -> None:
    """A consumer that starts late still gets, in order, every event published before it."""
    publisher = make_bus(nats_url)
    await publisher.start()
    events = [user_updated(n) for n in range(3)]
    for event in events:
        await publisher.publish(event)
    inbox = Inbox()
    consumer = make_bus(nats_url)
    consumer.subscribe("posts", "user.updated", inbox)

    await consumer.start()

    await eventually(lambda: len(inbox.events) == 3, "the earlier events are delivered")
    assert inbox.ids == [event.id for event in events]


async def test_events_survive_a_server_restart(embedded_nats: EmbeddedNats, make_bus: MakeBus) -> None:
    """Across a server restart buses reconnect by themselves and no stored event is lost."""
    inbox = Inbox()
    publisher, consumer = make_bus(embedded_nats.url), make_bus(embedded_nats.url)
    consumer.subscribe("posts", "user.updated", inbox)
    await publisher.start()
    await consumer.start()
    before = [user_updated(n) for n in range(5)]
    for event in before:
        await publisher.publish(event)
    await eventually(lambda: len(inbox.events) == 5, "the first events are delivered")

    await asyncio.to_thread(embedded_nats.restart)
    after = [user_updated(n) for n in range(5, 10)]
    for event in after:
        await publish_until_stored(publisher, event)

    expected = {event.id for event in before + after}
    await eventually(lambda: set(inbox.ids) == expected, "every event is delivered")
    await eventually(lambda: publisher.connected and consumer.connected, "both reconnect")
    late = Inbox()
    audit = make_bus(embedded_nats.url)
    audit.subscribe("audit", "user.updated", late)
    await audit.start()
    await eventually(lambda: len(late.events) == 10, "a new consumer reads the whole stream")
    assert late.ids == [event.id for event in before + after]


async def test_acknowledged_events_survive_a_server_crash(
    embedded_nats: EmbeddedNats, make_bus: MakeBus
) -> None:
    """Every event whose publish returned is still there after the server is killed (SIGKILL)."""
    publisher = make_bus(embedded_nats.url)
    await publisher.start()
    events = [user_updated(n) for n in range(20)]
    for event in events:
        await publisher.publish(event)
    assert embedded_nats.pid is not None

    os.kill(embedded_nats.pid, signal.SIGKILL)
    await asyncio.to_thread(embedded_nats.restart)

    inbox = Inbox()
    consumer = make_bus(embedded_nats.url)
    consumer.subscribe("posts", "user.updated", inbox)
    await consumer.start()
    await eventually(lambda: len(inbox.events) == 20, "every acknowledged event is delivered")
    assert inbox.ids == [event.id for event in events]


async def test_close_leaves_nothing_running(nats_url: str, make_bus: MakeBus) -> None:
    """After `close` the bus is disconnected and none of its tasks is left in the loop."""
    before = asyncio.all_tasks()
    bus = make_bus(nats_url)
    bus.subscribe("posts", "user.updated", Inbox())
    bus.subscribe("feed", "user.updated", Inbox())
    await bus.start()
    assert bus.connected
    assert asyncio.all_tasks() - before

    await bus.close()

    assert not bus.connected
    assert asyncio.all_tasks() - before == set()


class HoldsOn:
    """A handler that catches the cancellation of its consumer: once, or until `release` is set."""

    def __init__(self, *, until_released: bool) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.finished = 0
        self._until_released = until_released

    async def __call__(self, event: Event) -> None:
        self.started.set()
        while True:
            try:
                await self.release.wait()
                break
            except asyncio.CancelledError:
                if not self._until_released:
                    break
        self.finished += 1


async def test_close_stops_a_consumer_whose_handler_caught_the_cancellation(
    nats_url: str, make_bus: MakeBus
) -> None:
    """A handler (or library) that swallows the cancellation does not keep the consumer fetching."""
    before = asyncio.all_tasks()
    handler = HoldsOn(until_released=False)
    bus = make_bus(nats_url)
    bus.subscribe("posts", "user.updated", handler)
    await bus.start()
    await bus.publish(user_updated(1))
    await asyncio.wait_for(handler.started.wait(), DEADLINE_SECONDS)

    await asyncio.wait_for(bus.close(), DEADLINE_SECONDS)

    assert handler.finished == 1
    assert asyncio.all_tasks() - before == set()


async def test_close_returns_after_its_grace_while_a_handler_holds_on(
    nats_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer still running after the grace period is left behind, said so, and the bus disconnects."""
    before = asyncio.all_tasks()
    handler = HoldsOn(until_released=True)
    bus = NatsBus(nats_url, namespace, close_grace_seconds=0.2)
    bus.subscribe("posts", "user.updated", handler)
    await bus.start()
    try:
        await bus.publish(user_updated(1))
        await asyncio.wait_for(handler.started.wait(), DEADLINE_SECONDS)

        await asyncio.wait_for(bus.close(), DEADLINE_SECONDS)

        assert not bus.connected
        assert "still running" in caplog.text
        [left] = asyncio.all_tasks() - before
        handler.release.set()
        await asyncio.wait_for(asyncio.gather(left, return_exceptions=True), DEADLINE_SECONDS)
        assert handler.finished == 1
    finally:
        handler.release.set()
        await bus.close()
        await delete_stream(nats_url, bus.stream)


async def test_unreachable_server_is_reported_with_its_url(namespace: str) -> None:
    """Starting against a URL where no NATS listens fails with an error naming it and a remedy."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"
    bus = NatsBus(url, namespace)

    with pytest.raises(NatsUnavailableError, match=f"NATS running at {url}.*embedded server"):
        await bus.start()
    assert not bus.connected


async def test_closing_mid_handler_hands_the_event_back_at_once(nats_url: str, make_bus: MakeBus) -> None:
    """An event whose handler `close` interrupts is redelivered at once, not after ack_wait."""
    started, never = asyncio.Event(), asyncio.Event()

    async def stuck(event: Event) -> None:
        started.set()
        await never.wait()

    first = make_bus(nats_url)
    first.subscribe("posts", "user.updated", stuck)
    await first.start()
    event = user_updated(1)
    await first.publish(event)
    await asyncio.wait_for(started.wait(), DEADLINE_SECONDS)

    await first.close()
    inbox = Inbox()
    second = make_bus(nats_url)
    second.subscribe("posts", "user.updated", inbox)
    began = time.monotonic()
    await second.start()

    await eventually(lambda: len(inbox.events) == 1, "the event is delivered again")
    assert inbox.ids == [event.id]
    assert time.monotonic() - began < 20, "redelivered only after ack_wait (30 s)"


async def unacknowledged(url: str, bus: NatsBus, durable: str) -> int:
    """How many messages JetStream has delivered to the consumer without an acknowledgment."""
    nc = Client()
    await nc.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        info = await nc.jetstream().consumer_info(bus.stream, durable)
        return int(info.num_ack_pending or 0)
    finally:
        await nc.close()


async def test_an_event_is_acknowledged_only_once_its_handlers_writes_are_synced(
    nats_url: str, make_bus: MakeBus, tmp_path: Path
) -> None:
    """The handler's commit does not wait for the disk; the ack waits for the database's sync."""
    db = Database(f"sqlite:///{tmp_path / 'consumer.db'}")
    await db.open([])
    released = asyncio.Event()
    synced = db.sync

    async def held_sync() -> None:
        await released.wait()
        await synced()

    db.sync = held_sync  # type: ignore[method-assign]
    waited: list[bool] = []

    async def record(event: Event) -> None:
        async with db.write() as conn:
            await Transaction(conn, "posts").claim_event("posts", event.id)
            waited.append(await commit_waits_for_the_disk(conn))

    bus = make_bus(nats_url)
    bus.subscribe("posts", "user.updated", record)
    try:
        await bus.start()
        await bus.publish(user_updated(1))
        await eventually(lambda: waited == [False], "the event is handled without waiting for the disk")
        assert await unacknowledged(nats_url, bus, "posts__user_updated") == 1
        released.set()

        async def acknowledged() -> None:
            assert await unacknowledged(nats_url, bus, "posts__user_updated") == 0, (
                "not acknowledged once synced"
            )

        await poll_until(acknowledged, within=DEADLINE_SECONDS)
        assert await syncs_written(db) == 1
    finally:
        await bus.close()
        await db.close()
