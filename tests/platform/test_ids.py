"""Time-ordered ids: UUIDv7 strings that sort in the order they were made."""

import itertools
import threading
import time
import uuid

from threadline.platform.ids import id_at, new_id

COUNT = 10_000


def test_new_id_is_a_canonical_uuid_version_7_with_the_rfc_variant() -> None:
    """Every id parses as a UUID of version 7 and the RFC 9562 variant, written in canonical form."""
    for _ in range(1000):
        text = new_id()
        parsed = uuid.UUID(text)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
        assert len(text) == 36


def test_new_id_carries_the_current_unix_time_in_milliseconds() -> None:
    """The first 48 bits of an id are the wall-clock time at which it was made."""
    before_ms = time.time_ns() // 1_000_000
    value = uuid.UUID(new_id()).int
    after_ms = time.time_ns() // 1_000_000
    assert before_ms <= value >> 80 <= after_ms + 5


def test_new_ids_are_unique_and_strictly_increasing_in_generation_order() -> None:
    """Ten thousand ids made in a row are all distinct and each sorts after the one before, as text."""
    ids = [new_id() for _ in range(COUNT)]
    assert len(set(ids)) == COUNT
    assert all(earlier < later for earlier, later in itertools.pairwise(ids))
    numbers = [uuid.UUID(text).int for text in ids]
    assert all(earlier < later for earlier, later in itertools.pairwise(numbers))


def test_new_ids_made_on_many_threads_are_unique_and_increasing_per_thread() -> None:
    """Threads sharing the generator never get the same id, and each thread's ids keep increasing."""
    results: dict[int, list[str]] = {}

    def make(index: int) -> None:
        results[index] = [new_id() for _ in range(2000)]

    threads = [threading.Thread(target=make, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [text for ids in results.values() for text in ids]
    assert len(set(every)) == len(every) == 8000
    for ids in results.values():
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)


def test_id_at_carries_the_given_instant_and_sorts_by_it() -> None:
    """An id made for a past instant is a UUIDv7 of that millisecond; later instants sort after it."""
    instants = [1_600_000_000_000 + step * 7 for step in range(100)]
    ids = [id_at(ms) for ms in instants]
    for ms, text in zip(instants, ids, strict=True):
        value = uuid.UUID(text)
        assert value.version == 7
        assert value.variant == uuid.RFC_4122
        assert value.int >> 80 == ms
    assert ids == sorted(ids)
    assert max(ids) < new_id()
