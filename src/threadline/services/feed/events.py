"""Handlers for the events the feed service consumes: new and deleted posts, follows and unfollows."""

from threadline.platform.events import Event, EventHandler
from threadline.services.feed.service import FeedService
from threadline.services.posts.api import PostCreated, PostDeleted
from threadline.services.users.api import UserFollowed, UserUnfollowed

__all__ = ["handlers"]


def handlers(service: FeedService) -> dict[str, EventHandler]:
    """Event type -> handler."""

    async def on_post_created(event: Event) -> None:
        await service.record_post(event.id, PostCreated.model_validate(event.data))

    async def on_post_deleted(event: Event) -> None:
        await service.forget_post(event.id, PostDeleted.model_validate(event.data))

    async def on_user_followed(event: Event) -> None:
        await service.record_follow(event.id, UserFollowed.model_validate(event.data))

    async def on_user_unfollowed(event: Event) -> None:
        await service.record_unfollow(event.id, UserUnfollowed.model_validate(event.data))

    return {
        PostCreated.TYPE: on_post_created,
        PostDeleted.TYPE: on_post_deleted,
        UserFollowed.TYPE: on_user_followed,
        UserUnfollowed.TYPE: on_user_unfollowed,
    }
