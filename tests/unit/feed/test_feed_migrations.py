"""The feed's later migrations keep the timelines written under earlier ones (SQLite, PostgreSQL)."""

import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from threadline.platform.db import Database, Migrations
from threadline.platform.ids import new_id
from threadline.platform.pagination import PageRequest
from threadline.services.feed.store import MIGRATIONS, SqlFeedStore

ADD_ENTRY_BY_ADA = sa.text(
    "INSERT INTO timeline_entries (owner_id, post_id, author_id) VALUES (:owner, :post, 'ada')"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh SQLite file or PostgreSQL database."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_database")
        return url
    return f"sqlite:///{tmp_path / 'feed.db'}"


def first_revision_only(tmp_path: Path) -> Migrations:
    """The feed's migrations as they stood at their first revision."""
    folder = tmp_path / "feed-0001"
    shutil.copytree(MIGRATIONS.folder, folder, ignore=shutil.ignore_patterns("__pycache__"))
    for later in (folder / "versions").glob("*.py"):
        if not later.name.startswith("0001_"):
            later.unlink()
    return Migrations(folder)


async def test_clustering_timelines_keeps_every_entry(database_url: str, tmp_path: Path) -> None:
    """Entries written at revision 0001 are all there after 0002, which drops the (owner, author) index."""
    posts = [new_id() for _ in range(3)]
    old = Database(database_url)
    await old.open([first_revision_only(tmp_path)])
    try:
        async with old.write() as conn:
            for owner in ("bob", "cy"):
                for post in posts:
                    await conn.execute(ADD_ENTRY_BY_ADA, {"owner": owner, "post": post})
    finally:
        await old.close()

    database = Database(database_url)
    await database.open([MIGRATIONS])
    try:
        store = SqlFeedStore(database)
        async with store.read() as tx:
            assert (await tx.timeline("bob", PageRequest()))[0] == list(reversed(posts))
        async with store.write() as tx:
            await tx.remove_author("cy", "ada")
        async with store.read() as tx:
            assert (await tx.timeline("cy", PageRequest()))[0] == []
            assert (await tx.timeline("bob", PageRequest()))[0] == list(reversed(posts))
        async with database.read() as conn:
            indexes = await conn.execute(
                sa.text(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'timeline_entries'"
                    if database_url.startswith("sqlite")
                    else "SELECT indexname FROM pg_indexes WHERE tablename = 'timeline_entries'"
                )
            )
            names = {row[0] for row in indexes}
        assert "timeline_entries_by_post" in names
        assert "timeline_entries_by_author" not in names
    finally:
        await database.close()
