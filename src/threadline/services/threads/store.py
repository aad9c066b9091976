"""The threads service's tables and queries; migrations live beside it in `migrations/`."""

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from threadline.platform.clock import utcnow
from threadline.platform.db import (
    Command,
    Database,
    Migrations,
    Query,
    SqlStore,
    Transaction,
    UtcDateTime,
    insert_ignoring_conflicts,
)
from threadline.services.threads.api import SERVICE
from threadline.services.threads.service import ThreadNode

__all__ = ["MIGRATIONS", "SqlThreadStore"]

MIGRATIONS = Migrations(Path(__file__).parent / "migrations")

metadata = sa.MetaData()

thread_nodes = sa.Table(
    "thread_nodes",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("parent_id", sa.String(36), nullable=True),
    sa.Column("root_id", sa.String(36), nullable=False),
    sa.Column("deleted_at", UtcDateTime, nullable=True),
)

_ROOT_OF_POST = (
    sa.select(thread_nodes.c.root_id).where(thread_nodes.c.id == sa.bindparam("post_id")).scalar_subquery()
)
_CONVERSATION = Query(sa.select(thread_nodes).where(thread_nodes.c.root_id == _ROOT_OF_POST))
_BURY = Command(
    thread_nodes.update()
    .where(thread_nodes.c.id == sa.bindparam("node_id"), thread_nodes.c.deleted_at.is_(None))
    .values(deleted_at=sa.bindparam("buried_at", type_=UtcDateTime))
)


def _node(row: Any) -> ThreadNode:
    return ThreadNode(
        id=row.id, parent_id=row.parent_id, root_id=row.root_id, deleted=row.deleted_at is not None
    )


def _row(node: ThreadNode) -> dict[str, Any]:
    return {
        "id": node.id,
        "parent_id": node.parent_id,
        "root_id": node.root_id,
        "deleted_at": utcnow() if node.deleted else None,
    }


class SqlThreadTransaction(Transaction):
    """The threads queries on one connection."""

    async def conversation(self, post_id: str) -> list[ThreadNode]:
        """Every node sharing `post_id`'s root, in one query."""
        return [_node(row) for row in await self.conn.fetch(_CONVERSATION, {"post_id": post_id})]

    async def add_node(self, node: ThreadNode) -> bool:
        """Store a node unless its id is known."""
        return await insert_ignoring_conflicts(self.conn, thread_nodes, _row(node))

    async def bury_node(self, node: ThreadNode) -> None:
        """Mark a node deleted, or store its tombstone."""
        tombstone = _row(node.model_copy(update={"deleted": True}))
        if not await insert_ignoring_conflicts(self.conn, thread_nodes, tombstone):
            await self.conn.run(_BURY, {"node_id": node.id, "buried_at": tombstone["deleted_at"]})


class SqlThreadStore(SqlStore[SqlThreadTransaction]):
    """The threads store on its own database."""

    def __init__(self, db: Database) -> None:
        super().__init__(db, SqlThreadTransaction, SERVICE)
