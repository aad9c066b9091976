"""Time-ordered identifiers (UUIDv7, RFC 9562) used as ids and as pagination cursors."""

import os
import threading
import time
import uuid

__all__ = ["id_at", "new_id"]

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def new_id() -> str:
    """Return a new UUIDv7 string; ids made later in this process always sort after earlier ones."""
    global _last_ms, _counter
    with _lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms > _last_ms:
            _last_ms = now_ms
            _counter = int.from_bytes(os.urandom(2), "big") & 0x3FF
        else:
            # Same millisecond (or the clock stepped back): keep order with a 12-bit counter.
            _counter += 1
            if _counter > 0xFFF:
                _last_ms += 1
                _counter = 0
        ms, seq = _last_ms, _counter
    return _uuid7(ms, seq)


def id_at(ms: int) -> str:
    """A UUIDv7 of an instant given in ms since the epoch (for data dated in the past, e.g. bulk loads)."""
    return _uuid7(ms, int.from_bytes(os.urandom(2), "big") & 0xFFF)


def _uuid7(ms: int, seq: int) -> str:
    tail = int.from_bytes(os.urandom(8), "big") & 0x3FFF_FFFF_FFFF_FFFF
    value = (ms << 80) | (0x7 << 76) | (seq << 64) | (0b10 << 62) | tail
    return str(uuid.UUID(int=value))
