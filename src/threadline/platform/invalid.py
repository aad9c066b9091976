"""Input checks that every service phrases the same way."""

from collections.abc import Sized

from threadline.platform.errors import FieldError, InvalidRequest

__all__ = ["require_batch_size"]


def require_batch_size(field: str, items: Sized, limit: int) -> None:
    """Refuse a batch larger than `limit` with a 422."""
    if len(items) > limit:
        message = f"at most {limit} items per call"
        raise InvalidRequest(f"{field}: {message}", [FieldError(field, message)])
