"""Answers that list immutable models, each model's JSON rendered once and kept, or parsed once.

A service may hand out the same immutable (frozen) model object to many requests: the posts
service shares one view of a post among every viewer who sees it the default way. Rendering a
page of twenty such posts took pydantic about as long as the rest of the route's own work
around it; here each object's JSON is rendered once, kept while the object lives, and pages are
put together from the kept pieces. The bytes are pydantic's
own: each item by its model's serializer, the rest of the answer by the answer's.

The caller of such a service reads the same items again and again (feed, twenty posts from posts
for every timeline read): `ItemsByJson` validates each distinct item once and hands out the same
object for the same JSON after that, so that its kept rendering serves every answer it is in.
"""

import weakref
from collections.abc import Callable
from functools import cache
from inspect import isclass
from typing import Any, TypeVar, get_args, get_origin

import orjson
from pydantic import BaseModel

from threadline.platform.lru import LruCache

__all__ = ["ItemsByJson", "KeptJson", "Renderer", "leading_list_renderer"]

ModelT = TypeVar("ModelT", bound=BaseModel)

Renderer = Callable[[BaseModel], bytes | None]
"""Renders an answer, or gives None for one it cannot render as pydantic would."""


class KeptJson:
    """The JSON of frozen model objects, each rendered once and kept for as long as it lives.

    Kept by the object's identity and let go when the object dies (a weak reference's callback,
    run before its identity can be another's): an object a service holds on to, such as a post
    it keeps in memory, is rendered once; one that lives for one answer costs one rendering and
    holds no memory after it.
    """

    def __init__(self, *, by_alias: bool) -> None:
        self.by_alias = by_alias
        self._kept: dict[int, tuple[weakref.ref[BaseModel], bytes]] = {}

    def __len__(self) -> int:
        """How many objects' JSON is kept."""
        return len(self._kept)

    def of(self, model: BaseModel) -> bytes:
        """The JSON of `model`, which must be frozen all the way down."""
        key = id(model)
        kept = self._kept.get(key)
        if kept is not None and kept[0]() is model:
            return kept[1]
        rendered: bytes = model.__pydantic_serializer__.to_json(model, by_alias=self.by_alias)
        try:
            ref = weakref.ref(model, self._forgetter(key))
        except TypeError:
            return rendered  # a class without weak references: rendered every time
        self._kept[key] = (ref, rendered)
        return rendered

    def _forgetter(self, key: int) -> Callable[["weakref.ref[BaseModel]"], None]:
        def forget(_dead: "weakref.ref[BaseModel]") -> None:
            self._kept.pop(key, None)

        return forget


def leading_list_renderer(model_type: type[BaseModel], kept: KeptJson) -> Renderer | None:
    """How to render a `model_type` whose first field is a list of frozen models, its items from `kept`.

    The items must be frozen all the way down (nested models frozen too, no lists or dicts), so
    that a kept rendering cannot go stale. None if `model_type` is not of that shape, or has
    serializers of its own. The renderer gives None for an answer it cannot render the same way
    (an item of another class than the list's).
    """
    shape = _leading_frozen_list(model_type)
    if shape is None:
        return None
    name, item_type = shape
    opening = b"{" + orjson.dumps(name) + b":["
    others = {name}
    serializer = model_type.__pydantic_serializer__

    def render(answer: BaseModel) -> bytes | None:
        items: list[Any] = getattr(answer, name)
        for item in items:
            if type(item) is not item_type:
                return None
        rest: bytes = serializer.to_json(answer, by_alias=kept.by_alias, exclude=others)
        listed = b",".join([kept.of(item) for item in items])
        return opening + listed + (b"]}" if rest == b"{}" else b"]," + rest[1:])

    return render


class ItemsByJson:
    """Parses answers whose first field lists frozen models, each distinct item validated once.

    An item's JSON (as orjson writes it again after decoding the answer: the same bytes for the
    same content) looks up the object validated from those bytes before; only an item not seen
    among the `size` most recently used is validated, from its bytes, as pydantic validates an
    answer's. The rest of the answer is validated from its decoded JSON. Anything else (another
    shape, an answer that is not JSON) is validated whole, raising pydantic's ValidationError
    where it does not fit, as an item that does not fit does.

    Measured (2026-11-28, twenty posts): parsing an answer and rendering its posts again took
    139 us through pydantic, of which 67 rendering the fresh objects; a page of posts seen
    before renders in 7.5 us from their kept JSON.
    """

    def __init__(self, *, size: int) -> None:
        self._seen: LruCache[tuple[type[BaseModel], bytes], BaseModel] = LruCache(size)

    def __len__(self) -> int:
        """How many items are remembered."""
        return len(self._seen)

    def parse(self, model_type: type[ModelT], body: bytes) -> ModelT:
        """`body` validated as `model_type`, its listed items the objects seen before for the same JSON."""
        shape = _leading_frozen_list(model_type)
        answer = _json_object(body) if shape is not None else None
        if shape is None or answer is None or not isinstance(answer.get(shape[0]), list):
            return model_type.model_validate_json(body)
        name, item_type = shape
        items = [self._item(item_type, item) for item in answer[name]]
        # The items are instances of their class already: pydantic takes them as they are.
        return model_type.model_validate({**answer, name: items})

    def _item(self, item_type: type[BaseModel], item: Any) -> BaseModel:
        key = (item_type, orjson.dumps(item))
        parsed = self._seen.get(key)
        if parsed is None:
            parsed = item_type.model_validate_json(key[1])
            self._seen.put(key, parsed)
        return parsed


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return decoded if isinstance(decoded, dict) else None


@cache
def _leading_frozen_list(model_type: type[BaseModel]) -> tuple[str, type[BaseModel]] | None:
    """The name and item class of `model_type`'s first field, if it lists models frozen all the way
    down (nested models frozen too, no lists or dicts) and nothing renders it differently."""
    fields = list(model_type.model_fields.items())
    if not fields or _has_own_serializers(model_type):
        return None
    name, info = fields[0]
    if get_origin(info.annotation) is not list or info.alias or info.serialization_alias or info.exclude:
        return None
    (item_type,) = get_args(info.annotation)
    if not (isclass(item_type) and issubclass(item_type, BaseModel) and _immutable(item_type, set())):
        return None
    return name, item_type


def _immutable(model_type: type[BaseModel], seen: set[type[BaseModel]]) -> bool:
    """Whether `model_type` is frozen all the way down: frozen, and holding no lists, dicts or
    sets, nor models that are not frozen all the way down themselves."""
    if model_type in seen:
        return True
    seen.add(model_type)
    if not model_type.model_config.get("frozen"):
        return False
    return all(_immutable_annotation(info.annotation, seen) for info in model_type.model_fields.values())


def _immutable_annotation(annotation: Any, seen: set[type[BaseModel]]) -> bool:
    if get_origin(annotation) in (list, dict, set):
        return False
    if isclass(annotation) and issubclass(annotation, BaseModel):
        return _immutable(annotation, seen)
    return all(_immutable_annotation(arg, seen) for arg in get_args(annotation))


def _has_own_serializers(model_type: type[BaseModel]) -> bool:
    decorators = model_type.__pydantic_decorators__
    return bool(decorators.field_serializers or decorators.model_serializers)
