"""The event envelope (CloudEvents attributes) and the bus port with its in-process adapter."""

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol

import orjson
from pydantic import BaseModel

from threadline.platform.ids import new_id

__all__ = ["Bus", "Event", "EventHandler", "EventPayload", "InProcessBus"]

log = logging.getLogger(__name__)


class EventPayload(BaseModel):
    """Base of every event's data model; subclasses set TYPE (past tense, e.g. `post.created`)."""

    TYPE: ClassVar[str]


@dataclass(frozen=True, slots=True)
class Event:
    """One event as it travels: CloudEvents attributes plus trace context."""

    type: str
    source: str
    data: dict[str, Any]
    id: str = field(default_factory=new_id)
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    specversion: str = "1.0"
    traceparent: str | None = None

    @classmethod
    def of(cls, source: str, payload: EventPayload) -> "Event":
        """Wrap a payload model published by `source`."""
        return cls(type=payload.TYPE, source=source, data=payload.model_dump(mode="json"))

    def to_json(self) -> bytes:
        """Serialize the envelope."""
        return orjson.dumps(
            {
                "specversion": self.specversion,
                "id": self.id,
                "source": self.source,
                "type": self.type,
                "time": self.time,
                "traceparent": self.traceparent,
                "data": self.data,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> "Event":
        """Parse an envelope written by `to_json`."""
        doc = orjson.loads(raw)
        return cls(
            type=doc["type"],
            source=doc["source"],
            data=doc["data"],
            id=doc["id"],
            time=doc["time"],
            specversion=doc.get("specversion", "1.0"),
            traceparent=doc.get("traceparent"),
        )


EventHandler = Callable[[Event], Awaitable[None]]


class Bus(Protocol):
    """Carries events from a service's outbox relay to the consumers that subscribed to them."""

    def subscribe(self, consumer: str, event_type: str, handler: EventHandler) -> None:
        """Deliver every event of `event_type` to `handler`, at least once, as `consumer`."""

    async def start(self) -> None:
        """Connect and begin delivering to subscribers."""

    async def publish(self, event: Event) -> None:
        """Hand an event over durably; returns only once it can no longer be lost."""

    async def close(self) -> None:
        """Stop delivering and disconnect."""

    @property
    def connected(self) -> bool:
        """Whether publishing can currently succeed."""


class InProcessBus:
    """Direct delivery inside one process: `publish` returns once every handler has succeeded.

    Durability comes from the outbox: the relay marks an event sent only after `publish`
    returns, so a handler failure or a crash leaves the event to be delivered again.
    """

    def __init__(self) -> None:
        self._handlers: defaultdict[str, list[tuple[str, EventHandler]]] = defaultdict(list)
        self._lock = asyncio.Lock()

    def subscribe(self, consumer: str, event_type: str, handler: EventHandler) -> None:
        """Register a handler for one event type."""
        self._handlers[event_type].append((consumer, handler))

    async def start(self) -> None:
        """Nothing to connect."""

    async def publish(self, event: Event) -> None:
        """Run every subscribed handler; an exception leaves the event unsent in the outbox."""
        for consumer, handler in self._handlers.get(event.type, ()):
            try:
                await handler(event)
            except Exception:
                log.exception("consumer %s failed on %s %s", consumer, event.type, event.id)
                raise

    async def close(self) -> None:
        """Nothing to disconnect."""

    @property
    def connected(self) -> bool:
        """Always connected."""
        return True
