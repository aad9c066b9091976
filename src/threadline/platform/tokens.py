"""Access-token verification against cached JWKS, done by every service for itself."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from threadline.platform.errors import ServiceUnavailable, Unauthorized
from threadline.platform.lru import LruCache

__all__ = [
    "TOKEN_ALGORITHM",
    "TOKEN_AUDIENCE",
    "TOKEN_ISSUER",
    "Identity",
    "SigningKey",
    "TokenVerifier",
]

TOKEN_ALGORITHM = "EdDSA"
TOKEN_ISSUER = "threadline"
TOKEN_AUDIENCE = "threadline"

JwksSource = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller: the account id and handle from the token, and the token to pass on."""

    user_id: str
    handle: str
    display_name: str
    token: str


class SigningKey:
    """An Ed25519 key that signs access tokens in the format TokenVerifier checks."""

    def __init__(self, kid: str, private_key: Ed25519PrivateKey) -> None:
        self.kid = kid
        self.private_key = private_key

    def public_jwk(self) -> dict[str, Any]:
        """The public half as a JWK."""
        jwk: dict[str, Any] = OKPAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": TOKEN_ALGORITHM, "use": "sig"}

    def sign(self, *, user_id: str, handle: str, display_name: str, ttl_seconds: int) -> str:
        """An access token for one account, valid for `ttl_seconds` from now."""
        issued = int(time.time())
        claims = {
            "iss": TOKEN_ISSUER,
            "aud": TOKEN_AUDIENCE,
            "sub": user_id,
            "handle": handle,
            "name": display_name,
            "iat": issued,
            "exp": issued + ttl_seconds,
        }
        return jwt.encode(claims, self.private_key, algorithm=TOKEN_ALGORITHM, headers={"kid": self.kid})


class TokenVerifier:
    """Verifies EdDSA access tokens with keys fetched from a JWKS source and cached.

    Keys are refetched only for an unknown key id (at most every `refresh_seconds`), so
    tokens keep verifying while the key owner is down. Tokens already verified are remembered
    until they expire (up to `remembered_tokens` of them, most recently used kept): a client
    sends the same token with every request, and checking its signature again each time was
    the largest single cost of a cheap read.
    """

    def __init__(
        self, fetch_jwks: JwksSource, *, refresh_seconds: float = 10.0, remembered_tokens: int = 10_000
    ) -> None:
        self._fetch_jwks = fetch_jwks
        self._refresh_seconds = refresh_seconds
        self._keys: dict[str, Any] = {}
        self._fetched_at = -float("inf")
        self._lock = asyncio.Lock()
        self._verified: LruCache[str, tuple[Identity, float]] = LruCache(remembered_tokens)

    async def verify(self, token: str) -> Identity:
        """Return the identity a token proves, or raise Unauthorized."""
        remembered = self._verified.get(token)
        if remembered is not None:
            identity, expires_at = remembered
            if time.time() < expires_at:
                return identity
            self._verified.forget(token)
        identity, expires_at = await self._verify_signed(token)
        self._verified.put(token, (identity, expires_at))
        return identity

    async def _verify_signed(self, token: str) -> tuple[Identity, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized("the access token is malformed", code="invalid_token") from exc
        kid = header.get("kid")
        if header.get("alg") != TOKEN_ALGORITHM or not isinstance(kid, str):
            raise Unauthorized("the access token is not one of ours", code="invalid_token")
        key = await self._key(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[TOKEN_ALGORITHM],
                audience=TOKEN_AUDIENCE,
                issuer=TOKEN_ISSUER,
                options={"require": ["exp", "iat", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("the access token has expired", code="token_expired") from exc
        except jwt.PyJWTError as exc:
            raise Unauthorized("the access token is invalid", code="invalid_token") from exc
        identity = Identity(
            user_id=str(claims["sub"]),
            handle=str(claims.get("handle", "")),
            display_name=str(claims.get("name", "")),
            token=token,
        )
        return identity, float(claims["exp"])

    async def verify_header(self, authorization: str | None) -> Identity:
        """Verify an `Authorization: Bearer …` header value."""
        if not authorization:
            raise Unauthorized("this route needs an access token", code="unauthorized")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("use 'Authorization: Bearer <token>'", code="invalid_token")
        return await self.verify(token.strip())

    async def _key(self, kid: str) -> Any:
        if kid in self._keys:
            return self._keys[kid]
        async with self._lock:
            if kid not in self._keys and (
                time.monotonic() - self._fetched_at >= self._refresh_seconds or not self._keys
            ):
                await self._refresh()
        if kid not in self._keys:
            raise Unauthorized("the access token was signed by an unknown key", code="invalid_token")
        return self._keys[kid]

    async def _refresh(self) -> None:
        # A failed fetch counts too, so a key owner that is down is not asked again at once.
        self._fetched_at = time.monotonic()
        try:
            jwks = await self._fetch_jwks()
        except ServiceUnavailable:
            if not self._keys:
                raise
            return
        self._verified.clear()
        self._keys = {
            jwk["kid"]: jwt.PyJWK(jwk, algorithm=TOKEN_ALGORITHM).key
            for jwk in jwks.get("keys", [])
            if "kid" in jwk
        }
