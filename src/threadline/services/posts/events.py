"""Handlers for the events the posts service consumes: profile changes of authors."""

from threadline.platform.events import Event, EventHandler
from threadline.services.posts.service import AuthorSnapshot, PostsService
from threadline.services.users.api import UserRegistered, UserUpdated

__all__ = ["handlers"]


def handlers(service: PostsService) -> dict[str, EventHandler]:
    """Event type -> handler."""

    async def on_user_registered(event: Event) -> None:
        user = UserRegistered.model_validate(event.data)
        snapshot = AuthorSnapshot(id=user.id, handle=user.handle, display_name=user.display_name, version=1)
        await service.apply_author_profile(event.id, snapshot)

    async def on_user_updated(event: Event) -> None:
        user = UserUpdated.model_validate(event.data)
        snapshot = AuthorSnapshot(
            id=user.id, handle=user.handle, display_name=user.display_name, version=user.version
        )
        await service.apply_author_profile(event.id, snapshot)

    return {UserRegistered.TYPE: on_user_registered, UserUpdated.TYPE: on_user_updated}
