"""The bounded most-recently-used map behind the token and handle memories."""

import pytest

from threadline.platform.lru import LruCache


def test_the_least_recently_used_entry_is_forgotten_first() -> None:
    """Reading an entry keeps it; the entry neither read nor written longest goes when full."""
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    assert len(cache) == 2


def test_rewriting_an_entry_refreshes_it_and_forget_and_clear_drop_entries() -> None:
    """put on a known key replaces its value and makes it the newest; forget/clear remove."""
    cache: LruCache[str, int] = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 10)
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b")) == (10, None)
    cache.forget("a")
    cache.forget("never there")
    assert cache.get("a") is None
    cache.clear()
    assert len(cache) == 0


def test_a_cache_needs_room_for_one_entry() -> None:
    """A size below one is refused."""
    with pytest.raises(ValueError, match="at least 1"):
        LruCache[str, int](0)
