"""A stand-in for the users service's token signing, for tests of services that verify tokens."""

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from threadline.platform.ids import new_id
from threadline.platform.tokens import Identity, SigningKey, TokenVerifier


class Signer:
    """Signs access tokens as the users service does, with a key of its own, and publishes its JWKS."""

    def __init__(self, kid: str | None = None) -> None:
        self.signing_key = SigningKey(kid or new_id(), Ed25519PrivateKey.generate())

    @property
    def kid(self) -> str:
        """The key id tokens carry."""
        return self.signing_key.kid

    @property
    def key(self) -> Ed25519PrivateKey:
        """The private key."""
        return self.signing_key.private_key

    async def jwks(self) -> dict[str, Any]:
        """The public key as a JWKS document."""
        return {"keys": [self.signing_key.public_jwk()]}

    def token(self, user_id: str, handle: str, ttl_seconds: int = 900) -> str:
        """A fresh access token for one account."""
        return self.signing_key.sign(
            user_id=user_id, handle=handle, display_name=handle.title(), ttl_seconds=ttl_seconds
        )

    async def identity(self, user_id: str, handle: str) -> Identity:
        """A token for `handle`, verified as a service would verify it."""
        return await TokenVerifier(self.jwks).verify(self.token(user_id, handle))
