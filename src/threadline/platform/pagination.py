"""Cursor pagination shared by every list: newest first, the last id on a page is the cursor."""

from typing import Annotated, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "Page", "PageQuery", "PageRequest", "Paging"]

DEFAULT_LIMIT = 20
MAX_LIMIT = 100

T = TypeVar("T")


class PageRequest(BaseModel):
    """Which page to read: at most `limit` items older than `cursor`."""

    # Immutable, so that one parsed request can be shared by every request asking the same.
    model_config = ConfigDict(frozen=True)

    limit: int = DEFAULT_LIMIT
    cursor: str | None = None


class Page(BaseModel, Generic[T]):
    """One page of items and the cursor of the next, if any."""

    items: list[T]
    next_cursor: str | None = None


class PageQuery(PageRequest):
    """A page as asked for in `?limit=&cursor=`, within API.md's bounds."""

    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)
    cursor: str | None = Field(None, max_length=64)


# One model for both query parameters: FastAPI validates it in one step, where a dependency
# with two parameters of its own cost it several times the CPU.
Paging = Annotated[PageQuery, Query()]
"""A route parameter holding the requested page."""
