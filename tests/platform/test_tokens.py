"""Access-token verification against a JWKS source, with keys cached so logins survive its owner's outage."""

import asyncio
import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from tests.support.polling import eventually
from threadline.platform.errors import ServiceUnavailable, Unauthorized
from threadline.platform.tokens import TOKEN_AUDIENCE, TOKEN_ISSUER, Identity, TokenVerifier

KID = "key-1"


def public_jwk(private: Ed25519PrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk.update(kid=kid, alg="EdDSA", use="sig")
    return jwk


class FakeJwks:
    """The users service's JWKS endpoint: serves its keys, counts fetches, and can be taken down."""

    def __init__(self, keys: dict[str, Ed25519PrivateKey]) -> None:
        self.keys = dict(keys)
        self.calls = 0
        self.down = False

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        if self.down:
            raise ServiceUnavailable("users", "connection refused")
        return {"keys": [public_jwk(private, kid) for kid, private in self.keys.items()]}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "sub": "0190a1b2-0000-7000-8000-000000000001",
        "handle": "ada",
        "name": "Ada Lovelace",
        "iss": TOKEN_ISSUER,
        "aud": TOKEN_AUDIENCE,
        "iat": now,
        "exp": now + 900,
    }
    values.update(overrides)
    return {name: value for name, value in values.items() if value is not None}


def sign(private: Ed25519PrivateKey, kid: str = KID, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), private, algorithm="EdDSA", headers={"kid": kid})


def b64(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode()


def b64_json(value: dict[str, Any]) -> str:
    return b64(json.dumps(value).encode())


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def jwks(key: Ed25519PrivateKey) -> FakeJwks:
    return FakeJwks({KID: key})


@pytest.fixture
def verifier(jwks: FakeJwks) -> TokenVerifier:
    return TokenVerifier(jwks, refresh_seconds=60.0)


async def assert_refused(verifier: TokenVerifier, token: str, code: str) -> Unauthorized:
    with pytest.raises(Unauthorized) as refused:
        await verifier.verify(token)
    assert refused.value.code == code
    assert refused.value.status == 401
    return refused.value


async def test_a_good_token_verifies_to_the_identity_it_carries(
    verifier: TokenVerifier, key: Ed25519PrivateKey
) -> None:
    """A token signed with the published key gives the account id, handle, name and the token itself."""
    token = sign(key)
    identity = await verifier.verify(token)
    assert identity == Identity(
        user_id="0190a1b2-0000-7000-8000-000000000001",
        handle="ada",
        display_name="Ada Lovelace",
        token=token,
    )


async def test_an_expired_token_is_refused_as_token_expired(
    verifier: TokenVerifier, key: Ed25519PrivateKey
) -> None:
    """A token past its exp is 401 with the code token_expired, so clients know to refresh."""
    now = int(time.time())
    await assert_refused(verifier, sign(key, iat=now - 1000, exp=now - 60), "token_expired")


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"aud": "someone-else"}, id="wrong-audience"),
        pytest.param({"iss": "someone-else"}, id="wrong-issuer"),
        pytest.param({"aud": None}, id="no-audience"),
        pytest.param({"exp": None}, id="no-expiry"),
        pytest.param({"sub": None}, id="no-subject"),
        pytest.param({"iat": None}, id="no-issued-at"),
    ],
)
async def test_a_token_with_wrong_or_missing_claims_is_refused_as_invalid(
    verifier: TokenVerifier, key: Ed25519PrivateKey, overrides: dict[str, Any]
) -> None:
    """A well-signed token for another audience or issuer, or lacking a required claim, is invalid."""
    await assert_refused(verifier, sign(key, **overrides), "invalid_token")


async def test_a_token_with_a_tampered_payload_is_refused(
    verifier: TokenVerifier, key: Ed25519PrivateKey
) -> None:
    """Swapping the payload of a signed token for another account's breaks the signature."""
    header, _payload, signature = sign(key).split(".")
    forged = ".".join([header, b64_json(claims(sub="someone-else")), signature])
    await assert_refused(verifier, forged, "invalid_token")


async def test_a_token_signed_by_another_key_under_the_same_kid_is_refused(verifier: TokenVerifier) -> None:
    """A key id alone proves nothing: the signature must check against the published key."""
    await assert_refused(verifier, sign(Ed25519PrivateKey.generate(), kid=KID), "invalid_token")


async def test_an_hs256_token_is_refused_even_when_keyed_with_the_public_key(
    verifier: TokenVerifier, key: Ed25519PrivateKey, jwks: FakeJwks
) -> None:
    """No algorithm confusion: an HMAC token whose secret is the public key is not accepted."""
    public_x = public_jwk(key, KID)["x"]
    token = jwt.encode(claims(), public_x + "-padding-to-32-bytes!", algorithm="HS256", headers={"kid": KID})
    await assert_refused(verifier, token, "invalid_token")
    assert jwks.calls == 0


async def test_an_unsigned_alg_none_token_is_refused(verifier: TokenVerifier) -> None:
    """A token declaring `alg: none` with no signature is refused."""
    token = ".".join([b64_json({"alg": "none", "typ": "JWT", "kid": KID}), b64_json(claims()), ""])
    await assert_refused(verifier, token, "invalid_token")


async def test_a_token_declaring_eddsa_without_a_valid_signature_is_refused(verifier: TokenVerifier) -> None:
    """A header that claims EdDSA but carries a made-up signature is refused."""
    token = ".".join([b64_json({"alg": "EdDSA", "kid": KID}), b64_json(claims()), b64(b"\x00" * 64)])
    await assert_refused(verifier, token, "invalid_token")


async def test_a_token_without_a_kid_is_refused_without_fetching_keys(
    verifier: TokenVerifier, key: Ed25519PrivateKey, jwks: FakeJwks
) -> None:
    """A token naming no key is not ours; the key source is not asked."""
    token = jwt.encode(claims(), key, algorithm="EdDSA")
    await assert_refused(verifier, token, "invalid_token")
    assert jwks.calls == 0


@pytest.mark.parametrize("garbage", ["", "not-a-token", "a.b.c", "....", "eyJhbGciOiJFZERTQSJ9.x"])
async def test_garbage_is_refused_as_invalid_token(verifier: TokenVerifier, garbage: str) -> None:
    """Strings that are not JWTs are 401 invalid_token, never an unexpected error."""
    await assert_refused(verifier, garbage, "invalid_token")


async def test_verify_header_without_a_header_is_unauthorized(verifier: TokenVerifier) -> None:
    """No Authorization header (or an empty one) is 401 unauthorized."""
    for value in (None, ""):
        with pytest.raises(Unauthorized) as refused:
            await verifier.verify_header(value)
        assert refused.value.status == 401
        assert refused.value.code == "unauthorized"


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Token abc", "Bearer", "Bearer    ", "abc"])
async def test_verify_header_that_is_not_a_bearer_token_is_refused(
    verifier: TokenVerifier, value: str
) -> None:
    """An Authorization header that is not `Bearer <token>` is 401 invalid_token."""
    with pytest.raises(Unauthorized) as refused:
        await verifier.verify_header(value)
    assert refused.value.status == 401
    assert refused.value.code == "invalid_token"


async def test_verify_header_accepts_a_bearer_token_in_any_case_with_spaces(
    verifier: TokenVerifier, key: Ed25519PrivateKey
) -> None:
    """`bearer` is case-insensitive and surrounding spaces are ignored."""
    token = sign(key)
    for value in (f"Bearer {token}", f"bearer {token}", f"BEARER   {token}  "):
        identity = await verifier.verify_header(value)
        assert identity.handle == "ada"
        assert identity.token == token


async def test_keys_are_fetched_once_and_then_served_from_the_cache(
    verifier: TokenVerifier, key: Ed25519PrivateKey, jwks: FakeJwks
) -> None:
    """After the first verification the key source is not asked again for a known kid."""
    for _ in range(5):
        await verifier.verify(sign(key))
    await asyncio.gather(*(verifier.verify(sign(key)) for _ in range(20)))
    assert jwks.calls == 1


async def test_tokens_keep_verifying_while_the_key_owner_is_down(
    key: Ed25519PrivateKey, jwks: FakeJwks
) -> None:
    """With keys cached, a JWKS source raising ServiceUnavailable does not stop verification."""
    verifier = TokenVerifier(jwks, refresh_seconds=0.0)
    await verifier.verify(sign(key))
    jwks.down = True
    identity = await verifier.verify(sign(key))
    assert identity.handle == "ada"
    await assert_refused(verifier, sign(Ed25519PrivateKey.generate(), kid="key-unknown"), "invalid_token")
    assert (await verifier.verify(sign(key))).handle == "ada"


async def test_with_no_cached_keys_and_the_key_owner_down_the_outage_propagates(
    verifier: TokenVerifier, key: Ed25519PrivateKey, jwks: FakeJwks
) -> None:
    """Nothing to verify with: ServiceUnavailable propagates; once the owner is back, tokens verify."""
    jwks.down = True
    with pytest.raises(ServiceUnavailable) as unavailable:
        await verifier.verify(sign(key))
    assert unavailable.value.service == "users"
    jwks.down = False
    assert (await verifier.verify(sign(key))).handle == "ada"


async def test_a_burst_of_unknown_kids_fetches_the_keys_only_once(
    verifier: TokenVerifier, jwks: FakeJwks
) -> None:
    """Twenty concurrent tokens with an unknown kid cause a single fetch, and all are refused."""
    stranger = Ed25519PrivateKey.generate()
    results = await asyncio.gather(
        *(verifier.verify(sign(stranger, kid=f"unknown-{index % 3}")) for index in range(20)),
        return_exceptions=True,
    )
    assert all(isinstance(result, Unauthorized) and result.code == "invalid_token" for result in results)
    assert jwks.calls == 1
    await assert_refused(verifier, sign(stranger, kid="unknown-4"), "invalid_token")
    assert jwks.calls == 1


async def test_a_rotated_in_key_is_picked_up_after_the_refresh_period(
    key: Ed25519PrivateKey, jwks: FakeJwks
) -> None:
    """A token under a new kid is accepted once refresh_seconds have passed, after exactly one refetch."""
    verifier = TokenVerifier(jwks, refresh_seconds=0.2)
    await verifier.verify(sign(key))
    assert jwks.calls == 1
    rotated = Ed25519PrivateKey.generate()
    jwks.keys["key-2"] = rotated

    async def accepted() -> Identity:
        try:
            return await verifier.verify(sign(rotated, kid="key-2"))
        except Unauthorized as refused:
            raise AssertionError(f"still refused: {refused.message}") from refused

    identity = await eventually(accepted, within=10, interval=0.02)
    assert identity.handle == "ada"
    assert jwks.calls == 2
    assert (await verifier.verify(sign(key))).handle == "ada"


async def test_unknown_kids_do_not_hammer_a_key_owner_that_is_down(
    key: Ed25519PrivateKey, jwks: FakeJwks
) -> None:
    """While the key owner is down, unknown kids cause at most one fetch attempt per refresh period."""
    refresh = 0.3
    verifier = TokenVerifier(jwks, refresh_seconds=refresh)
    await verifier.verify(sign(key))
    jwks.down = True
    stranger = Ed25519PrivateKey.generate()
    deadline = time.monotonic() + 10
    while jwks.calls < 2:
        assert time.monotonic() < deadline, "no refresh was attempted after the refresh period"
        await assert_refused(verifier, sign(stranger, kid="unknown"), "invalid_token")
        await asyncio.sleep(0.02)
    first_retry_at = time.monotonic()
    for _ in range(5):
        await assert_refused(verifier, sign(stranger, kid="unknown"), "invalid_token")
    periods_passed = int((time.monotonic() - first_retry_at) / refresh)
    assert jwks.calls <= 2 + periods_passed


class CountingDecode:
    """Counts the signature checks the verifier makes, passing each on to PyJWT."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._decode = jwt.decode
        monkeypatch.setattr(jwt, "decode", self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._decode(*args, **kwargs)


async def test_a_verified_token_is_remembered_until_it_expires(
    verifier: TokenVerifier, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Repeats of a token are answered from memory; once its exp passes it is refused as expired."""
    decode = CountingDecode(monkeypatch)
    now = int(time.time())
    token = sign(key, iat=now, exp=now + 2)
    first = await verifier.verify(token)
    assert [await verifier.verify(token) for _ in range(5)] == [first] * 5
    assert decode.calls == 1

    async def expired() -> None:
        refusal: Unauthorized | None = None
        try:
            await verifier.verify(token)
        except Unauthorized as refused:
            refusal = refused
        assert refusal is not None, "the token is still accepted"
        assert refusal.code == "token_expired"

    await eventually(expired, within=10)


async def test_remembered_tokens_are_bounded_keeping_the_most_recently_used(
    jwks: FakeJwks, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for two, a third token pushes out the least recently used one, which is checked again."""
    verifier = TokenVerifier(jwks, remembered_tokens=2)
    decode = CountingDecode(monkeypatch)
    first, second, third = (sign(key, sub=f"user-{i}") for i in range(3))
    await verifier.verify(first)
    await verifier.verify(second)
    await verifier.verify(first)
    await verifier.verify(third)
    assert decode.calls == 3
    await verifier.verify(first)
    assert decode.calls == 3
    await verifier.verify(second)
    assert decode.calls == 4


async def test_a_tampered_copy_of_a_remembered_token_is_still_refused(
    verifier: TokenVerifier, key: Ed25519PrivateKey
) -> None:
    """Memory is keyed by the whole token: changing any part of a known good token is checked afresh."""
    token = sign(key)
    await verifier.verify(token)
    header, _payload, signature = token.split(".")
    forged = b64_json({**claims(), "sub": "someone-else"})
    await assert_refused(verifier, f"{header}.{forged}.{signature}", "invalid_token")
