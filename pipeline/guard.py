"""Who may knock, and how often: failed-authentication limits per address, ingestion rates per
token, the WebSocket Origin allowlist and the client-certificate check of webhooks.

:class:`Guard` holds the state (in memory, per process, bounded); :class:`GuardMiddleware`
applies it to HTTP requests and WebSocket upgrades before the routes see them. The routes call
:meth:`Guard.admit` (ingestion rate) and the WebSocket hello :meth:`Guard.authenticate`.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import math
import time
from collections import OrderedDict
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.auth import SourcePolicy, Token, TokenStore
from pipeline.config import Settings, normal_origin
from pipeline.errors import (
    ClientCertificateRequired,
    TooManyAuthFailures,
    TooManyRequests,
    Unauthorized,
)

# Routes that take a token; a refused address gets 429 on these (and on /ws hellos) only.
AUTHENTICATED_PATHS = ("/api/", "/webhooks/")
# The client's address as the guard found it, kept in the request's scope for the endpoints.
CLIENT_ADDRESS = "signalbox.client_address"
MAX_TRACKED = 10_000


class FailureCounter:
    """Failed authentications per client address, in fixed windows that start at the first
    failure. An address with ``limit`` failures in its window is refused until it ends.

    At most ``capacity`` addresses are tracked: past that the oldest window is forgotten
    first (it is also the one closest to its end).
    """

    def __init__(self, limit: int, window: float, capacity: int = MAX_TRACKED) -> None:
        self.limit = limit
        self.window = window
        self.capacity = capacity
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def retry_after(self, address: str | None) -> int | None:
        """Seconds until ``address`` may try again, or None when it is not refused."""
        if not self.limit or address is None:
            return None
        address = _holder(address)
        entry = self._windows.get(address)
        if entry is None:
            return None
        left = entry[0] + self.window - time.monotonic()
        if left <= 0:
            del self._windows[address]
            return None
        return max(1, math.ceil(left)) if entry[1] >= self.limit else None

    def failed(self, address: str | None) -> None:
        if not self.limit or address is None:
            return
        address = _holder(address)
        now = time.monotonic()
        entry = self._windows.get(address)
        if entry is None or now - entry[0] >= self.window:
            self._windows.pop(address, None)
            self._windows[address] = (now, 1)  # at the end: the windows stay in start order
            while len(self._windows) > self.capacity:
                self._windows.popitem(last=False)
        else:
            self._windows[address] = (entry[0], entry[1] + 1)


@functools.lru_cache(maxsize=4096)
def _holder(address: str) -> str:
    """What one client controls: an IPv4 address, or an IPv6 /64 (a host gets a whole one)."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)

class TokenBuckets:
    """A token bucket per token name: ``rate`` signals a second on average, ``burst`` at once.
    A rate of 0 admits everything."""

    def __init__(self, rate: float, burst: int, capacity: int = MAX_TRACKED) -> None:
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, name: str) -> int | None:
        """Take one signal's worth; None when admitted, else the seconds to wait."""
        if self.rate <= 0:
            return None
        now = time.monotonic()
        level, then = self._buckets.pop(name, (float(self.burst), now))
        level = min(float(self.burst), level + (now - then) * self.rate)
        admitted = level >= 1
        self._buckets[name] = (level - 1 if admitted else level, now)
        while len(self._buckets) > self.capacity:
            self._buckets.popitem(last=False)  # the longest unused: full again by now
        return None if admitted else max(1, math.ceil((1 - level) / self.rate))


class Guard:
    def __init__(self, settings: Settings) -> None:
        self.sources = SourcePolicy.from_settings(settings.allowed_sources,
                                                  settings.trusted_proxies)
        self.failures = FailureCounter(settings.auth_failures, settings.auth_failure_window)
        self.buckets = TokenBuckets(settings.ingest_rate, settings.ingest_burst)
        self.ws_origins = frozenset(settings.ws_origins)
        self.cert_header = (settings.client_cert_header or "").lower() or None
        self.cert_value = settings.client_cert_value or ""

    def address(self, scope: Scope) -> str | None:
        """The client's address as the source policy sees it (behind trusted proxies too)."""
        client = scope.get("client")
        return self.sources.client_address(client[0] if client else None, Headers(scope=scope))

    def refuse_failing(self, address: str | None) -> None:
        wait = self.failures.retry_after(address)
        if wait is not None:
            raise TooManyAuthFailures(
                f"too many failed authentications from {address}: wait {wait} s, then use a "
                "valid token", wait)

    async def authenticate(self, tokens: TokenStore, secret: str | None,
                           address: str | None) -> Token:
        """The token, counting a failure against ``address``; 429 while it is refused."""
        self.refuse_failing(address)
        try:
            return await tokens.authenticate(secret)
        except Unauthorized:
            self.failures.failed(address)
            raise

    def admit(self, token: Token) -> None:
        """One signal from ``token`` within its ingestion rate, or :class:`TooManyRequests`."""
        wait = self.buckets.take(token.name)
        if wait is not None:
            raise TooManyRequests(
                f"token {token.name!r} is over its rate of {self.buckets.rate:g} signals a "
                f"second: retry in {wait} s, or raise SIGNALBOX_INGEST_RATE", wait)

    def check_client_cert(self, scope: Scope) -> None:
        if self.cert_header is None:
            return
        headers = Headers(scope=scope)
        value = headers.get(self.cert_header, "")
        client = scope.get("client")
        # With proxies configured, only one of them may vouch for a certificate: a client
        # that reaches the server directly could set the header itself.
        from_proxy = not self.sources.trusted or self.sources.trusts(client[0] if client
                                                                      else None)
        if not from_proxy or not hmac.compare_digest(value.encode(), self.cert_value.encode()):
            raise ClientCertificateRequired(
                "webhooks must come through the TLS terminator with a verified client "
                "certificate: check its ssl_verify_client and the header it sets")

    def origin_allowed(self, scope: Scope) -> bool:
        """No Origin (not a browser), a listed Origin, or the server's own: allowed."""
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None or not self.ws_origins:
            return True
        origin = normal_origin(origin)
        if origin in self.ws_origins:
            return True
        host = headers.get("host")
        return host is not None and urlsplit(origin).netloc == host.strip().lower()


class GuardMiddleware:
    """Refuses before routing: addresses over the failure limit (429 on authenticated routes),
    webhooks without the client-certificate header (403), WebSocket upgrades from Origins not
    allowed (403). Counts each 401 answered as a failed authentication of its address."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            if not self.guard.origin_allowed(scope):
                await _deny_websocket(scope, send)
                return
        elif scope["type"] == "http" and scope["path"].startswith(AUTHENTICATED_PATHS):
            address = scope[CLIENT_ADDRESS] = self.guard.address(scope)
            try:
                self.guard.refuse_failing(address)
                if scope["path"].startswith("/webhooks/"):
                    self.guard.check_client_cert(scope)
            except (TooManyRequests, ClientCertificateRequired) as exc:
                await _send_error(send, exc)
                return

            async def counting(message: Message) -> None:
                if message["type"] == "http.response.start" and message["status"] == 401:
                    self.guard.failures.failed(address)
                await send(message)

            await self.app(scope, receive, counting)
            return
        await self.app(scope, receive, send)


async def _send_error(send: Send, exc: TooManyRequests | ClientCertificateRequired) -> None:
    body = json.dumps(exc.to_body()).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if isinstance(exc, TooManyRequests):
        headers.append((b"retry-after", str(exc.retry_after).encode()))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _deny_websocket(scope: Scope, send: Send) -> None:
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})  # answered as 403 by the server
        return
    body = json.dumps({
        "error": "origin_not_allowed",
        "message": "this page's Origin may not open /ws: add it to SIGNALBOX_WS_ORIGINS",
    }).encode()
    await send({"type": "websocket.http.response.start", "status": 403,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "websocket.http.response.body", "body": body})
