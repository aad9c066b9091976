"""The threads application layer: implements ThreadsApi over its store of reply trees."""

from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from pydantic import BaseModel

from threadline.platform.tokens import Identity
from threadline.services.posts.api import MAX_BATCH, PostPublic, PostsApi
from threadline.services.threads.api import ThreadNotFound, ThreadPublic, ThreadReply

__all__ = ["ThreadNode", "ThreadStore", "ThreadTransaction", "ThreadsService"]

CONSUMER = "threads"


class ThreadNode(BaseModel):
    """A post's place in its conversation; a deleted one stays as a tombstone that keeps the shape."""

    id: str
    parent_id: str | None
    root_id: str
    deleted: bool = False


class ThreadTransaction(Protocol):
    """Reads and writes of the threads store inside one transaction."""

    async def conversation(self, post_id: str) -> list[ThreadNode]:
        """Every node, tombstones included, sharing `post_id`'s root; empty if `post_id` is unknown."""

    async def add_node(self, node: ThreadNode) -> bool:
        """Store a node unless its id is known (a tombstone stays a tombstone); False if known."""

    async def bury_node(self, node: ThreadNode) -> None:
        """Mark a node deleted, storing it as a tombstone if it is not known yet."""

    async def claim_event(self, consumer: str, event_id: str) -> bool:
        """False if this event was handled before."""


class ThreadStore(Protocol):
    """The threads service's persistence port."""

    def write(self) -> AbstractAsyncContextManager[ThreadTransaction]:
        """A write transaction."""

    def read(self) -> AbstractAsyncContextManager[ThreadTransaction]:
        """A read-only transaction."""


class ThreadsService:
    """Whole conversations: the reply tree is kept here, the post bodies are read from posts."""

    def __init__(self, store: ThreadStore, posts: PostsApi) -> None:
        self._store = store
        self._posts = posts

    async def get_thread(self, post_id: str, viewer: Identity | None) -> ThreadPublic:
        """The live conversation containing `post_id`, replies depth-first, oldest sibling first."""
        async with self._store.read() as tx:
            nodes = {node.id: node for node in await tx.conversation(post_id)}
        asked = nodes.get(post_id)
        root = None if asked is None else nodes.get(asked.root_id)
        if asked is None or asked.deleted or root is None or root.deleted:
            raise ThreadNotFound(f"no post with id {post_id!r}")
        placed = list(_depth_first(root, nodes))
        if post_id not in {node.id for node, _ in placed}:
            # Its ancestors' events have not all arrived yet, so it has no place in the tree.
            raise ThreadNotFound(f"no post with id {post_id!r}")
        live = [(node.id, depth) for node, depth in placed if not node.deleted]
        posts, degraded = await self._bodies([node_id for node_id, _ in live], viewer)
        if root.id not in posts:
            raise ThreadNotFound(f"no post with id {post_id!r}")
        replies = [
            ThreadReply(**posts[node_id].model_dump(), depth=depth)
            for node_id, depth in live[1:]
            if node_id in posts
        ]
        return ThreadPublic(root=posts[root.id], replies=replies, degraded=degraded)

    async def add_post(self, event_id: str, node: ThreadNode) -> None:
        """Place a new post in its conversation (from post.created), once per event."""
        async with self._store.write() as tx:
            if await tx.claim_event(CONSUMER, event_id):
                await tx.add_node(node)

    async def remove_post(self, event_id: str, node: ThreadNode) -> None:
        """Take a deleted post out of its conversation (from post.deleted), once per event."""
        async with self._store.write() as tx:
            if await tx.claim_event(CONSUMER, event_id):
                await tx.bury_node(node.model_copy(update={"deleted": True}))

    async def _bodies(
        self, post_ids: list[str], viewer: Identity | None
    ) -> tuple[dict[str, PostPublic], list[str]]:
        """The posts as `viewer` sees them, read in batches, and every service posts did without."""
        found: dict[str, PostPublic] = {}
        degraded: set[str] = set()
        for start in range(0, len(post_ids), MAX_BATCH):
            read = await self._posts.get_posts(post_ids[start : start + MAX_BATCH], viewer)
            found.update((post.id, post) for post in read.items)
            degraded.update(read.degraded)
        return found, sorted(degraded)


def _depth_first(root: ThreadNode, nodes: dict[str, ThreadNode]) -> Iterator[tuple[ThreadNode, int]]:
    """The root and every node reachable from it with its depth, depth-first, oldest sibling first."""
    children: defaultdict[str, list[ThreadNode]] = defaultdict(list)
    for node in nodes.values():
        if node.parent_id is not None and node.id != root.id:
            children[node.parent_id].append(node)
    # Iterative, not recursive: a conversation may be deeper than Python's recursion limit.
    stack = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        yield node, depth
        stack.extend((child, depth + 1) for child in sorted(children[node.id], key=_by_id, reverse=True))


def _by_id(node: ThreadNode) -> str:
    return node.id
