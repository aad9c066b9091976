"""Handlers for the events the threads service consumes: posts published and deleted."""

from threadline.platform.events import Event, EventHandler
from threadline.services.posts.api import PostCreated, PostDeleted
from threadline.services.threads.service import ThreadNode, ThreadsService

__all__ = ["handlers"]


def handlers(service: ThreadsService) -> dict[str, EventHandler]:
    """Event type -> handler."""

    async def on_post_created(event: Event) -> None:
        post = PostCreated.model_validate(event.data)
        await service.add_post(
            event.id, ThreadNode(id=post.id, parent_id=post.reply_to, root_id=post.root_id)
        )

    async def on_post_deleted(event: Event) -> None:
        post = PostDeleted.model_validate(event.data)
        await service.remove_post(
            event.id, ThreadNode(id=post.id, parent_id=post.reply_to, root_id=post.root_id)
        )

    return {PostCreated.TYPE: on_post_created, PostDeleted.TYPE: on_post_deleted}
