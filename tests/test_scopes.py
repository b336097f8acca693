"""Scopes on every route and every WebSocket frame, expiry, and revocation of open sockets.

Tokens are made and revoked with the `signalbox token` command, as an operator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import websockets

from tests.support import (
    INGEST_TOKEN,
    PLAIN_HTTP,
    ServerProcess,
    headers,
    next_frame,
    repo_root,
)
from tests.test_ws import expect_close

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}
SCOPES = ["ingest", "read", "report", "admin"]


def signalbox(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--database-url", database_url],
        capture_output=True, text=True, timeout=60, cwd=repo_root(), check=False,
    )


def create_token(database_url: str, name: str, *scopes: str, expires: str | None = None) -> str:
    args = [f"--scope={s}" for s in scopes] + ([f"--expires={expires}"] if expires else [])
    done = signalbox(database_url, "token", "create", name, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1]


class Scoped:
    """One server for the whole table, and a token of each scope."""

    def __init__(self, server: ServerProcess, tokens: dict[str, str]) -> None:
        self.server = server
        self.tokens = tokens


@pytest.fixture(scope="module")
def scoped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scoped]:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('scopes') / 'signalbox.db'}"
    assert signalbox(url, "migrate").returncode == 0
    tokens = {scope: create_token(url, f"only-{scope}", scope) for scope in SCOPES}
    tokens["read+report"] = create_token(url, "reader-reporter", "read", "report")
    server = ServerProcess(url).start()
    try:
        yield Scoped(server, tokens)
    finally:
        server.stop()


@pytest.fixture
async def http(scoped: Scoped) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=scoped.server.base_url, timeout=30,
                                 verify=PLAIN_HTTP) as client:
        yield client


async def new_signal(http: httpx.AsyncClient) -> str:
    response = await http.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
    assert response.status_code == 202, response.text
    signal_id: str = response.json()["signal_id"]
    return signal_id


async def call(http: httpx.AsyncClient, route: str, token: str) -> httpx.Response:
    """One request to ``route`` with ``token``; the signal routes get a fresh signal."""
    bearer = headers(token)
    if route == "webhook with token":
        return await http.post(f"/webhooks/tradingview/{token}", content=json.dumps(BTC))
    if route == "webhook with passphrase":
        return await http.post("/webhooks/tradingview",
                               content=json.dumps({**BTC, "passphrase": token}))
    if route == "post signal":
        return await http.post("/api/signals", json=BTC, headers=bearer)
    if route == "events":
        return await http.get("/api/events", headers=bearer)
    if route == "signals":
        return await http.get("/api/signals", headers=bearer)
    if route == "consumers":
        return await http.get("/api/consumers", headers=bearer)
    signal_id = await new_signal(http)
    if route == "one signal":
        return await http.get(f"/api/signals/{signal_id}", headers=bearer)
    if route == "status":
        return await http.post(f"/api/signals/{signal_id}/status", headers=bearer,
                               json={"status": "dispatched", "consumer": "bot"})
    assert route == "renormalize"
    return await http.post(f"/api/signals/{signal_id}/renormalize", headers=bearer)


# route: (the scopes that may call it, its success status)
ROUTES: dict[str, tuple[set[str], int]] = {
    "webhook with token": ({"ingest", "admin"}, 202),
    "webhook with passphrase": ({"ingest", "admin"}, 202),
    "post signal": ({"ingest", "admin"}, 202),
    "events": ({"read", "admin"}, 200),
    "signals": ({"read", "admin"}, 200),
    "one signal": ({"read", "admin"}, 200),
    "consumers": ({"read", "admin"}, 200),
    "status": ({"report", "admin"}, 200),
    "renormalize": ({"admin"}, 200),
}


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("route", list(ROUTES))
async def test_each_route_with_a_token_of_each_scope(scoped: Scoped, http: httpx.AsyncClient,
                                                     route: str, scope: str) -> None:
    allowed, success = ROUTES[route]
    response = await call(http, route, scoped.tokens[scope])
    if scope in allowed:
        assert response.status_code == success, response.text
    else:
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "forbidden"


async def hello(scoped: Scoped, token: str, **fields: Any) -> websockets.ClientConnection:
    conn = await websockets.connect(scoped.server.ws_url)
    await conn.send(json.dumps({"op": "hello", "token": token, "cursor": None, **fields}))
    return conn


@pytest.mark.parametrize(("scope", "code"), [("ingest", 4403), ("report", 4403),
                                             ("read", None), ("admin", None)])
async def test_hello_needs_read(scoped: Scoped, scope: str, code: int | None) -> None:
    conn = await hello(scoped, scoped.tokens[scope])
    try:
        if code is None:
            assert (await next_frame(conn))["op"] == "welcome"
        else:
            await expect_close(conn, code)
    finally:
        await conn.close()


@pytest.mark.parametrize("scope", ["read", "admin"])
async def test_ack_with_a_consumer_is_stored(scoped: Scoped, http: httpx.AsyncClient,
                                             scope: str) -> None:
    await new_signal(http)
    consumer = f"bot-{uuid.uuid4().hex[:8]}"
    conn = await hello(scoped, scoped.tokens[scope], consumer=consumer, cursor=0)
    try:
        await next_frame(conn)  # welcome
        await conn.send(json.dumps({"op": "ack", "position": 1}))
        await conn.send(json.dumps({"op": "ping"}))
        assert (await _skip_events(conn))["op"] == "pong"  # the ack was handled before it
    finally:
        await conn.close()
    listed = (await http.get("/api/consumers", headers=headers(scoped.tokens["read"]))).json()
    assert {"name": consumer, "position": 1}.items() <= next(
        c for c in listed["consumers"] if c["name"] == consumer).items()


async def _skip_events(conn: websockets.ClientConnection) -> dict[str, Any]:
    while (frame := await next_frame(conn))["op"] in ("event", "live", "ping"):
        pass
    return frame


@pytest.mark.parametrize(("scope", "answer"), [("read", "status_error"),
                                               ("read+report", "status_ok"),
                                               ("admin", "status_ok")])
async def test_status_frames_need_report(scoped: Scoped, http: httpx.AsyncClient,
                                         scope: str, answer: str) -> None:
    signal_id = await new_signal(http)
    conn = await hello(scoped, scoped.tokens[scope], consumer="bot")
    try:
        await next_frame(conn)  # welcome
        await conn.send(json.dumps({"op": "status", "ref": 7, "signal_id": signal_id,
                                    "status": "dispatched"}))
        frame = await _skip_events(conn)
        assert (frame["op"], frame["ref"]) == (answer, 7), frame
        if answer == "status_error":
            assert frame["error"] == "forbidden"
    finally:
        await conn.close()


async def test_an_expired_token_is_refused_on_http_and_websocket(
        scoped: Scoped, http: httpx.AsyncClient) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    token = create_token(scoped.server.database_url, "expired", "admin", expires=past)
    response = await http.get("/api/events", headers=headers(token))
    assert response.status_code == 401 and response.json()["error"] == "unauthorized"
    conn = await hello(scoped, token)
    await expect_close(conn, 4401)
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    token = create_token(scoped.server.database_url, "not-yet", "admin", expires=future)
    assert (await http.get("/api/events", headers=headers(token))).status_code == 200


async def answer_pings(conn: websockets.ClientConnection,
                       frames: list[dict[str, Any]]) -> None:
    """Keep ``conn`` alive as a client should; every frame it receives goes to ``frames``."""
    with contextlib.suppress(websockets.ConnectionClosed):
        async for message in conn:
            frame = json.loads(message)
            frames.append(frame)
            if frame["op"] == "ping":
                with contextlib.suppress(websockets.ConnectionClosed):  # read what is left
                    await conn.send('{"op": "pong"}')


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_revoking_a_token_closes_its_open_sockets_within_a_heartbeat(
        database_url: str) -> None:
    assert signalbox(database_url, "migrate").returncode == 0
    doomed = create_token(database_url, "doomed", "read")
    kept = create_token(database_url, "kept", "read")
    server = ServerProcess(database_url, args=["--heartbeat", "1"]).start()
    try:
        subscribers = []
        for token in (doomed, doomed, kept):
            conn = await websockets.connect(server.ws_url)
            await conn.send(json.dumps({"op": "hello", "token": token, "cursor": None}))
            assert (await next_frame(conn))["op"] == "welcome"
            subscribers.append(conn)
        frames: list[list[dict[str, Any]]] = [[], [], []]
        keepers = [asyncio.create_task(answer_pings(c, f)) for c, f in
                   zip(subscribers, frames, strict=True)]
        done = await asyncio.to_thread(signalbox, database_url, "token", "revoke", "doomed")
        assert done.returncode == 0, done.stderr
        await asyncio.wait_for(asyncio.gather(*keepers[:2]), 10)  # closed within a heartbeat
        for conn, received in zip(subscribers[:2], frames[:2], strict=True):
            assert conn.close_code == 4401, (conn.close_code, conn.close_reason)
            assert received[-1]["op"] == "error" and received[-1]["code"] == 4401, received
        # The other token's subscriber stays, and is kept alive by its pongs.
        assert not keepers[2].done() and subscribers[2].close_code is None
        assert [f["op"] for f in frames[2] if f["op"] not in ("live", "ping")] == []
        keepers[2].cancel()
        await subscribers[2].close()
    finally:
        server.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_token_that_expires_while_connected_is_closed(database_url: str) -> None:
    assert signalbox(database_url, "migrate").returncode == 0
    server = ServerProcess(database_url, args=["--heartbeat", "0.5"]).start()
    try:
        soon = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
        token = await asyncio.to_thread(create_token, database_url, "short-lived", "read",
                                        expires=soon)
        conn = await websockets.connect(server.ws_url)
        await conn.send(json.dumps({"op": "hello", "token": token, "cursor": None}))
        assert (await next_frame(conn))["op"] == "welcome"
        frames: list[dict[str, Any]] = []
        await asyncio.wait_for(answer_pings(conn, frames), 15)
        assert conn.close_code == 4401, (conn.close_code, conn.close_reason)
        assert frames[-1]["op"] == "error" and frames[-1]["code"] == 4401, frames
    finally:
        server.stop()
