"""Process settings, and the app factory served on a real socket: health, metrics, limits, error shape."""

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import APIRouter
from jwt.algorithms import OKPAlgorithm
from pydantic import BaseModel, Field, ValidationError
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.support.polling import eventually
from tests.support.servers import serving
from threadline.platform.callers import Caller, Viewer
from threadline.platform.deadlines import remaining_seconds
from threadline.platform.errors import (
    Conflict,
    FieldError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)
from threadline.platform.in_flight import other_requests_in_flight
from threadline.platform.pagination import Paging
from threadline.platform.settings import DEFAULT_SECRET_KEY, Settings
from threadline.platform.tokens import TOKEN_AUDIENCE, TOKEN_ISSUER, TokenVerifier
from threadline.platform.web import create_app

MAX_BODY = 1024
SECRET_DETAIL = "db password is hunter2"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No THREADLINE_* variable of the machine running the tests leaks into a Settings()."""
    for name in list(os.environ):
        if name.startswith("THREADLINE_"):
            monkeypatch.delenv(name)


def test_settings_refuse_the_default_secret_in_production() -> None:
    """environment=production with the development secret is a configuration error naming the variable."""
    with pytest.raises(ValidationError, match="THREADLINE_SECRET_KEY"):
        Settings(environment="production")
    with pytest.raises(ValidationError, match="THREADLINE_SECRET_KEY"):
        Settings(environment="production", secret_key=DEFAULT_SECRET_KEY)


def test_settings_accept_a_secret_of_your_own_in_production() -> None:
    """A custom secret makes production settings valid; development accepts the default one."""
    settings = Settings(environment="production", secret_key="a-real-secret-of-our-own-0123456789")
    assert settings.environment == "production"
    assert Settings().secret_key == DEFAULT_SECRET_KEY


def test_settings_refuse_a_production_environment_with_the_default_secret_from_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same refusal applies when production is chosen through THREADLINE_ENVIRONMENT."""
    monkeypatch.setenv("THREADLINE_ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="THREADLINE_SECRET_KEY"):
        Settings()
    monkeypatch.setenv("THREADLINE_SECRET_KEY", "another-secret-of-our-own-123")
    assert Settings().environment == "production"


def test_database_url_defaults_to_a_sqlite_file_per_service_under_data_dir(tmp_path: Path) -> None:
    """A service not named in database_urls gets `<data_dir>/<service>.db` (absolute)."""
    settings = Settings(data_dir=tmp_path / "data", database_urls={"posts": "postgresql+asyncpg://db/posts"})
    assert settings.database_url("users") == f"sqlite:///{(tmp_path / 'data' / 'users.db').resolve()}"
    assert settings.database_url("posts") == "postgresql+asyncpg://db/posts"


def test_database_url_of_a_relative_data_dir_is_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative data_dir is resolved, so a child process in another directory finds the same file."""
    monkeypatch.chdir(tmp_path)
    url = Settings(data_dir=Path("rel")).database_url("users")
    assert url == f"sqlite:///{tmp_path.resolve() / 'rel' / 'users.db'}"


def test_as_environment_round_trips_every_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting the variables as_environment() produces and reading Settings() gives equal settings."""
    original = Settings(
        environment="production",
        secret_key="round-trip-secret-0123456789",
        data_dir=tmp_path / "data dir",
        topology="monolith",
        host="0.0.0.0",
        port=9123,
        service_urls={"users": "http://127.0.0.1:9001", "posts": "http://127.0.0.1:9002"},
        database_urls={"posts": "postgresql+asyncpg://u:p@h/posts?ssl=true"},
        nats_url="nats://127.0.0.1:4222",
        events_namespace="ns1",
        access_token_ttl_seconds=60,
        call_timeout_seconds=2.5,
        max_body_bytes=2048,
        log_level="debug",
    )
    env = original.as_environment()
    assert all(name.startswith("THREADLINE_") for name in env)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings() == original


def test_as_environment_round_trips_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default settings (nats_url unset, empty maps) survive the trip through variables too."""
    original = Settings()
    env = original.as_environment()
    assert "THREADLINE_NATS_URL" not in env
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings() == original


def public_jwk(private: Ed25519PrivateKey, kid: str) -> dict[str, Any]:
    jwk: dict[str, Any] = OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk.update(kid=kid, alg="EdDSA", use="sig")
    return jwk


class Item(BaseModel):
    name: str = Field(min_length=1, max_length=20)
    count: int = 1


class Probes:
    """The readiness checks of the app under test, switchable from the test."""

    def __init__(self) -> None:
        self.database = True
        self.bus = True

    async def database_ready(self) -> bool:
        return self.database

    async def bus_ready(self) -> bool:
        return self.bus


def build_router() -> APIRouter:
    router = APIRouter()

    @router.get("/items/{item_id}")
    async def get_item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @router.post("/items", status_code=201)
    async def create_item(item: Item) -> dict[str, Any]:
        return item.model_dump()

    @router.get("/boom")
    async def boom() -> None:
        raise RuntimeError(SECRET_DETAIL)

    @router.get("/conflict")
    async def conflict() -> None:
        raise Conflict("that handle is taken", code="handle_taken")

    @router.get("/missing")
    async def missing() -> None:
        raise NotFound("no such post")

    @router.get("/invalid")
    async def invalid() -> None:
        raise InvalidRequest("invalid request: text: too long", [FieldError("text", "too long")])

    @router.get("/down")
    async def down() -> None:
        raise ServiceUnavailable("users", "connection refused")

    @router.get("/deadline")
    async def deadline() -> dict[str, float]:
        return {"remaining": remaining_seconds(100.0)}

    @router.get("/page")
    async def page(paging: Paging) -> dict[str, Any]:
        return paging.model_dump()

    @router.get("/me")
    async def me(caller: Caller) -> dict[str, str]:
        return {"user_id": caller.user_id, "handle": caller.handle}

    @router.get("/hello")
    async def hello(viewer: Viewer) -> dict[str, str | None]:
        return {"handle": viewer.handle if viewer else None}

    return router


class Service:
    def __init__(self, url: str, probes: Probes, http: aiohttp.ClientSession, key: Ed25519PrivateKey) -> None:
        self.url = url
        self.probes = probes
        self.http = http
        self.key = key

    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.http.request(method, self.url + path, **kw) as response:
            text = await response.text()
            body = await response.json(content_type=None) if text and text[0] in "{[" else text
            return response.status, body, response

    def token(self, **overrides: Any) -> str:
        now = int(time.time())
        claims = {
            "sub": "user-1",
            "handle": "ada",
            "name": "Ada",
            "iss": TOKEN_ISSUER,
            "aud": TOKEN_AUDIENCE,
            "iat": now,
            "exp": now + 900,
            **overrides,
        }
        return jwt.encode(claims, self.key, algorithm="EdDSA", headers={"kid": "k1"})


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
async def service(key: Ed25519PrivateKey) -> AsyncIterator[Service]:
    probes = Probes()

    async def jwks() -> dict[str, Any]:
        return {"keys": [public_jwk(key, "k1")]}

    app = create_app(
        title="test",
        routers=[build_router()],
        readiness={"database": probes.database_ready, "bus": probes.bus_ready},
        token_verifier=TokenVerifier(jwks),
        max_body_bytes=MAX_BODY,
    )
    async with serving(app) as url, aiohttp.ClientSession() as http:
        yield Service(url, probes, http, key)


def error_of(body: Any) -> dict[str, Any]:
    """The `error` object of an API error body, checked for the shape."""
    assert isinstance(body, dict)
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


async def test_healthz_answers_alive(service: Service) -> None:
    """/healthz is 200 whenever the process serves requests."""
    status, body, _ = await service.request("GET", "/healthz")
    assert (status, body) == (200, {"status": "alive"})


async def test_readyz_is_200_when_every_check_passes(service: Service) -> None:
    """/readyz is 200 and lists each check as true when all pass."""
    status, body, _ = await service.request("GET", "/readyz")
    assert status == 200
    assert body == {"status": "ready", "checks": {"database": True, "bus": True}}


async def test_readyz_is_503_naming_the_failing_check(service: Service) -> None:
    """With the bus down, /readyz is 503 and shows the bus check false; back up, it is 200 again."""
    service.probes.bus = False
    status, body, _ = await service.request("GET", "/readyz")
    assert status == 503
    assert body == {"status": "not_ready", "checks": {"database": True, "bus": False}}
    service.probes.bus = True
    status, _, _ = await service.request("GET", "/readyz")
    assert status == 200


async def test_metrics_count_requests_per_route_template_and_status(service: Service) -> None:
    """/metrics counts requests by method, route template (not raw path) and status."""
    for item_id in (1, 2, 3):
        assert (await service.request("GET", f"/items/{item_id}"))[0] == 200
    assert (await service.request("GET", "/items/abc"))[0] == 422
    assert (await service.request("GET", "/no/such/thing"))[0] == 404
    status, text, response = await service.request("GET", "/metrics")
    assert status == 200
    assert response.content_type == "text/plain"
    counts = {
        (method, route, int(code)): int(value)
        for method, route, code, value in re.findall(
            r'^http_requests_total\{method="(\w+)",route="([^"]+)",status="(\d+)"\} (\d+)$', text, re.M
        )
    }
    assert counts[("GET", "/items/{item_id}", 200)] == 3
    assert counts[("GET", "/items/{item_id}", 422)] == 1
    assert counts[("GET", "unmatched", 404)] == 1
    assert not any("/items/1" in route for _, route, _ in counts)
    assert re.search(
        r'^http_request_seconds_total\{method="GET",route="/items/\{item_id\}"\} [\d.]+$', text, re.M
    )


async def test_an_unknown_route_is_404_in_the_error_shape(service: Service) -> None:
    """A path no route serves is 404 with code not_found."""
    status, body, _ = await service.request("GET", "/no/such/thing")
    assert status == 404
    assert error_of(body)["code"] == "not_found"


async def test_a_wrong_method_is_405_in_the_error_shape_with_allow(service: Service) -> None:
    """A known path with an unsupported method is 405 method_not_allowed, and says what is allowed."""
    status, body, response = await service.request("DELETE", "/items/1")
    assert status == 405
    assert error_of(body)["code"] == "method_not_allowed"
    assert "GET" in response.headers["allow"]


async def test_an_unexpected_exception_is_a_500_without_details(service: Service) -> None:
    """A route that crashes answers 500 internal_error; the body reveals neither message nor traceback."""
    status, body, response = await service.request("GET", "/boom")
    assert status == 500
    assert response.content_type == "application/json"
    assert error_of(body)["code"] == "internal_error"
    raw = str(body)
    assert SECRET_DETAIL not in raw
    assert "Traceback" not in raw
    assert "RuntimeError" not in raw
    assert (await service.request("GET", "/healthz"))[0] == 200


@pytest.mark.parametrize(
    ("path", "status", "code", "message"),
    [
        ("/conflict", 409, "handle_taken", "that handle is taken"),
        ("/missing", 404, "not_found", "no such post"),
        ("/down", 503, "service_unavailable", "users is unavailable: connection refused"),
    ],
)
async def test_a_service_error_maps_to_its_status_and_code(
    service: Service, path: str, status: int, code: str, message: str
) -> None:
    """A raised ServiceError subclass becomes its HTTP status with its code and message."""
    got_status, body, _ = await service.request("GET", path)
    assert got_status == status
    assert body == {"error": {"code": code, "message": message}}


async def test_an_invalid_request_raised_by_a_route_keeps_its_fields(service: Service) -> None:
    """InvalidRequest with fields is 422 invalid_request listing them."""
    status, body, _ = await service.request("GET", "/invalid")
    assert status == 422
    assert body == {
        "error": {
            "code": "invalid_request",
            "message": "invalid request: text: too long",
            "fields": [{"field": "text", "message": "too long"}],
        }
    }


@pytest.mark.parametrize(
    ("method", "path", "payload", "field"),
    [
        ("POST", "/items", {"count": 2}, "name"),
        ("POST", "/items", {"name": ""}, "name"),
        ("POST", "/items", {"name": "ok", "count": "many"}, "count"),
        ("GET", "/items/abc", None, "item_id"),
        ("GET", "/page?limit=0", None, "limit"),
        ("GET", "/page?limit=101", None, "limit"),
    ],
)
async def test_validation_errors_are_422_with_the_offending_field(
    service: Service, method: str, path: str, payload: Any, field: str
) -> None:
    """Bad bodies, path and query parameters are 422 invalid_request naming the field."""
    status, body, _ = await service.request(method, path, json=payload)
    assert status == 422
    error = error_of(body)
    assert error["code"] == "invalid_request"
    assert [entry["field"] for entry in error["fields"]] == [field]
    assert field in error["message"]


async def test_a_body_that_is_not_json_is_422(service: Service) -> None:
    """Malformed JSON is 422 invalid_request saying so."""
    status, body, _ = await service.request(
        "POST", "/items", data=b'{"name": ', headers={"content-type": "application/json"}
    )
    assert status == 422
    error = error_of(body)
    assert error["code"] == "invalid_request"
    assert "not valid JSON" in error["message"]


async def test_a_body_is_read_as_json_whatever_content_type_is_declared(service: Service) -> None:
    """The API is JSON only: a JSON body sent as text/plain is accepted as JSON."""
    status, body, _ = await service.request(
        "POST", "/items", data=b'{"name": "pen", "count": 3}', headers={"content-type": "text/plain"}
    )
    assert (status, body) == (201, {"name": "pen", "count": 3})


async def test_a_body_over_the_limit_is_413_by_its_content_length(service: Service) -> None:
    """A declared Content-Length above max_body_bytes is refused with 413 payload_too_large."""
    payload = b'{"name": "' + b"x" * (MAX_BODY * 2) + b'"}'
    status, body, _ = await service.request(
        "POST", "/items", data=payload, headers={"content-type": "application/json"}
    )
    assert status == 413
    error = error_of(body)
    assert error["code"] == "payload_too_large"
    assert str(MAX_BODY) in error["message"]


async def test_a_chunked_body_over_the_limit_is_413(service: Service) -> None:
    """A body without Content-Length that grows past max_body_bytes is refused with 413 payload_too_large."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "'
        for _ in range(8):
            yield b"x" * 512
        yield b'"}'

    status, body, _ = await service.request(
        "POST", "/items", data=chunks(), headers={"content-type": "application/json"}
    )
    assert status == 413
    assert error_of(body)["code"] == "payload_too_large"
    assert (await service.request("POST", "/items", json={"name": "after"}))[0] == 201


async def test_a_body_under_the_limit_is_accepted(service: Service) -> None:
    """A body just under max_body_bytes is processed normally."""
    status, body, _ = await service.request("POST", "/items", json={"name": "pen", "count": 2})
    assert (status, body) == (201, {"name": "pen", "count": 2})


async def test_the_callers_deadline_header_bounds_the_handlers_deadline(service: Service) -> None:
    """x-threadline-timeout-ms becomes the request's deadline; without it the handler's default applies."""
    _, body, _ = await service.request("GET", "/deadline", headers={"x-threadline-timeout-ms": "1500"})
    assert 0 < body["remaining"] <= 1.5
    _, body, _ = await service.request("GET", "/deadline")
    assert body["remaining"] == 100.0
    _, body, _ = await service.request("GET", "/deadline", headers={"x-threadline-timeout-ms": "soon"})
    assert body["remaining"] == 100.0


async def test_paging_parameters_are_read_with_their_defaults(service: Service) -> None:
    """`?limit=&cursor=` become a PageRequest; absent, the limit defaults to 20."""
    assert (await service.request("GET", "/page"))[1] == {"limit": 20, "cursor": None}
    assert (await service.request("GET", "/page?limit=5&cursor=abc"))[1] == {"limit": 5, "cursor": "abc"}


async def test_the_openapi_schema_declares_the_bearer_scheme_and_the_page_parameters(
    service: Service,
) -> None:
    """The token and the page appear in the schema clients are generated from."""
    status, schema, _ = await service.request("GET", "/openapi.json")
    assert status == 200
    assert schema["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    }
    paths = schema["paths"]
    assert paths["/me"]["get"]["security"] == [{"bearer": []}]
    assert paths["/hello"]["get"]["security"] == [{"bearer": []}]
    assert "security" not in paths["/page"]["get"]
    parameters = {p["name"]: p for p in paths["/page"]["get"]["parameters"]}
    assert set(parameters) == {"limit", "cursor"}
    assert {p["in"] for p in parameters.values()} == {"query"}
    limit = parameters["limit"]["schema"]
    assert (limit["type"], limit["minimum"], limit["maximum"], limit["default"]) == ("integer", 1, 100, 20)
    assert {"type": "string", "maxLength": 64} in parameters["cursor"]["schema"]["anyOf"]


async def test_a_caller_route_needs_a_valid_token(service: Service) -> None:
    """A Caller route is 401 without a token or with a bad one, and sees the identity with a good one."""
    status, body, _ = await service.request("GET", "/me")
    assert status == 401
    assert error_of(body)["code"] == "unauthorized"
    status, body, _ = await service.request("GET", "/me", headers={"Authorization": "Bearer nonsense"})
    assert status == 401
    assert error_of(body)["code"] == "invalid_token"
    expired = service.token(iat=int(time.time()) - 1000, exp=int(time.time()) - 10)
    status, body, _ = await service.request("GET", "/me", headers={"Authorization": f"Bearer {expired}"})
    assert status == 401
    assert error_of(body)["code"] == "token_expired"
    status, body, _ = await service.request(
        "GET", "/me", headers={"Authorization": f"Bearer {service.token()}"}
    )
    assert (status, body) == (200, {"user_id": "user-1", "handle": "ada"})


async def test_a_viewer_route_is_open_to_anonymous_callers_but_checks_a_given_token(service: Service) -> None:
    """A Viewer route serves anonymous callers, identifies token holders, and refuses bad tokens."""
    assert (await service.request("GET", "/hello"))[1] == {"handle": None}
    headers = {"Authorization": f"Bearer {service.token()}"}
    assert (await service.request("GET", "/hello", headers=headers))[1] == {"handle": "ada"}
    status, body, _ = await service.request("GET", "/hello", headers={"Authorization": "Bearer x.y.z"})
    assert status == 401
    assert error_of(body)["code"] == "invalid_token"


async def test_a_request_is_in_flight_for_the_rest_of_the_process_until_it_is_answered(
    key: Ed25519PrivateKey,
) -> None:
    """While one request is held, another sees it in flight; a request never counts itself."""
    release = asyncio.Event()
    router = APIRouter()

    @router.get("/held")
    async def held() -> dict[str, int]:
        await release.wait()
        return {"others": other_requests_in_flight()}

    @router.get("/others")
    async def others() -> dict[str, int]:
        return {"others": other_requests_in_flight()}

    async def jwks() -> dict[str, Any]:
        return {"keys": [public_jwk(key, "k1")]}

    app = create_app(title="test", routers=[router], readiness={}, token_verifier=TokenVerifier(jwks))
    async with serving(app) as url, aiohttp.ClientSession() as http:

        async def others_seen_by(path: str) -> int:
            async with http.get(f"{url}{path}") as response:
                assert response.status == 200
                seen: int = (await response.json())["others"]
                return seen

        assert await others_seen_by("/others") == 0
        held_request = asyncio.create_task(others_seen_by("/held"))

        async def held_request_arrived() -> None:
            assert other_requests_in_flight() == 1

        try:
            await eventually(held_request_arrived, within=10)
            assert await others_seen_by("/others") == 1
        finally:
            release.set()
        assert await held_request == 0
        assert other_requests_in_flight() == 0


class _FailingLayer:
    """Middleware that fails before the app sees the request: a crash on /crash, a refusal on /refuse."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("path") == "/crash":
            raise RuntimeError(SECRET_DETAIL)
        if scope.get("path") == "/refuse":
            raise ServiceUnavailable("users", "connection refused")
        await self.app(scope, receive, send)


async def test_a_failure_in_a_layer_before_fastapi_is_answered_in_the_error_shape(
    key: Ed25519PrivateKey,
) -> None:
    """Middleware runs ahead of FastAPI's own error handling; what it raises is still an API error."""

    async def jwks() -> dict[str, Any]:
        return {"keys": [public_jwk(key, "k1")]}

    app = create_app(
        title="test",
        routers=[build_router()],
        readiness={},
        token_verifier=TokenVerifier(jwks),
        middleware=[Middleware(_FailingLayer)],
    )
    async with serving(app) as url, aiohttp.ClientSession() as http:
        async with http.get(f"{url}/crash") as response:
            assert response.status == 500
            body = await response.json()
            assert error_of(body)["code"] == "internal_error"
            assert SECRET_DETAIL not in str(body)
        async with http.get(f"{url}/refuse") as response:
            assert response.status == 503
            assert await response.json() == {
                "error": {
                    "code": "service_unavailable",
                    "message": "users is unavailable: connection refused",
                }
            }
        async with http.get(f"{url}/healthz") as response:
            assert response.status == 200
        async with http.get(f"{url}/metrics") as response:
            text = await response.text()
    assert 'http_requests_total{method="GET",route="unmatched",status="500"} 1' in text
    assert 'http_requests_total{method="GET",route="unmatched",status="503"} 1' in text
