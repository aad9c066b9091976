"""A service as a process hosts it: its application object, database, routes and event handlers."""

from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter

from threadline.platform.db import Database, Migrations
from threadline.platform.events import EventHandler

__all__ = ["Component"]


@dataclass
class Component:
    """Everything the composition root needs to run one service inside a process."""

    name: str
    service: Any
    database: Database
    migrations: Sequence[Migrations]
    router: APIRouter
    handlers: Mapping[str, EventHandler] = field(default_factory=dict)
    background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = ()
    """Work that runs while the process does, started once its database is open, cancelled at stop."""
