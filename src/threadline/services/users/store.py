"""The users service's tables and queries; migrations live beside it in `migrations/`."""

from pathlib import Path

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from threadline.platform.clock import utcnow
from threadline.platform.db import (
    Command,
    Connection,
    Database,
    Migrations,
    PagedQuery,
    Query,
    SqlStore,
    Transaction,
    UtcDateTime,
    add_to_counter,
    insert_ignoring_conflicts,
)
from threadline.platform.ids import new_id
from threadline.platform.pagination import Page, PageRequest
from threadline.platform.tokens import SigningKey
from threadline.services.users.api import SERVICE, UserPublic
from threadline.services.users.service import UserRecord

__all__ = ["MIGRATIONS", "SigningKeyUnreadable", "SqlUserStore"]

MIGRATIONS = Migrations(Path(__file__).parent / "migrations")

metadata = sa.MetaData()

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("handle", sa.String(30), nullable=False, unique=True),
    sa.Column("display_name", sa.String(50), nullable=False),
    sa.Column("bio", sa.String(300), nullable=False),
    sa.Column("password_hash", sa.String(200), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("followers_count", sa.Integer, nullable=False),
    sa.Column("following_count", sa.Integer, nullable=False),
)

follows = sa.Table(
    "follows",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("follower_id", sa.String(36), nullable=False),
    sa.Column("followee_id", sa.String(36), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.UniqueConstraint("follower_id", "followee_id"),
)

signing_keys = sa.Table(
    "signing_keys",
    metadata,
    sa.Column("kid", sa.String(36), primary_key=True),
    sa.Column("private_key", sa.LargeBinary, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
)

_PUBLIC_COLUMNS = [c for c in users.c if c.name not in ("password_hash", "version")]


def _follow_page_query(user_column: sa.Column[str], other: sa.Column[str]) -> PagedQuery:
    stmt = sa.select(follows.c.id.label("follow_id"), *_PUBLIC_COLUMNS).join(users, users.c.id == other)
    return PagedQuery(
        stmt.where(user_column == sa.bindparam("user_id")), follows.c.id, cursor_key="follow_id"
    )


_USER_BY_ID = Query(sa.select(users).where(users.c.id == sa.bindparam("user_id")))
_USER_BY_HANDLE = Query(sa.select(users).where(users.c.handle == sa.bindparam("handle")))
_FOLLOWERS = _follow_page_query(follows.c.followee_id, follows.c.follower_id)
_FOLLOWING = _follow_page_query(follows.c.follower_id, follows.c.followee_id)
_UPDATE_PROFILE = Command(
    users.update()
    .where(users.c.id == sa.bindparam("user_id"))
    .values(
        display_name=sa.bindparam("new_display_name"),
        bio=sa.bindparam("new_bio"),
        version=users.c.version + 1,
    )
)
_REMOVE_FOLLOW = Command(
    follows.delete().where(
        follows.c.follower_id == sa.bindparam("follower_id"),
        follows.c.followee_id == sa.bindparam("followee_id"),
    )
)
_COUNT_FOLLOWING = add_to_counter(users.c.id, users.c.following_count)
_COUNT_FOLLOWERS = add_to_counter(users.c.id, users.c.followers_count)


class SigningKeyUnreadable(RuntimeError):
    """The stored signing key cannot be decrypted with the configured secret."""


class SqlUserTransaction(Transaction):
    """The users queries on one connection."""

    async def user_by_id(self, user_id: str) -> UserRecord | None:
        """One account by id."""
        return await self._one(_USER_BY_ID, {"user_id": user_id})

    async def user_by_handle(self, handle: str) -> UserRecord | None:
        """One account by handle."""
        return await self._one(_USER_BY_HANDLE, {"handle": handle})

    async def insert_user(self, user: UserRecord) -> bool:
        """Add an account unless the handle is taken."""
        return await insert_ignoring_conflicts(self.conn, users, user.model_dump())

    async def update_profile(self, user_id: str, display_name: str, bio: str) -> UserRecord:
        """Store a new profile and bump the version."""
        await self.conn.run(
            _UPDATE_PROFILE, {"user_id": user_id, "new_display_name": display_name, "new_bio": bio}
        )
        updated = await self.user_by_id(user_id)
        assert updated is not None
        return updated

    async def add_follow(self, follower_id: str, followee_id: str) -> bool:
        """Record a follow and count it on both accounts."""
        added = await insert_ignoring_conflicts(
            self.conn,
            follows,
            {"id": new_id(), "follower_id": follower_id, "followee_id": followee_id, "created_at": utcnow()},
        )
        if added:
            await self._count_follow(follower_id, followee_id, +1)
        return added

    async def remove_follow(self, follower_id: str, followee_id: str) -> bool:
        """Remove a follow and uncount it."""
        removed = (
            await self.conn.run(_REMOVE_FOLLOW, {"follower_id": follower_id, "followee_id": followee_id}) == 1
        )
        if removed:
            await self._count_follow(follower_id, followee_id, -1)
        return removed

    async def followers(self, user_id: str, page: PageRequest) -> Page[UserPublic]:
        """Accounts following `user_id`."""
        return await self._follow_page(_FOLLOWERS, user_id, page)

    async def following(self, user_id: str, page: PageRequest) -> Page[UserPublic]:
        """Accounts `user_id` follows."""
        return await self._follow_page(_FOLLOWING, user_id, page)

    async def _follow_page(self, query: PagedQuery, user_id: str, page: PageRequest) -> Page[UserPublic]:
        rows, cursor = await query.page(self.conn, page, user_id=user_id)
        return Page(
            items=[UserPublic.model_validate(row._asdict()) for row in rows],
            next_cursor=cursor,
        )

    async def _count_follow(self, follower_id: str, followee_id: str, delta: int) -> None:
        await self.conn.run(_COUNT_FOLLOWING, {"key": follower_id, "delta": delta})
        await self.conn.run(_COUNT_FOLLOWERS, {"key": followee_id, "delta": delta})

    async def _one(self, query: Query, parameters: dict[str, str]) -> UserRecord | None:
        rows = await self.conn.fetch(query, parameters)
        return UserRecord.model_validate(rows[0]._asdict()) if rows else None


class SqlUserStore(SqlStore[SqlUserTransaction]):
    """The users store on its own database."""

    def __init__(self, db: Database, *, secret_key: str) -> None:
        super().__init__(db, SqlUserTransaction, SERVICE)
        self._secret = secret_key.encode()
        self._signing_key: SigningKey | None = None

    async def signing_key(self) -> SigningKey:
        """The signing key, created (encrypted with the secret key) on first use."""
        if self._signing_key is None:
            async with self._db.write() as conn:
                self._signing_key = await self._load_or_create(conn)
        return self._signing_key

    async def _load_or_create(self, conn: Connection) -> SigningKey:
        row = (
            await conn.execute(sa.select(signing_keys).order_by(signing_keys.c.created_at.desc()).limit(1))
        ).first()
        if row is not None:
            try:
                private = serialization.load_pem_private_key(row.private_key, password=self._secret)
            except ValueError as exc:
                raise SigningKeyUnreadable(
                    "the token-signing key in the users database cannot be decrypted: "
                    "THREADLINE_SECRET_KEY differs from the one it was created with"
                ) from exc
            assert isinstance(private, Ed25519PrivateKey)
            return SigningKey(row.kid, private)
        key = SigningKey(new_id(), Ed25519PrivateKey.generate())
        pem = key.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(self._secret),
        )
        await conn.execute(signing_keys.insert().values(kid=key.kid, private_key=pem, created_at=utcnow()))
        return key
