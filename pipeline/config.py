"""Settings: command-line flags, then ``SIGNALBOX_*`` environment variables, then defaults."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./signalbox.db"
DATABASE_URL_FORMS = "sqlite+aiosqlite:///PATH or postgresql+asyncpg://USER@HOST/DB"

# The addresses TradingView documents as the senders of webhook alerts.
TRADINGVIEW_SENDERS = ("52.89.214.238", "34.212.75.30", "54.218.53.128", "52.32.178.7")

Networks = Annotated[list[str], NoDecode]
Origins = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every setting of the server. The README's configuration table mirrors this class."""

    model_config = SettingsConfigDict(env_prefix="SIGNALBOX_", extra="ignore")

    database_url: str = Field(DEFAULT_DATABASE_URL, description=DATABASE_URL_FORMS)
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free one)")
    migrate: bool = Field(True, description="upgrade the schema before serving")
    workers: int = Field(1, ge=1, le=64, description=(
        "processes serving the port, each writing to the one log (1: this process alone)"))
    pool_size: int = Field(5, ge=1, le=100, description=(
        "database connections for reads (as many more under load); writes use one"))
    heartbeat: float = Field(15.0, gt=0, description="seconds between WebSocket pings")
    hello_timeout: float = Field(10.0, gt=0, description="seconds a client has to say hello")
    admin_token: SecretStr | None = Field(None, description="a token with every scope")
    webhook_secret: SecretStr | None = Field(None, description="a token with scope ingest")
    body_limit: int = Field(64 * 1024, ge=1024, description="largest request body in bytes")
    dedupe_window: float = Field(0.0, ge=0, description=(
        "seconds within which an identical body from the same token is a repeat (0: off)"))
    max_lag: int | None = Field(None, gt=0, description=(
        "seconds after its signal time at which a signal without max_lag is expired"))
    allowed_sources: Networks = Field([], description=(
        "comma-separated CIDRs allowed to post webhooks, or tradingview (empty: everyone)"))
    trusted_proxies: Networks = Field([], description=(
        "comma-separated CIDRs of reverse proxies whose X-Forwarded-For is believed"))
    commit_timeout: float = Field(5.0, gt=0, description=(
        "seconds to wait for a commit before answering 503"))
    read_timeout: float = Field(2.0, gt=0, description=(
        "seconds a database read may wait for a connection or behind a lock (PostgreSQL) "
        "before its request is answered 503"))
    query_timeout: float = Field(30.0, gt=0, description=(
        "seconds a database read may run (PostgreSQL) before its request is answered 503"))
    window: int = Field(10_000, ge=100, description="recent events kept in memory for subscribers")
    window_bytes: int = Field(32 * 2**20, ge=2**20, description=(
        "at most this many bytes of their JSON in that window (big events hold it to fewer)"))
    page_size: int = Field(500, ge=10, le=10_000, description=(
        "events per page when a subscriber is paged from the log"))
    ws_max_message: int = Field(64 * 1024, ge=1024, description=(
        "largest WebSocket message a client may send, in bytes"))
    ws_frame_rate: float = Field(2000.0, ge=1, description=(
        "WebSocket frames a client may send per second (and at once); over it: close 1008"))
    ws_compression: bool = Field(False, description=(
        "accept permessage-deflate from WebSocket clients that offer it: less bandwidth, but "
        "every event compressed for each subscriber alone, and about 40 KiB more each"))
    poll_interval: float = Field(1.0, gt=0, description=(
        "seconds between looks for events appended by other processes"))
    token_cache: float = Field(2.0, ge=0, description=(
        "seconds a token check is cached (revocation takes effect within it)"))
    claim_lease: float = Field(300.0, gt=0, description=(
        "seconds after which a processing claim without an outcome is listed as stuck"))
    handler: str | None = Field(None, description=(
        "in-process handler: module:function, or a name such as log or forward"))
    handler_attempts: int = Field(5, ge=1, le=100, description=(
        "tries of a handler before the signal fails"))
    handler_backoff: float = Field(0.5, ge=0, description=(
        "first retry delay of a handler, in seconds (doubles each try, full jitter)"))
    handler_concurrency: int = Field(8, ge=1, le=256, description=(
        "tickers handled at once (one ticker's signals always run in order)"))
    handler_timeout: float = Field(30.0, gt=0, description="seconds one handler call may take")
    # At least 1 s: each renewal may take a quarter of the lease, and a group commit that
    # takes longer than 0.25 s is already a problem (docs/operations.md).
    handler_lease: float = Field(10.0, ge=1, description=(
        "seconds an instance holds the handler's lease (at least 1); a sibling takes over "
        "after it lapses"))
    forward_url: str | None = Field(None, description="where the forward handler POSTs signals")
    forward_secret: SecretStr | None = Field(None, description=(
        "HMAC key of the forward handler's X-Signalbox-Signature"))
    forward_timeout: float = Field(5.0, gt=0, description=(
        "seconds the forward handler waits for an answer"))
    auth_failures: int = Field(10, ge=0, description=(
        "failed authentications from one address within the window before it gets 429 "
        "(0: no limit)"))
    auth_failure_window: float = Field(60.0, gt=0, description=(
        "seconds over which failed authentications are counted, and an address refused"))
    ingest_rate: float = Field(0.0, ge=0, description=(
        "signals per second one token may post, on average (0: no limit)"))
    ingest_burst: int = Field(20, ge=1, description=(
        "signals one token may post at once before ingest_rate applies"))
    ws_origins: Origins = Field([], description=(
        "comma-separated browser Origins allowed to open /ws besides the server's own "
        "(empty: any)"))
    cors_origins: Origins = Field([], description=(
        "comma-separated browser Origins allowed to call the API (empty: no CORS)"))
    behind_tls: bool = Field(False, description=(
        "tell browsers the server is reached over HTTPS only (Strict-Transport-Security)"))
    header_limit: int = Field(16 * 1024, ge=1024, le=1 << 20, description=(
        "largest request line and header block in bytes (431 above)"))
    header_count: int = Field(100, ge=10, le=1000, description=(
        "most header lines in one request (431 above)"))
    header_timeout: float = Field(10.0, gt=0, description=(
        "seconds a client has to send the line and headers of a request"))
    body_timeout: float = Field(10.0, gt=0, description=(
        "seconds a client has to send the body of a request (408 after)"))
    keep_alive_timeout: int = Field(5, ge=1, description=(
        "seconds an idle keep-alive connection stays open"))
    limit_concurrency: int | None = Field(None, ge=1, description=(
        "most connections and requests at once; more get 503 (default: no limit)"))
    client_cert_header: str | None = Field(None, description=(
        "header in which the TLS terminator reports the client certificate check"))
    client_cert_value: str | None = Field(None, description=(
        "the value client_cert_header must have for a webhook to be taken"))
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug, info, warning or error")
    log_format: Literal["text", "json"] = Field("text", description=(
        "text, or json: one JSON object per line with time, level, logger, message, "
        "request_id and fields"))
    access_log: bool = Field(False, description=(
        "log a line per HTTP request (webhook tokens redacted); costs a tenth of throughput"))

    @field_validator("admin_token", "webhook_secret", "forward_secret", "client_cert_header",
                     "client_cert_value", "limit_concurrency", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `SIGNALBOX_ADMIN_TOKEN=` means "no token", not a token whose secret is "".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        # Never echo the value: it may hold a password.
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(f"not a database URL: use {DATABASE_URL_FORMS}") from None
        if url.drivername == "sqlite+aiosqlite":
            if not url.database or url.database == ":memory:":
                raise ValueError("SQLite needs a file: use sqlite+aiosqlite:///PATH")
        elif url.drivername != "postgresql+asyncpg":
            raise ValueError(f"unsupported database URL scheme {url.drivername!r}: use "
                             f"{DATABASE_URL_FORMS}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("allowed_sources", "trusted_proxies", "ws_origins", "cors_origins",
                     mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("allowed_sources", "trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        expanded: list[str] = []
        for item in value:
            if item.lower() == "tradingview":
                expanded.extend(TRADINGVIEW_SENDERS)
                continue
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP address or CIDR network (or the word tradingview)"
                ) from None
            expanded.append(item)
        return expanded

    @field_validator("ws_origins", "cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        origins = []
        for item in value:
            origin = normal_origin(item)
            scheme, _, host = origin.partition("://")
            if scheme not in ("http", "https") or not host or "/" in host:
                raise ValueError(f"{item!r} is not an origin such as https://example.com:8443")
            origins.append(origin)
        return origins

    @model_validator(mode="after")
    def _client_cert_pair(self) -> Settings:
        if (self.client_cert_header is None) != (self.client_cert_value is None):
            raise ValueError("client_cert_header and client_cert_value go together: set both "
                             "or neither")
        return self


def normal_origin(value: str) -> str:
    """An Origin as browsers send it: scheme://host[:port], lower case, no trailing slash."""
    return value.strip().rstrip("/").lower()
