"""A thin client of the public API for end-to-end tests: every answer's status and JSON body."""

import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass
class Reply:
    """One HTTP answer."""

    status: int
    body: Any

    @property
    def error_code(self) -> str | None:
        """The `error.code` of an API.md error body, if this is one."""
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"].get("code"))
        return None


class Api:
    """Calls the gateway over a real socket."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url
        self._session = session

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """Send one request and read the whole answer."""
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        async with self._session.request(
            method, self.base_url + path, json=json, data=data, headers=all_headers
        ) as response:
            raw = await response.read()
            body = await response.json(content_type=None) if raw else None
            return Reply(response.status, body)

    async def sign_up(self, prefix: str, display_name: str | None = None) -> tuple[dict[str, Any], str]:
        """Register a fresh account and log in; returns the user and an access token."""
        handle = f"{prefix}_{uuid.uuid4().hex[:8]}"
        body: dict[str, Any] = {"handle": handle, "password": "a good password"}
        if display_name is not None:
            body["display_name"] = display_name
        created = await self.call("POST", "/api/v1/users", json=body)
        assert created.status == 201, created
        session = await self.call(
            "POST", "/api/v1/sessions", json={"handle": handle, "password": "a good password"}
        )
        assert session.status == 200, session
        return created.body, session.body["access_token"]
