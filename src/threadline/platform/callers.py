"""Who is calling: the verified bearer token as a route parameter, declared as the API's security scheme."""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.security.base import SecurityBase

from threadline.platform.tokens import Identity, TokenVerifier

__all__ = ["BearerToken", "Caller", "Viewer", "first_header"]


def first_header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header `name` (lower case) in ASGI `headers`, as Starlette's `Headers.get`."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


class BearerToken(SecurityBase):
    """The caller's identity from `Authorization: Bearer <token>`, declared as the API's security scheme.

    One dependency reading the header itself: as a `Header()` parameter of a dependency taking
    the request too, FastAPI's parameter solving cost more CPU than verifying a remembered token.
    """

    def __init__(self, *, required: bool) -> None:
        self.model = HTTPBearerModel(bearerFormat="JWT")
        self.scheme_name = "bearer"
        self.required = required

    async def __call__(self, request: Request) -> Identity | None:
        return await self.identify(request.scope["headers"], request.app.state.token_verifier)

    async def identify(self, headers: list[tuple[bytes, bytes]], verifier: TokenVerifier) -> Identity | None:
        """The caller named by ASGI `headers`; None for no token where none is required."""
        authorization = first_header(headers, b"authorization")
        if authorization is None and not self.required:
            return None
        return await verifier.verify_header(authorization)


Caller = Annotated[Identity, Depends(BearerToken(required=True))]
"""A route parameter holding the verified caller; a missing or bad token is 401."""

Viewer = Annotated[Identity | None, Depends(BearerToken(required=False))]
"""A route parameter holding the verified caller, or None for an anonymous one."""
