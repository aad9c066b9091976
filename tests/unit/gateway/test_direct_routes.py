"""Which public and internal routes every process answers without FastAPI's per-request machinery."""

from fastapi.routing import APIRoute

from tests.unit.gateway.test_forwarded_routes import EDGE_ROUTER, INTERNAL_ROUTERS
from threadline.platform.direct import is_direct

# They also read an Idempotency-Key header, which direct routes do not take.
NOT_DIRECT = {
    ("POST", "/api/v1/subscriptions"),
    ("POST", "/api/v1/tips"),
    ("POST", "/payments/subscriptions"),
    ("POST", "/payments/tips"),
}


def test_every_route_but_those_reading_an_idempotency_key_is_answered_directly() -> None:
    """Hot routes losing their direct path would cost a fifth to a third of their CPU: this names the rest."""
    routes = [
        route
        for router in (EDGE_ROUTER, *INTERNAL_ROUTERS.values())
        for route in router.routes
        if isinstance(route, APIRoute)
    ]
    not_direct = {
        (method, route.path) for route in routes if not is_direct(route) for method in route.methods
    }
    assert not_direct == NOT_DIRECT
    assert len(routes) > 40
