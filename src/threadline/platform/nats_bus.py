"""The bus over NATS JetStream: one file-backed stream per namespace, a durable pull consumer each.

Publishing returns once JetStream has stored the event (the server writes synchronously), and
the event id is the NATS message id, so a publish repeated by the outbox relay is dropped as a
duplicate. Each subscription is a durable consumer that never gives up on an event: a handler
failure is retried after a growing delay, and the consumer survives server restarts.
"""

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig

from threadline.platform.durability import SETTLE_AFTER_S, Deferral, SettleWindow, deferring
from threadline.platform.events import Event, EventHandler

__all__ = ["NatsBus", "NatsUnavailableError"]

log = logging.getLogger(__name__)

_CONNECT_DEADLINE_SECONDS = 5.0
_RECONNECT_WAIT_SECONDS = 0.5
_API_TIMEOUT_SECONDS = 5.0
_DUPLICATE_WINDOW_SECONDS = 120.0
_ACK_WAIT_SECONDS = 30.0
_FETCH_BATCH = 32
_FETCH_SECONDS = 3.0
# Fetching the events already waiting behind one: they are there, so the server answers at once.
_FETCH_WAITING_SECONDS = 0.5
# A fetch while handled events wait for their sync returns by then; nats-py wants a positive timeout.
_FETCH_AT_LEAST_S = 0.001
_REDELIVERY_FIRST_DELAY_SECONDS = 0.5
_REDELIVERY_MAX_DELAY_SECONDS = 30.0
_RECOVERY_FIRST_DELAY_SECONDS = 0.2
_RECOVERY_MAX_DELAY_SECONDS = 5.0
# How long `close` waits for its consumers to stop once cancelled (they settle their window first).
_CLOSE_GRACE_SECONDS = 10.0
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]+")


class NatsUnavailableError(RuntimeError):
    """The NATS server cannot be reached or cannot serve JetStream."""


@dataclass(frozen=True, slots=True)
class _Subscription:
    consumer: str
    event_type: str
    handler: EventHandler
    durable: str


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


class NatsBus:
    """The `Bus` over NATS JetStream, for events whose consumers live in other processes.

    Each consumer handles its events one at a time in stream order; an event whose handler
    failed is retried later without holding back the events after it.
    """

    def __init__(
        self,
        url: str,
        namespace: str,
        *,
        stream_replicas: int = 1,
        close_grace_seconds: float = _CLOSE_GRACE_SECONDS,
        fetch_seconds: float = _FETCH_SECONDS,
    ) -> None:
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"namespace must be letters, digits, '_' or '-', not {namespace!r}")
        self._url = url
        self._namespace = namespace
        self._replicas = stream_replicas
        self._stream = f"{re.sub(r'[^A-Z0-9_]', '_', namespace.upper())}_EVENTS"
        self._subscriptions: dict[str, _Subscription] = {}
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._close_grace_seconds = close_grace_seconds
        self._fetch_seconds = fetch_seconds

    @property
    def stream(self) -> str:
        """The JetStream stream that holds this namespace's events."""
        return self._stream

    def subject(self, event_type: str) -> str:
        """The NATS subject events of `event_type` are published on."""
        return f"{self._namespace}.events.{event_type}"

    def subscribe(self, consumer: str, event_type: str, handler: EventHandler) -> None:
        """Register `consumer`'s handler for one event type; call before `start`."""
        if self._nc is not None:
            raise RuntimeError("subscribe to the bus before starting it")
        durable = _sanitize(f"{consumer}__{event_type}")
        if durable in self._subscriptions:
            raise ValueError(f"{consumer} already subscribes to {event_type}")
        self._subscriptions[durable] = _Subscription(consumer, event_type, handler, durable)

    async def start(self) -> None:
        """Connect, create or update the stream and the consumers, and begin delivering."""
        if self._nc is not None:
            raise RuntimeError("the bus is already started")
        nc = await self._connect()
        try:
            self._js = nc.jetstream(timeout=_API_TIMEOUT_SECONDS)
            await self._ensure_stream()
            bound = [(sub, await self._bind(sub)) for sub in self._subscriptions.values()]
        except BaseException:
            self._js = None
            await nc.close()
            raise
        self._nc = nc
        self._tasks = [
            asyncio.create_task(self._consume(sub, pull), name=f"nats-consumer-{sub.durable}")
            for sub, pull in bound
        ]

    async def publish(self, event: Event) -> None:
        """Store the event in the stream; returns once JetStream acknowledged it, else raises."""
        ack = await self._jetstream().publish(
            self.subject(event.type),
            event.to_json(),
            timeout=_API_TIMEOUT_SECONDS,
            stream=self._stream,
            headers={"Nats-Msg-Id": event.id},
        )
        if ack.duplicate:
            log.debug("event %s %s was already in %s", event.type, event.id, self._stream)

    async def close(self) -> None:
        """Stop the consumers, handing events being handled back for redelivery, and disconnect.

        A consumer still running after the grace period (its handler holds on through the
        cancellation) is left behind with a warning, so that a process can always stop; what
        it has not acknowledged is delivered again.
        """
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            stopped, running = await asyncio.wait(tasks, timeout=self._close_grace_seconds)
            for task in stopped:
                if not task.cancelled() and (failure := task.exception()) is not None:
                    log.error("a consumer of %s had ended with an error", self._url, exc_info=failure)
            if running:
                log.warning(
                    "%d consumer(s) of %s still running %.0fs after being stopped; leaving them",
                    len(running),
                    self._url,
                    self._close_grace_seconds,
                )
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                # The client flushes what it holds before closing: a server that stopped reading
                # would hold it for ever.
                await asyncio.wait_for(nc.close(), self._close_grace_seconds)
            except TimeoutError:
                log.warning(
                    "disconnecting from NATS at %s took over %.0fs; left to the OS",
                    self._url,
                    self._close_grace_seconds,
                )

    @property
    def connected(self) -> bool:
        """Whether the client is connected to the server right now."""
        return self._nc is not None and self._nc.is_connected

    async def _connect(self) -> Client:
        nc = Client()

        async def on_error(exc: Exception) -> None:
            if self._nc is not None:
                log.warning("NATS %s: %s", self._url, exc)

        async def on_disconnected() -> None:
            if self._nc is not None:
                log.warning("disconnected from NATS at %s; reconnecting", self._url)

        async def on_reconnected() -> None:
            log.info("reconnected to NATS at %s", self._url)

        try:
            # With unlimited reconnects the first connect would also retry forever; bound it.
            async with asyncio.timeout(_CONNECT_DEADLINE_SECONDS):
                await nc.connect(
                    servers=[self._url],
                    name=f"threadline-{self._namespace}",
                    connect_timeout=2,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=_RECONNECT_WAIT_SECONDS,  # type: ignore[arg-type]
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            last_error = nc.last_error or exc
            with contextlib.suppress(Exception):
                await nc.close()
            raise NatsUnavailableError(
                f"cannot connect to NATS at {self._url} ({last_error!r}): is NATS running at "
                f"{self._url}? Start one, or omit --nats-url to use the embedded server"
            ) from exc
        return nc

    def _jetstream(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("the bus is not started")
        return self._js

    async def _ensure_stream(self) -> None:
        js = self._jetstream()
        config = StreamConfig(
            name=self._stream,
            subjects=[f"{self._namespace}.events.>"],
            storage=StorageType.FILE,
            num_replicas=self._replicas,
            duplicate_window=_DUPLICATE_WINDOW_SECONDS,
        )
        try:
            try:
                await js.stream_info(self._stream)
            except nats.js.errors.NotFoundError:
                await js.add_stream(config)
            else:
                await js.update_stream(config)
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
            raise NatsUnavailableError(
                f"NATS at {self._url} does not serve JetStream: run nats-server with JetStream "
                "enabled (-js), or omit --nats-url to use the embedded server"
            ) from exc

    async def _bind(self, sub: _Subscription) -> JetStreamContext.PullSubscription:
        js = self._jetstream()
        await js.add_consumer(
            self._stream,
            ConsumerConfig(
                name=sub.durable,
                durable_name=sub.durable,
                filter_subject=self.subject(sub.event_type),
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=_ACK_WAIT_SECONDS,
                max_deliver=-1,
            ),
        )
        return await js.pull_subscribe_bind(durable=sub.durable, stream=self._stream)

    async def _consume(self, sub: _Subscription, pull: JetStreamContext.PullSubscription | None) -> None:
        """Fetch and handle forever; connection trouble only delays delivery, never ends it.

        An event is acknowledged once what its handler wrote is on the disk: the handler's
        commits do not wait for it (see `durability`), and the database is synced once per
        window for every event handled in it.
        """
        handled: SettleWindow[Msg] = SettleWindow(_ack_all, settle_after_s=SETTLE_AFTER_S, most=_FETCH_BATCH)
        recovery_delay = _RECOVERY_FIRST_DELAY_SECONDS
        this = asyncio.current_task()
        try:
            while True:
                if this is not None and this.cancelling():
                    # Stopped, but the cancellation was caught on the way (by a handler, or in
                    # the client library): stop here rather than fetch on for ever.
                    raise asyncio.CancelledError
                try:
                    if pull is None:
                        await self._ensure_stream()
                        pull = await self._bind(sub)
                    await handled.settle_if_due()
                    due = handled.due_in()
                    try:
                        messages = await _next_events(
                            pull, within_s=self._fetch_seconds if due is None else max(due, _FETCH_AT_LEAST_S)
                        )
                    except TimeoutError:
                        continue
                    await self._handle_all(sub, messages, handled)
                    recovery_delay = _RECOVERY_FIRST_DELAY_SECONDS
                except Exception as exc:
                    log.warning(
                        "consumer %s of %s: %r; retrying in %.1fs",
                        sub.consumer,
                        sub.event_type,
                        exc,
                        recovery_delay,
                    )
                    if pull is not None:
                        with contextlib.suppress(Exception):
                            await pull.unsubscribe()
                        pull = None
                    await asyncio.sleep(recovery_delay)
                    recovery_delay = min(recovery_delay * 2, _RECOVERY_MAX_DELAY_SECONDS)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await handled.settle()
            raise

    async def _handle_all(self, sub: _Subscription, messages: list[Msg], handled: SettleWindow[Msg]) -> None:
        deferral = Deferral()
        for position, message in enumerate(messages):
            try:
                with deferring(deferral):
                    if await self._handle(sub, message):
                        handled.add(message, deferral)
            except asyncio.CancelledError:
                # Hand back what was not handled now rather than after ack_wait, so a consumer
                # restarted by a redeploy gets it at once.
                for unhandled in messages[position:]:
                    with contextlib.suppress(Exception):
                        await unhandled.nak()
                raise

    async def _handle(self, sub: _Subscription, message: Msg) -> bool:
        """Handle one message; True if it waits to be acknowledged, False if it was answered already."""
        try:
            event = Event.from_json(message.data)
        except (ValueError, KeyError, TypeError):
            log.error(
                "consumer %s: discarding a message on %s that is not an event envelope",
                sub.consumer,
                message.subject,
            )
            await message.term()
            return False
        try:
            await sub.handler(event)
        except Exception:
            deliveries = message.metadata.num_delivered or 1
            delay = min(
                _REDELIVERY_FIRST_DELAY_SECONDS * 2 ** min(deliveries - 1, 16),
                _REDELIVERY_MAX_DELAY_SECONDS,
            )
            log.exception(
                "consumer %s failed on %s %s (delivery %d); redelivering in %.1fs",
                sub.consumer,
                event.type,
                event.id,
                deliveries,
                delay,
            )
            await message.nak(delay=delay)
            return False
        return True


async def _next_events(pull: JetStreamContext.PullSubscription, *, within_s: float) -> list[Msg]:
    """The next event as soon as it arrives, with the events already waiting behind it (a batch at most).

    When the first request of nats-py's fetch of a whole batch meets the end-of-fetch answer left
    by the fetch before (it often does), the fetch goes on with a request that can end only once
    the batch is full or its time is up: an event arriving then was handled seconds late on a
    quiet system (the API promises feeds and threads within a second). So one event is waited
    for, and those the server says wait behind it are fetched at once. Raises TimeoutError if
    none arrives within `within_s`.
    """
    first = await pull.fetch(1, timeout=within_s)
    behind = min(first[-1].metadata.num_pending, _FETCH_BATCH - 1)
    if behind <= 0:
        return first
    try:
        return first + await pull.fetch(behind, timeout=_FETCH_WAITING_SECONDS)
    except TimeoutError:
        # Taken meanwhile by another instance of the same consumer.
        return first


async def _ack_all(messages: list[Msg]) -> None:
    """Acknowledge handled messages; one that fails to is delivered again after the ack wait."""
    for message in messages:
        with contextlib.suppress(Exception):
            await message.ack()
