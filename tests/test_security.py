"""Hardening from an attacker's side: failed-authentication limits, ingestion rates, Origins,
CORS, security headers, the client-certificate header, slow and oversized requests.

Every test runs a real server; the limits are in memory, per process, so SQLite suffices
except where said.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import websockets
from pydantic import ValidationError
from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from pipeline.config import Settings
from pipeline.guard import FailureCounter, TokenBuckets
from pipeline.headers import SecurityHeaders
from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    ServerProcess,
    headers,
    next_frame,
    read_all_events,
)
from tests.test_ws import expect_close

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}
ATTACKER = "203.0.113.5"
BYSTANDER = "203.0.113.9"
SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def start(database_url: str, *args: str) -> ServerProcess:
    return ServerProcess(database_url, args=list(args)).start()


# Three failures in a 3 s window; 127.0.0.1 is a trusted proxy, so each test picks its
# client's address with X-Forwarded-For.
GUARDED = pytest.mark.server_args("--auth-failures", "3", "--auth-failure-window", "3",
                                  "--trusted-proxies", "127.0.0.1/32")


def as_from(address: str, token: str | None = None) -> dict[str, str]:
    found = {"X-Forwarded-For": address}
    if token is not None:
        found["Authorization"] = f"Bearer {token}"
    return found


AUTHENTICATED = [
    ("POST", "/api/signals"), ("GET", "/api/signals"), ("GET", "/api/events"),
    ("GET", "/api/signals/some-id"), ("POST", "/api/signals/some-id/status"),
    ("POST", "/api/signals/some-id/renormalize"), ("GET", "/api/consumers"),
    ("POST", "/webhooks/tradingview"), ("POST", f"/webhooks/tradingview/{INGEST_TOKEN}"),
]


@SQLITE
@GUARDED
async def test_failed_authentications_get_an_address_429_until_the_window_passes(
        server: ServerProcess, client: httpx.AsyncClient) -> None:
    http, guarded = client, server
    for _ in range(3):
        response = await http.get("/api/events", headers=as_from(ATTACKER, "sbx_guess"))
        assert response.status_code == 401
    # Refused now, with a valid token too, on every authenticated route.
    refused = await http.post("/api/signals", json=BTC, headers=as_from(ATTACKER, ADMIN_TOKEN))
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"] == "too_many_auth_failures" and refused.json()["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 3
    for method, path in AUTHENTICATED:
        response = await http.request(method, path, json=BTC,
                                      headers=as_from(ATTACKER, ADMIN_TOKEN))
        assert response.status_code == 429, (method, path, response.text)
    assert (await http.get("/healthz", headers=as_from(ATTACKER))).status_code == 200
    # ... and a WebSocket hello from it is closed with 4429.
    async with websockets.connect(guarded.ws_url,
                                  additional_headers=as_from(ATTACKER)) as conn:
        await conn.send(json.dumps({"op": "hello", "token": ADMIN_TOKEN}))
        error = await expect_close(conn, 4429)
        assert 1 <= error["retry_after"] <= 3
    # Another address is not affected.
    other = await http.post("/api/signals", json=BTC, headers=as_from(BYSTANDER, INGEST_TOKEN))
    assert other.status_code == 202, other.text
    # Nothing the refused requests carried was recorded.
    assert len(await read_all_events(http)) == 2
    # When the window has passed, the address is served again.
    deadline = time.monotonic() + 15
    while True:
        response = await http.get("/api/events", headers=as_from(ATTACKER, ADMIN_TOKEN))
        if response.status_code == 200:
            break
        assert response.status_code == 429 and time.monotonic() < deadline
        await asyncio.sleep(0.2)


@SQLITE
@GUARDED
async def test_failed_websocket_hellos_count_too(server: ServerProcess,
                                                 client: httpx.AsyncClient) -> None:
    http, guarded = client, server
    for _ in range(3):
        async with websockets.connect(guarded.ws_url,
                                      additional_headers=as_from(ATTACKER)) as conn:
            await conn.send(json.dumps({"op": "hello", "token": "sbx_guess"}))
            await expect_close(conn, 4401)
    response = await http.get("/api/events", headers=as_from(ATTACKER, ADMIN_TOKEN))
    assert response.status_code == 429
    async with websockets.connect(guarded.ws_url,
                                  additional_headers=as_from(BYSTANDER)) as conn:
        await conn.send(json.dumps({"op": "hello", "token": ADMIN_TOKEN}))
        assert (await next_frame(conn))["op"] == "welcome"


def test_failure_counter_tracks_a_bounded_number_of_addresses() -> None:
    counter = FailureCounter(limit=1, window=60, capacity=100)
    for n in range(1000):
        counter.failed(f"10.0.{n // 256}.{n % 256}")
    assert len(counter) == 100
    assert counter.retry_after("10.0.3.231") is not None  # the last one is still refused
    assert counter.retry_after("10.0.0.0") is None  # the first ones were forgotten
    counter.failed("2001:db8:1:2::1")  # an IPv6 host holds its whole /64
    assert counter.retry_after("2001:db8:1:2:ffff::9") is not None
    assert counter.retry_after("2001:db8:1:3::1") is None
    buckets = TokenBuckets(rate=1, burst=1, capacity=10)
    for n in range(100):
        buckets.take(f"token-{n}")
    assert len(buckets._buckets) == 10


@SQLITE
async def test_ingestion_rate_per_token_refuses_with_429_and_records_nothing(
        database_url: str) -> None:
    server = start(database_url, "--ingest-rate", "0.5", "--ingest-burst", "2")
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            for _ in range(2):
                response = await http.post("/api/signals", json=BTC,
                                           headers=headers(INGEST_TOKEN))
                assert response.status_code == 202, response.text
            refused = await http.post(f"/webhooks/tradingview/{INGEST_TOKEN}",
                                      content=json.dumps(BTC))
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"] == "too_many_requests"
            assert int(refused.headers["retry-after"]) >= 1
            assert len(await read_all_events(http)) == 4  # two signals, nothing more
            # Another token has a bucket of its own.
            other = await http.post("/api/signals", json=BTC, headers=headers(ADMIN_TOKEN))
            assert other.status_code == 202
            deadline = time.monotonic() + 15
            while (await http.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
                   ).status_code == 429:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
    finally:
        server.stop()


SECURITY = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer",
            "x-frame-options": "DENY",
            "content-security-policy": "default-src 'none'; frame-ancestors 'none'"}


@SQLITE
@pytest.mark.parametrize("behind_tls", [False, True])
async def test_security_headers_on_every_answer(database_url: str, behind_tls: bool) -> None:
    server = start(database_url, *(["--behind-tls"] if behind_tls else []))
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            answers = [
                await http.get("/healthz"), await http.get("/readyz"),
                await http.get("/metrics"), await http.get("/api/events"),
                await http.get("/api/events", headers=headers()),
                await http.get("/nowhere"), await http.delete("/api/events"),
                await http.get("/api/events?stream=%00"),  # refused with the request id
                await http.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN)),
                await http.post("/webhooks/tradingview/sbx_wrong", content="x"),
                await http.post("/api/signals", content="x" * 70_000,
                                headers=headers(INGEST_TOKEN)),
            ]
        for response in answers:
            for name, value in SECURITY.items():
                assert response.headers.get(name) == value, (response.url, name)
            assert "server" not in response.headers
            assert ("strict-transport-security" in response.headers) is behind_tls
    finally:
        server.stop()


async def test_a_page_keeps_its_own_content_security_policy() -> None:
    page_csp = "default-src 'self'"

    async def page(scope: Scope, receive: Receive, send: Send) -> None:
        response = PlainTextResponse("<p>hi</p>", headers={"Content-Security-Policy": page_csp})
        await response(scope, receive, send)

    transport = httpx.ASGITransport(app=SecurityHeaders(page, behind_tls=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.get("/")
    assert response.headers["content-security-policy"] == page_csp
    assert response.headers["x-frame-options"] == "DENY"


@SQLITE
async def test_websocket_origin_allowlist(database_url: str) -> None:
    server = start(database_url, "--ws-origins", "https://good.example")
    own = f"http://127.0.0.1:{server.port}"
    try:
        for origin in ("https://good.example", own, None):
            kwargs: dict[str, Any] = {"origin": origin} if origin else {}
            async with websockets.connect(server.ws_url, **kwargs) as conn:
                await conn.send(json.dumps({"op": "hello", "token": ADMIN_TOKEN}))
                assert (await next_frame(conn))["op"] == "welcome", origin
        for origin in ("https://evil.example", "http://127.0.0.1:1", "null"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(server.ws_url, origin=origin)  # type: ignore[arg-type]
            assert refused.value.response.status_code == 403, origin
            assert json.loads(refused.value.response.body or b"{}")["error"] == (
                "origin_not_allowed")
    finally:
        server.stop()


@SQLITE
async def test_without_an_allowlist_any_origin_may_open_the_stream(
        server: ServerProcess) -> None:
    async with websockets.connect(server.ws_url,
                                  origin="https://elsewhere.example") as conn:  # type: ignore[arg-type]
        await conn.send(json.dumps({"op": "hello", "token": ADMIN_TOKEN}))
        assert (await next_frame(conn))["op"] == "welcome"


PREFLIGHT = {"Access-Control-Request-Method": "GET",
             "Access-Control-Request-Headers": "authorization"}


@SQLITE
async def test_no_cors_unless_configured(server: ServerProcess,
                                         client: httpx.AsyncClient) -> None:
    origin = {"Origin": "https://app.example"}
    preflight = await client.options("/api/events", headers={**origin, **PREFLIGHT})
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in preflight.headers
    answer = await client.get("/api/events", headers={**origin, **headers()})
    assert answer.status_code == 200
    assert "access-control-allow-origin" not in answer.headers


@SQLITE
async def test_cors_for_configured_origins(database_url: str) -> None:
    server = start(database_url, "--cors-origins", "https://app.example,https://b.example/")
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            origin = {"Origin": "https://app.example"}
            preflight = await http.options("/api/events", headers={**origin, **PREFLIGHT})
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == "https://app.example"
            assert "Authorization" in preflight.headers["access-control-allow-headers"]
            assert "GET" in preflight.headers["access-control-allow-methods"]
            assert preflight.headers["vary"] == "Origin"
            answer = await http.get("/api/events", headers={**origin, **headers()})
            assert answer.headers["access-control-allow-origin"] == "https://app.example"
            other = {"Origin": "https://evil.example"}
            refused = await http.options("/api/events", headers={**other, **PREFLIGHT})
            assert "access-control-allow-origin" not in refused.headers
            answer = await http.get("/api/events", headers={**other, **headers()})
            assert "access-control-allow-origin" not in answer.headers
    finally:
        server.stop()


@SQLITE
async def test_webhooks_need_the_client_certificate_header_when_configured(
        database_url: str) -> None:
    server = start(database_url, "--client-cert-header", "X-Client-Verify",
                   "--client-cert-value", "SUCCESS")
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            url = f"/webhooks/tradingview/{INGEST_TOKEN}"
            for sent in ({}, {"X-Client-Verify": "FAILED:unknown ca"},
                         {"X-Client-Verify": "NONE"}):
                response = await http.post(url, content=json.dumps(BTC), headers=sent)
                assert response.status_code == 403, sent
                assert response.json()["error"] == "client_certificate_required"
            verified = {"X-Client-Verify": "SUCCESS"}
            assert (await http.post(url, content=json.dumps(BTC),
                                    headers=verified)).status_code == 202
            body = json.dumps({**BTC, "passphrase": INGEST_TOKEN})
            assert (await http.post("/webhooks/tradingview", content=body,
                                    headers=verified)).status_code == 202
            # The API is for bots, not TradingView: no certificate asked of it.
            assert (await http.post("/api/signals", json=BTC,
                                    headers=headers(INGEST_TOKEN))).status_code == 202
            assert len(await read_all_events(http)) == 6
    finally:
        server.stop()


@SQLITE
async def test_the_header_counts_only_from_a_trusted_proxy(database_url: str) -> None:
    server = start(database_url, "--client-cert-header", "X-Client-Verify",
                   "--client-cert-value", "SUCCESS", "--trusted-proxies", "10.0.0.0/8")
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            response = await http.post(f"/webhooks/tradingview/{INGEST_TOKEN}",
                                       content=json.dumps(BTC),
                                       headers={"X-Client-Verify": "SUCCESS"})
            assert response.status_code == 403  # 127.0.0.1 is not the proxy
    finally:
        server.stop()


def test_origin_and_certificate_settings_are_checked() -> None:
    settings = Settings(ws_origins="https://App.example/, http://localhost:3000")
    assert settings.ws_origins == ["https://app.example", "http://localhost:3000"]
    with pytest.raises(ValidationError, match="not an origin"):
        Settings(cors_origins="app.example")
    with pytest.raises(ValidationError, match="go together"):
        Settings(client_cert_header="X-Client-Verify")
