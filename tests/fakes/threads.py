"""An in-memory `ThreadStore` with the semantics of `SqlThreadStore`, and a fake of posts' batch read."""

from dataclasses import dataclass, field
from typing import NoReturn

from tests.fakes.store import FakeState, FakeStore, FakeTransaction
from threadline.platform.clock import utcnow
from threadline.platform.errors import ServiceUnavailable
from threadline.platform.events import Event
from threadline.platform.ids import new_id
from threadline.platform.invalid import require_batch_size
from threadline.platform.pagination import PageRequest
from threadline.platform.tokens import Identity
from threadline.services.posts.api import (
    MAX_BATCH,
    Audience,
    AuthorPublic,
    PostCreate,
    PostCreated,
    PostDeleted,
    PostPage,
    PostPublic,
    PostRead,
    PostsRead,
)
from threadline.services.posts.api import SERVICE as POSTS
from threadline.services.threads.api import SERVICE
from threadline.services.threads.service import ThreadNode

__all__ = ["AUTHOR", "BatchRead", "FakePosts", "FakeThreadStore", "FakeThreadTransaction", "ThreadState"]


@dataclass
class ThreadState(FakeState):
    """The threads service's table of nodes, tombstones included."""

    nodes: dict[str, ThreadNode] = field(default_factory=dict)


class FakeThreadTransaction(FakeTransaction[ThreadState]):
    """The threads queries over one in-memory transaction."""

    def __init__(self, state: ThreadState, writable: bool) -> None:
        super().__init__(state, SERVICE, writable=writable)

    async def conversation(self, post_id: str) -> list[ThreadNode]:
        """Every node sharing `post_id`'s root, in no particular order (the port promises none)."""
        nodes = self._read().nodes
        asked = nodes.get(post_id)
        if asked is None:
            return []
        return [node.model_copy() for node in reversed(nodes.values()) if node.root_id == asked.root_id]

    async def add_node(self, node: ThreadNode) -> bool:
        """Store a node unless its id is known."""
        nodes = self._write().nodes
        if node.id in nodes:
            return False
        nodes[node.id] = node.model_copy()
        return True

    async def bury_node(self, node: ThreadNode) -> None:
        """Mark a node deleted, or store its tombstone."""
        nodes = self._write().nodes
        stored = nodes.get(node.id)
        if stored is None:
            nodes[node.id] = node.model_copy(update={"deleted": True})
        else:
            stored.deleted = True


class FakeThreadStore(FakeStore[ThreadState, FakeThreadTransaction]):
    """The threads store in memory."""

    def __init__(self) -> None:
        super().__init__(ThreadState(), FakeThreadTransaction)


@dataclass(frozen=True)
class BatchRead:
    """One `get_posts` call as the fake received it."""

    post_ids: list[str]
    viewer: Identity | None


AUTHOR = AuthorPublic(id="author-1", handle="ann", display_name="Ann")


class FakePosts:
    """PostsApi's batch read over posts the test published; every other operation is out of bounds.

    `publish` and `delete` change what is readable and return the event the posts service would
    emit, for the test to deliver when (and as often as) it likes. `degraded` is reported with
    every answer; `unavailable` makes every call fail as a down posts service does. `reads`
    records each call, for assertions on batching and viewers.
    """

    def __init__(self) -> None:
        self.posts: dict[str, PostPublic] = {}
        self.degraded: list[str] = []
        self.unavailable = False
        self.reads: list[BatchRead] = []

    def publish(
        self, reply_to: PostPublic | None = None, *, text: str = "hello", audience: Audience = "public"
    ) -> tuple[PostPublic, Event]:
        """A new readable post (a reply when `reply_to` is given) and its post.created event."""
        post_id = new_id()
        post = PostPublic(
            id=post_id,
            author=AUTHOR,
            text=text,
            reply_to=None if reply_to is None else reply_to.id,
            root_id=post_id if reply_to is None else reply_to.root_id,
            audience=audience,
            created_at=utcnow(),
            like_count=0,
            reply_count=0,
            liked_by_me=False,
            locked=False,
        )
        self.posts[post.id] = post
        created = PostCreated(
            id=post.id,
            author=post.author,
            text=text,
            reply_to=post.reply_to,
            root_id=post.root_id,
            audience=audience,
            created_at=post.created_at,
        )
        return post, Event.of(POSTS, created)

    def delete(self, post: PostPublic) -> Event:
        """Make a post unreadable and return its post.deleted event."""
        self.posts.pop(post.id, None)
        deleted = PostDeleted(
            id=post.id, author_id=post.author.id, reply_to=post.reply_to, root_id=post.root_id
        )
        return Event.of(POSTS, deleted)

    async def get_posts(self, post_ids: list[str], viewer: Identity | None) -> PostsRead:
        """The known posts among `post_ids`, in the order asked; at most MAX_BATCH ids."""
        require_batch_size("post_ids", post_ids, MAX_BATCH)
        self.reads.append(BatchRead(list(post_ids), viewer))
        if self.unavailable:
            raise ServiceUnavailable(POSTS, "fake posts is down")
        items = [self.posts[i] for i in dict.fromkeys(post_ids) if i in self.posts]
        return PostsRead(items=items, degraded=list(self.degraded))

    async def create_post(self, identity: Identity, data: PostCreate) -> PostPublic:
        """Not used by threads."""
        _out_of_bounds("create_post")

    async def get_post(self, post_id: str, viewer: Identity | None) -> PostRead:
        """Not used by threads."""
        _out_of_bounds("get_post")

    async def delete_post(self, identity: Identity, post_id: str) -> None:
        """Not used by threads."""
        _out_of_bounds("delete_post")

    async def like(self, identity: Identity, post_id: str) -> None:
        """Not used by threads."""
        _out_of_bounds("like")

    async def unlike(self, identity: Identity, post_id: str) -> None:
        """Not used by threads."""
        _out_of_bounds("unlike")

    async def posts_by_author(self, author_id: str, page: PageRequest, viewer: Identity | None) -> PostPage:
        """Not used by threads."""
        _out_of_bounds("posts_by_author")


def _out_of_bounds(operation: str) -> NoReturn:
    raise NotImplementedError(f"threads must not call PostsApi.{operation}")
