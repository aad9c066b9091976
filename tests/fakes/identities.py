"""Verified callers for tests of an application layer, without a users service."""

from threadline.platform.ids import new_id
from threadline.platform.tokens import Identity


def identity(handle: str, display_name: str = "") -> Identity:
    """A verified caller with a fresh account id, as a token's claims would give it."""
    return Identity(user_id=new_id(), handle=handle, display_name=display_name, token="test-token")
