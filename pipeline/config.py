"""Settings: command-line flags, then ``SIGNALBOX_*`` environment variables, then defaults."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./signalbox.db"

# The addresses TradingView documents as the senders of webhook alerts.
TRADINGVIEW_SENDERS = ("52.89.214.238", "34.212.75.30", "54.218.53.128", "52.32.178.7")

Networks = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every setting of the server. The README's configuration table mirrors this class."""

    model_config = SettingsConfigDict(env_prefix="SIGNALBOX_", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    migrate: bool = True
    heartbeat: float = Field(15.0, gt=0)
    hello_timeout: float = Field(10.0, gt=0)
    admin_token: SecretStr | None = None
    webhook_secret: SecretStr | None = None
    body_limit: int = Field(64 * 1024, ge=1024)
    dedupe_window: float = Field(0.0, ge=0)
    max_lag: int | None = Field(None, gt=0)
    allowed_sources: Networks = []
    trusted_proxies: Networks = []
    commit_timeout: float = Field(5.0, gt=0)
    window: int = Field(10_000, ge=100)
    page_size: int = Field(500, ge=10, le=10_000)
    ws_max_message: int = Field(64 * 1024, ge=1024)
    poll_interval: float = Field(1.0, gt=0)
    token_cache: float = Field(2.0, ge=0)
    log_level: str = "info"

    @field_validator("admin_token", "webhook_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # `SIGNALBOX_ADMIN_TOKEN=` means "no token", not a token whose secret is "".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("allowed_sources", "trusted_proxies", mode="before")
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
