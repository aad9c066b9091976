"""Process settings, read from `THREADLINE_*` environment variables."""

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_SECRET_KEY", "Settings"]

DEFAULT_SECRET_KEY = "development-only-secret-change-me"


class Settings(BaseSettings):
    """Everything a Threadline process is configured by; one instance per process."""

    model_config = SettingsConfigDict(env_prefix="THREADLINE_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    secret_key: str = Field(DEFAULT_SECRET_KEY, min_length=16)
    data_dir: Path = Path(".threadline")
    topology: str = "microservices"
    host: str = "127.0.0.1"
    port: int = 8000
    # service name -> base URL of the process that serves it (set by the runner).
    service_urls: dict[str, str] = {}
    # service name -> SQLAlchemy URL; a service not named gets a SQLite file in data_dir.
    database_urls: dict[str, str] = {}
    nats_url: str | None = None
    events_namespace: str = "threadline"
    access_token_ttl_seconds: int = Field(900, ge=1)
    call_timeout_seconds: float = Field(5.0, gt=0)
    max_body_bytes: int = Field(64 * 1024, ge=1024)
    log_level: str = "info"

    @model_validator(mode="after")
    def _refuse_default_secret_outside_development(self) -> "Settings":
        if self.environment != "development" and self.secret_key == DEFAULT_SECRET_KEY:
            raise ValueError("THREADLINE_SECRET_KEY must be set to a secret of your own outside development")
        return self

    def database_url(self, service: str) -> str:
        """The database URL of one service."""
        if service in self.database_urls:
            return self.database_urls[service]
        return f"sqlite:///{(self.data_dir / f'{service}.db').resolve()}"

    def as_environment(self) -> dict[str, str]:
        """These settings as `THREADLINE_*` variables, so a child process reads the same ones."""
        env = {}
        for name, value in self.model_dump(mode="json").items():
            if value is not None:
                text = value if isinstance(value, str) else json.dumps(value)
                env[f"THREADLINE_{name.upper()}"] = text
        return env
