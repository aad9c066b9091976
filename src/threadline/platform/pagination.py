"""Cursor pagination shared by every list: newest first, the last id on a page is the cursor."""

from typing import Annotated, Generic, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "Page", "PageRequest", "Paging", "page_request"]

DEFAULT_LIMIT = 20
MAX_LIMIT = 100

T = TypeVar("T")


class PageRequest(BaseModel):
    """Which page to read: at most `limit` items older than `cursor`."""

    limit: int = DEFAULT_LIMIT
    cursor: str | None = None


class Page(BaseModel, Generic[T]):
    """One page of items and the cursor of the next, if any."""

    items: list[T]
    next_cursor: str | None = None


async def page_request(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> PageRequest:
    """FastAPI dependency reading `?limit=&cursor=` with API.md's bounds."""
    return PageRequest(limit=limit, cursor=cursor)


Paging = Annotated[PageRequest, Depends(page_request)]
"""A route parameter holding the requested page."""
