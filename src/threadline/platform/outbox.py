"""The outbox relay: publishes what services wrote to their outbox, in order, until acknowledged."""

import asyncio
import contextlib
import logging
import time
from datetime import timedelta

import sqlalchemy as sa

from threadline.platform.clock import utcnow
from threadline.platform.db import Command, Database, Query, outbox_table
from threadline.platform.durability import SETTLE_AFTER_S, Deferral, SettleWindow, deferring
from threadline.platform.events import Bus, Event

__all__ = ["OutboxRelay"]

log = logging.getLogger(__name__)

_SENT_ROWS_KEPT_FOR = timedelta(hours=1)
# A short DELETE per batch of the oldest rows, not one scan of the whole outbox: the relay runs on
# the loop that serves requests, and the outbox has no index on sent_at.
_PRUNE_OLDEST = Command(
    outbox_table.delete().where(
        outbox_table.c.seq.in_(
            sa.select(outbox_table.c.seq)
            .order_by(outbox_table.c.seq)
            .limit(sa.bindparam("batch", type_=sa.Integer))
            .scalar_subquery()
        ),
        outbox_table.c.sent_at < sa.bindparam("sent_before"),
    )
)
# Past those published and waiting for their mark (`after`): on PostgreSQL a lower seq can commit
# after a higher one, and such an event is found once the window is settled, with `after` 0 again.
_UNSENT = Query(
    sa.select(outbox_table.c.seq, outbox_table.c.body)
    .where(outbox_table.c.sent_at.is_(None), outbox_table.c.seq > sa.bindparam("after", type_=sa.Integer))
    .order_by(outbox_table.c.seq)
    .limit(sa.bindparam("batch", type_=sa.Integer))
)
_MARK_SENT = Command(
    outbox_table.update()
    .where(outbox_table.c.seq.in_(sa.bindparam("seqs", expanding=True)))
    .values(sent_at=sa.bindparam("sent_at"))
)


class OutboxRelay:
    """Moves events from one database's outbox onto the bus; marks each sent only once published.

    In one process with its consumers (the in-process bus), an event counts as published once
    what its handlers wrote is on the disk: their commits do not wait for it (see `durability`),
    and the relay syncs their databases once per `settle_after_s`, then marks the events sent.
    """

    def __init__(
        self,
        db: Database,
        bus: Bus,
        *,
        name: str,
        poll_seconds: float = 1.0,
        batch: int = 100,
        prune_every_s: float = 600.0,
        prune_batch: int = 1000,
        settle_after_s: float = SETTLE_AFTER_S,
    ) -> None:
        self._db = db
        self._bus = bus
        self._name = name
        self._poll_seconds = poll_seconds
        self._batch = batch
        self._prune_every_s = prune_every_s
        self._prune_batch = prune_batch
        self._wakeup = asyncio.Event()
        self._unmarked: SettleWindow[int] = SettleWindow(
            self._mark_sent, settle_after_s=settle_after_s, most=batch
        )
        db.on_events_committed(self.wake)

    def wake(self) -> None:
        """Look at the outbox now rather than at the next poll."""
        self._wakeup.set()

    async def drain(self) -> int:
        """Publish every unsent event, oldest first, and mark them sent; returns how many were published.

        A crash before the mark publishes them again, which the bus's deduplication and the
        consumers' guard absorb. For the same reason the mark is not waited onto the disk (a
        non-durable commit): losing it with the machine costs a redelivery, and saves a disk sync.
        """
        try:
            return await self._publish_unsent()
        finally:
            await self._unmarked.settle()

    async def _publish_unsent(self) -> int:
        """Publish what is unsent and not waiting for its mark, oldest first; how many were published.

        A short batch ends it: anything committed since woke the relay for another one.
        """
        published = 0
        while True:
            await self._db.sync_events()
            after = self._unmarked.newest() or 0
            async with self._db.read() as conn:
                rows = await conn.fetch(_UNSENT, {"batch": self._batch, "after": after})
            if not rows:
                return published
            deferral = Deferral()
            with deferring(deferral):
                for seq, body in rows:
                    await self._bus.publish(Event.from_json(body))
                    self._unmarked.add(seq, deferral)
                    published += 1
                    # In one process the handlers' commits return without a thread hand-off, so
                    # without this a batch of a hundred events would hold the loop from requests.
                    await asyncio.sleep(0)
            if len(rows) < self._batch:
                return published
            # A backlog is published a batch at a time; its marks must not wait for the end of it.
            await self._unmarked.settle_if_due()

    async def _mark_sent(self, seqs: list[int]) -> None:
        async with self._db.write(durable=False) as conn:
            await conn.run(_MARK_SENT, {"seqs": seqs, "sent_at": utcnow()})

    async def prune(self) -> int:
        """Forget events published long enough ago, oldest first, a batch per transaction; how many."""
        sent_before = utcnow() - _SENT_ROWS_KEPT_FOR
        pruned = 0
        while True:
            async with self._db.write(durable=False) as conn:
                deleted = await conn.run(
                    _PRUNE_OLDEST, {"batch": self._prune_batch, "sent_before": sent_before}
                )
            pruned += deleted
            if deleted < self._prune_batch:
                return pruned

    async def run(self) -> None:
        """Relay forever: on every wake-up and every poll interval; back off while the bus is down.

        Cancelled, it first marks what its consumers have synced, so that a restart does not
        deliver those again.
        """
        try:
            await self._relay()
        except asyncio.CancelledError:
            try:
                await self._unmarked.settle()
            except Exception as exc:
                log.warning("outbox relay %s: marking at stop failed (%s); sent again later", self._name, exc)
            raise

    async def _relay(self) -> None:
        backoff = self._poll_seconds
        # By the clock, not by drains: a busy service drains hundreds of times a second.
        prune_at = time.monotonic()
        while True:
            self._wakeup.clear()
            try:
                # Settled first: with none waiting, the read below also finds any event that
                # committed behind one already published.
                await self._unmarked.settle_if_due()
                await self._publish_unsent()
                backoff = self._poll_seconds
                if time.monotonic() >= prune_at:
                    await self.prune()
                    prune_at = time.monotonic() + self._prune_every_s
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox relay %s: publish failed (%s); retrying", self._name, exc)
                backoff = min(backoff * 2, 5.0)
                await asyncio.sleep(backoff)
                continue
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
            # arrives as the wake-up does, and the relay would then never stop.
            due = self._unmarked.due_in()
            wait_s = self._poll_seconds if due is None else min(due, self._poll_seconds)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._wakeup.wait()
