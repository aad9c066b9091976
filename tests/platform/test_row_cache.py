"""The cache of rows a process read from its own database: kept until a write changes them."""

from threadline.platform.row_cache import RowCache


def test_a_read_keeps_its_rows_until_a_write_forgets_them() -> None:
    """Rows remembered by a read are served until forgotten; the rows a write did not name stay."""
    cache: RowCache[str, int] = RowCache(10)
    since = cache.version()
    cache.remember("a", 1, read_since=since)
    cache.remember("b", 2, read_since=since)
    assert (cache.get("a"), cache.get("b")) == (1, 2)
    cache.forget(["a"])
    assert (cache.get("a"), cache.get("b")) == (None, 2)
    cache.forget_all()
    assert (cache.get("b"), len(cache)) == (None, 0)


def test_a_read_that_began_before_a_write_ended_keeps_nothing() -> None:
    """Whatever a write forgot, a read begun before it may hold older rows: none of them are kept."""
    cache: RowCache[str, int] = RowCache(10)
    older = cache.version()
    cache.forget(["unrelated"])
    cache.remember("a", 1, read_since=older)
    assert cache.get("a") is None
    newer = cache.version()
    cache.forget_all()
    cache.remember("a", 1, read_since=newer)
    assert cache.get("a") is None
    cache.remember("a", 1, read_since=cache.version())
    assert cache.get("a") == 1


def test_it_keeps_the_most_recently_used_rows() -> None:
    """Beyond its size, the row least recently read or remembered goes first."""
    cache: RowCache[str, int] = RowCache(2)
    since = cache.version()
    cache.remember("a", 1, read_since=since)
    cache.remember("b", 2, read_since=since)
    assert cache.get("a") == 1
    cache.remember("c", 3, read_since=since)
    assert (cache.get("a"), cache.get("b"), cache.get("c"), len(cache)) == (1, None, 3, 2)
