"""Every route the gateway forwards as bytes answers exactly what its declared edge route would."""

from typing import Any, cast

import pytest
from fastapi import APIRouter
from fastapi.routing import APIRoute

from threadline.gateway.routes import AccountIds, build_router, forwards
from threadline.platform.forwarding import Forward
from threadline.services.feed import http as feed_http
from threadline.services.payments import http as payments_http
from threadline.services.posts import http as posts_http
from threadline.services.threads import http as threads_http
from threadline.services.users import http as users_http

ANY_SERVICE = cast(Any, None)

INTERNAL_ROUTERS = {
    "users": users_http.build_router(ANY_SERVICE),
    "posts": posts_http.build_router(ANY_SERVICE),
    "threads": threads_http.build_router(ANY_SERVICE),
    "feed": feed_http.build_router(ANY_SERVICE),
    "payments": payments_http.build_router(ANY_SERVICE),
}


async def _no_status() -> dict[str, Any]:
    return {}


ACCOUNT_IDS = AccountIds(ANY_SERVICE)
EDGE_ROUTER = build_router(
    users=ANY_SERVICE,
    posts=ANY_SERVICE,
    threads=ANY_SERVICE,
    feed=ANY_SERVICE,
    payments=ANY_SERVICE,
    topology="microservices",
    status=_no_status,
    account_ids=ACCOUNT_IDS,
)
FORWARDS = forwards(ACCOUNT_IDS)


def route(router: APIRouter, method: str, path: str) -> APIRoute:
    found = [r for r in router.routes if isinstance(r, APIRoute) and r.path == path and method in r.methods]
    assert len(found) == 1, f"{method} {path}: {len(found)} routes"
    return found[0]


@pytest.mark.parametrize("forward", FORWARDS, ids=lambda forward: f"{forward.method} {forward.path}")
def test_a_forwarded_route_is_declared_at_the_edge_and_in_its_service_with_the_same_answer(
    forward: Forward,
) -> None:
    """Same status and response model on both sides (or none, for 204), so forwarding changes nothing."""
    edge = route(EDGE_ROUTER, forward.method, forward.path)
    internal = route(INTERNAL_ROUTERS[forward.service], forward.method, forward.target)
    assert edge.status_code == internal.status_code
    assert edge.response_model is not None or edge.status_code == 204
    assert edge.response_model is internal.response_model


@pytest.mark.parametrize("forward", FORWARDS, ids=lambda forward: f"{forward.method} {forward.path}")
def test_a_forwarded_route_takes_the_same_inputs_at_the_edge_and_in_its_service(forward: Forward) -> None:
    """Same query parameters, body and credentials: the service validates what the edge would have."""
    edge = route(EDGE_ROUTER, forward.method, forward.path)
    internal = route(INTERNAL_ROUTERS[forward.service], forward.method, forward.target)

    def inputs(r: APIRoute) -> dict[str, Any]:
        flat = r.dependant
        query = sorted(p.name for d in [flat, *flat.dependencies] for p in d.query_params)
        headers = sorted(p.alias for d in [flat, *flat.dependencies] for p in d.header_params)
        bodies = [p.field_info.annotation for p in flat.body_params]
        paths = sorted(p.name for p in flat.path_params)
        return {"query": query, "headers": headers, "body": bodies, "path": paths}

    edge_inputs, internal_inputs = inputs(edge), inputs(internal)
    if forward.rewrite is not None:
        # The rewrite gives the target's path parameters; the rest must match as for any forward.
        del edge_inputs["path"], internal_inputs["path"]
    assert edge_inputs == internal_inputs
