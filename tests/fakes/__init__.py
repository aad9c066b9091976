"""Hand-written in-memory fakes of the services' ports, with the semantics of the real adapters."""

from tests.fakes.posts import FakePostStore
from tests.fakes.users import FakeUserStore

__all__ = ["FakePostStore", "FakeUserStore"]
