"""Looking into a database's transactions from a test."""

import sqlalchemy as sa

from threadline.platform.db import Connection, Database, sync_marks_table


async def commit_waits_for_the_disk(conn: Connection) -> bool:
    """Whether this transaction's commit will wait until the disk has it."""
    if conn.dialect.name == "postgresql":
        return str(await conn.scalar(sa.text("SHOW synchronous_commit"))) != "off"
    # 2 is FULL (WAL synced at every commit), 1 NORMAL (synced at checkpoints only).
    return int(await conn.scalar(sa.text("PRAGMA synchronous"))) == 2


async def syncs_written(db: Database) -> int:
    """How many syncs the database's mark counts (each one a commit that waited for the disk)."""
    async with db.read() as conn:
        found = await conn.scalar(sa.select(sync_marks_table.c.syncs))
    return 0 if found is None else int(found)
