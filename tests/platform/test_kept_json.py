"""Answers listing frozen models first: the same bytes as pydantic's, each item rendered once while kept;
parsed into the same models as pydantic's, each distinct item validated once while remembered."""

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_serializer

from threadline.platform.kept_json import ItemsByJson, KeptJson, leading_list_renderer
from threadline.platform.pagination import Page


class Author(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str


class Post(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    author: Author
    text: str | None
    at: datetime
    likes: int = 0


class PostPage(Page[Post]):
    degraded: list[str] = []


class OnlyPosts(BaseModel):
    items: list[Post]


class TaggedPost(Post):
    tag: str = "extra"


def post(n: int, text: str | None = "plain") -> Post:
    at = datetime(2026, 11, 28, 4, n, n, n * 1000, tzinfo=UTC)
    return Post(id=f"p{n}", author=Author(id="a", name='Ada "the first" ✓'), text=text, at=at, likes=n)


def pydantic_json(model: BaseModel) -> bytes:
    rendered: bytes = TypeAdapter(type(model)).dump_json(model, by_alias=True)
    return rendered


@pytest.mark.parametrize(
    "answer",
    [
        PostPage(items=[]),
        PostPage(items=[post(1)], next_cursor="p1"),
        PostPage(items=[post(1), post(2, text=None), post(3, text='é\n\t"</script>')], degraded=["payments"]),
        OnlyPosts(items=[]),
        OnlyPosts(items=[post(4), post(5)]),
    ],
)
def test_an_answer_is_rendered_as_pydantic_renders_it(answer: BaseModel) -> None:
    render = leading_list_renderer(type(answer), KeptJson(by_alias=True))
    assert render is not None
    assert render(answer) == pydantic_json(answer)
    # Again, its items now kept: still the same bytes.
    assert render(answer) == pydantic_json(answer)


def test_an_item_is_rendered_once_while_it_lives_and_let_go_when_it_dies() -> None:
    kept = KeptJson(by_alias=True)
    first, second = post(1), post(2)
    rendered = kept.of(first)
    # Forced past its freezing, the kept object shows what it was rendered as.
    object.__setattr__(first, "likes", 99)
    assert kept.of(first) == rendered
    kept.of(second)
    assert len(kept) == 2
    del first
    assert len(kept) == 1
    del second
    assert len(kept) == 0


def test_an_equal_object_is_rendered_on_its_own() -> None:
    kept = KeptJson(by_alias=True)
    original = post(1)
    kept.of(original)
    changed = original.model_copy(update={"text": "edited"})
    assert b'"text":"edited"' in kept.of(changed)


def test_an_item_of_another_class_than_the_lists_is_left_to_pydantic() -> None:
    render = leading_list_renderer(PostPage, KeptJson(by_alias=True))
    assert render is not None
    answer = PostPage(items=[post(1), TaggedPost(**post(2).model_dump())])
    assert render(answer) is None


class Unfrozen(BaseModel):
    id: str


class ListOfUnfrozen(BaseModel):
    items: list[Unfrozen]


class ListSecond(BaseModel):
    cursor: str | None
    items: list[Post]


class Aliased(BaseModel):
    items: list[Post] = Field(serialization_alias="posts")


class SerializedItsOwnWay(BaseModel):
    items: list[Post]
    note: str

    @field_serializer("note")
    def shout(self, note: str) -> str:
        return note.upper()


class HoldsUnfrozen(BaseModel):
    model_config = ConfigDict(frozen=True)

    author: Unfrozen | None


class HoldsAList(BaseModel):
    model_config = ConfigDict(frozen=True)

    tags: list[str]


class ListOfHoldsUnfrozen(BaseModel):
    items: list[HoldsUnfrozen]


class ListOfHoldsAList(BaseModel):
    items: list[HoldsAList]


@pytest.mark.parametrize(
    "model",
    [ListOfUnfrozen, ListSecond, Aliased, SerializedItsOwnWay, Author, ListOfHoldsUnfrozen, ListOfHoldsAList],
)
def test_models_of_another_shape_are_left_to_pydantic(model: Any) -> None:
    assert leading_list_renderer(model, KeptJson(by_alias=True)) is None


@pytest.mark.parametrize(
    "answer",
    [
        PostPage(items=[]),
        PostPage(items=[post(1), post(2, text=None)], next_cursor="p2", degraded=["payments"]),
        OnlyPosts(items=[post(3), post(3), post(4, text='é\n\t"</script>')]),
    ],
)
def test_an_answer_is_parsed_as_pydantic_parses_it(answer: BaseModel) -> None:
    body = pydantic_json(answer)
    items = ItemsByJson(size=100)
    first = items.parse(type(answer), body)
    assert first == type(answer).model_validate_json(body)
    # Again, its items now remembered: an equal answer.
    assert items.parse(type(answer), body) == first


def test_an_item_seen_before_in_the_same_json_is_the_same_object() -> None:
    items = ItemsByJson(size=100)
    first = items.parse(PostPage, pydantic_json(PostPage(items=[post(1), post(2)])))
    later = items.parse(OnlyPosts, pydantic_json(OnlyPosts(items=[post(2), post(1), post(5)])))
    assert later.items[0] is first.items[1]
    assert later.items[1] is first.items[0]
    assert len(items) == 3
    # Its JSON kept once serves every answer it is in.
    kept = KeptJson(by_alias=True)
    assert kept.of(later.items[0]) is kept.of(first.items[1])


def test_an_item_whose_json_changed_is_parsed_again() -> None:
    items = ItemsByJson(size=100)
    before = items.parse(OnlyPosts, pydantic_json(OnlyPosts(items=[post(1)])))
    liked = post(1).model_copy(update={"likes": 7})
    after = items.parse(OnlyPosts, pydantic_json(OnlyPosts(items=[liked])))
    assert after.items[0] is not before.items[0]
    assert after.items[0].likes == 7


def test_only_the_most_recently_used_items_are_remembered() -> None:
    items = ItemsByJson(size=2)
    first = items.parse(OnlyPosts, pydantic_json(OnlyPosts(items=[post(1), post(2), post(3)])))
    assert len(items) == 2
    again = items.parse(OnlyPosts, pydantic_json(OnlyPosts(items=[post(3), post(1)])))
    assert again.items[0] is first.items[2]
    assert again.items[1] is not first.items[0]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"items": "none"}',
        b'{"items": [{"id": "p1"}]}',
        orjson.dumps({"items": [], "next_cursor": 5}),
    ],
)
def test_an_answer_that_does_not_fit_raises_as_pydantic_does(body: bytes) -> None:
    with pytest.raises(ValidationError):
        ItemsByJson(size=100).parse(PostPage, body)


def test_an_answer_of_another_shape_is_parsed_whole() -> None:
    answer = ListOfUnfrozen(items=[Unfrozen(id="u1")])
    items = ItemsByJson(size=100)
    assert items.parse(ListOfUnfrozen, pydantic_json(answer)) == answer
    assert len(items) == 0
