"""Runtime settings, read from `EUROUTE_*` environment variables (and a `.env` file)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from proxy.ledger.chain import DEV_PSEUDONYM_SECRET, DEV_SECRET, Keyring

_PACKAGE = Path(__file__).resolve().parent
# The drivers euroute ships with: an async engine needs an async driver.
DATABASE_FORMS = {"sqlite+aiosqlite": "sqlite+aiosqlite:///PATH",
                  "postgresql+asyncpg": "postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DATABASE"}


def bundled(name: str) -> Path:
    """A directory shipped with euroute: inside the wheel, or at the repo root when editable."""
    inside = _PACKAGE / f"_{name}"
    return inside if inside.is_dir() else _PACKAGE.parent / name


def masked_url(url: str) -> str:
    """A database URL fit for a log line: the password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a URL)"


class Settings(BaseSettings):
    # Inputs stay out of validation errors: some hold secrets (database and Redis passwords).
    model_config = SettingsConfigDict(env_prefix="EUROUTE_", env_file=".env", extra="ignore",
                                      hide_input_in_errors=True)

    database_url: str = "sqlite+aiosqlite:///./euroute.db"
    # Unset: ./policies when it exists, else the policies shipped with euroute.
    policy_dir: Path | None = None
    migrate_on_start: bool = True
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    # HMAC key for end-user pseudonyms; never stored in the database. Unset in development: the
    # public development key, which hides nothing.
    pseudonym_key: SecretStr | None = None
    # "aiohttp": httpx-aiohttp (aiohttp under httpx's interface); "httpx": httpx's own transport.
    upstream_transport: Literal["aiohttp", "httpx"] = "aiohttp"
    # Upstream limits; each route may override them in routes.yaml (`upstream:`).
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    # Until the answer's headers: a JSON answer's headers come after the whole generation.
    upstream_first_byte_timeout_s: float = Field(default=120.0, gt=0)
    # Longest silence between two stream events (or two reads of a JSON body).
    upstream_idle_timeout_s: float = Field(default=60.0, gt=0)
    upstream_total_timeout_s: float = Field(default=600.0, gt=0)
    upstream_max_json_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    upstream_max_event_bytes: int = Field(default=1024 * 1024, gt=0)
    # All answer header lines together (and each one): larger answers are refused unread.
    upstream_max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)
    policy_poll_s: float = Field(default=2.0, ge=0)
    key_refresh_s: float = Field(default=2.0, gt=0)
    budget_cache_s: float = Field(default=5.0, ge=0)
    ledger_batch_size: int = Field(default=500, gt=0)
    # How long the writer lets rows gather before a write (sooner when a batch is full).
    ledger_gather_s: float = Field(default=0.05, ge=0)
    ledger_buffer_rows: int = Field(default=100_000, gt=0)
    # The writer counts as unhealthy when rows have waited this long without a successful write.
    ledger_max_outage_s: float = Field(default=30.0, gt=0)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    # One line per request and per event: readable text, or one JSON object per line.
    log_format: Literal["text", "json"] = "text"
    # production: `serve` refuses to start without EUROUTE_LEDGER_KEY and EUROUTE_PSEUDONYM_KEY.
    env: Literal["development", "production"] = "development"
    # HMAC key of the ledger's hash chains, kept outside the database (README, Ledger).
    # Unset in development: the public development key, which protects nothing.
    ledger_key: SecretStr | None = None
    # Retired ledger keys, comma-separated: what they signed keeps verifying.
    ledger_keys_old: SecretStr | None = None
    # Where writers append their chain heads (JSON Lines); unset: the log only.
    anchor_dir: Path | None = None
    anchor_interval_s: float = Field(default=60.0, gt=0)
    # An intent is committed before each request is forwarded (durable across SIGKILL).
    ledger_durable: bool = True
    ledger_heartbeat_s: float = Field(default=2.0, gt=0)
    # Recovery takes over the open intents of writers silent for longer than this.
    ledger_grace_s: float = Field(default=30.0, gt=0)

    # Client-side limits of `euroute serve` (proxy/serving.py, SECURITY.md).
    max_header_bytes: int = Field(default=32 * 1024, gt=0)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=10.0, gt=0)
    keep_alive_s: float = Field(default=5.0, gt=0)
    # Per worker; lowered at start to what the file-descriptor limit allows.
    max_connections: int = Field(default=1024, gt=0)
    # Shared rate-limit windows (redis:// or rediss://, Redis or Valkey); unset: per replica.
    redis_url: SecretStr | None = None
    # Prefixes every key, so that several deployments can share one Redis.
    redis_prefix: str = Field(default="euroute:", max_length=200)
    redis_timeout_s: float = Field(default=0.5, gt=0)

    @field_validator("database_url")
    @classmethod
    def _database_form(cls, url: str) -> str:
        try:
            driver = make_url(url).drivername
        except ArgumentError:
            driver = None
        if driver not in DATABASE_FORMS:
            raise ValueError("must be " + " or ".join(DATABASE_FORMS.values())
                             + (f", not a {driver} URL" if driver else ""))
        return url

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: SecretStr | None) -> SecretStr | None:
        if url is not None and not url.get_secret_value().startswith(
                ("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return url

    def keyring(self) -> Keyring:
        """The ledger keys; in production a real key is required."""
        if self.ledger_key is None or not self.ledger_key.get_secret_value():
            if self.env == "production":
                raise ValueError("EUROUTE_LEDGER_KEY is not set: in production the ledger "
                                 "refuses to write a chain anyone with database access could "
                                 "rewrite (README, Ledger)")
            current: str | bytes = DEV_SECRET
        else:
            current = self.ledger_key.get_secret_value()
        old = self.ledger_keys_old.get_secret_value() if self.ledger_keys_old else ""
        return Keyring.of(current, old)

    def pseudonym_secret(self) -> bytes:
        """The end-user pseudonym key; in production a real key is required."""
        if self.pseudonym_key is None or not self.pseudonym_key.get_secret_value():
            if self.env == "production":
                raise ValueError("EUROUTE_PSEUDONYM_KEY is not set: in production euroute "
                                 "refuses to make or look up end-user pseudonyms with the public "
                                 "development key, which anyone could recompute (README, "
                                 "Retention and erasure)")
            return DEV_PSEUDONYM_SECRET
        return self.pseudonym_key.get_secret_value().encode()

    def resolved_policy_dir(self) -> Path:
        if self.policy_dir is not None:
            return self.policy_dir
        local = Path("policies")
        return local if local.is_dir() else bundled("policies")

    def environment(self) -> dict[str, str]:
        """The variables routes name for their base URL and key (`MISTRAL_BASE_URL`,
        `MISTRAL_API_KEY`, ...): the process environment over the `.env` file, as for the
        settings themselves. Read on each call, so a policy reload sees an edited `.env`."""
        env_file = self.model_config.get("env_file")
        found: dict[str, str] = {}
        if isinstance(env_file, str | Path) and Path(env_file).is_file():
            found = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
        found.update(os.environ)
        return found
