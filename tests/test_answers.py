"""Answers the HTTP layer writes by itself, read off raw sockets: a request the parser refuses,
headers over the limits, a server at its connection limit, refused WebSocket upgrades. Each
must look like the application's own: JSON with a stable code and a message, the security
headers, a request id, no Server banner, and Retry-After on a 503."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.support import ServerProcess
from tests.test_security import SECURITY

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

HSTS = "max-age=31536000"
ORIGINS = "https://good.example"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse(data: bytes) -> Answer:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in lines:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), found, body)


async def exchange(port: int, request: bytes, wait: float = 10) -> Answer:
    """Send ``request`` on a new connection; the answer, read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()
    assert data, "the connection was closed without an answer"
    return parse(data)


def assert_like_the_app(answer: Answer, status: int, code: str, *, behind_tls: bool) -> None:
    assert answer.status == status, answer
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert set(body) == {"error", "message"} and body["error"] == code, body
    assert len(body["message"]) > 20, body
    assert int(answer.headers["content-length"]) == len(answer.body)
    for name, value in SECURITY.items():
        assert answer.headers.get(name) == value, (name, answer)
    assert (answer.headers.get("strict-transport-security") == HSTS) is behind_tls
    assert len(answer.headers.get("x-request-id", "")) == 24
    assert "server" not in answer.headers
    assert answer.headers["connection"].lower() == "close"


def upgrade(port: int, *, path: str = "/ws", method: str = "GET", version: str = "13",
            key: bool = True, extra: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Version: {version}"]
    if key:
        lines.append(f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


@pytest.fixture
def behind_tls(database_url: str) -> Iterator[ServerProcess]:
    server = ServerProcess(database_url, args=[
        "--behind-tls", "--header-count", "30", "--ws-origins", ORIGINS]).start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_request_the_parser_refuses_gets_a_json_400(
        behind_tls: ServerProcess) -> None:
    port = behind_tls.port
    for request in (
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
        b"POST /api/signals HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ):
        answer = await exchange(port, request)
        assert_like_the_app(answer, 400, "malformed_request", behind_tls=True)
    async with httpx.AsyncClient(base_url=behind_tls.base_url) as http:
        assert (await http.get("/healthz")).status_code == 200


async def test_headers_over_the_limits_get_a_json_431(behind_tls: ServerProcess) -> None:
    port = behind_tls.port
    for extra in (b"X-Big: " + b"a" * 17_000 + b"\r\n",  # over 16 KiB
                  b"".join(b"X-H%d: v\r\n" % n for n in range(40))):  # over 30 lines
        answer = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
        assert_like_the_app(answer, 431, "headers_too_large", behind_tls=True)
        assert "16384 bytes or 30 lines" in answer.json()["message"]


async def test_refused_websocket_upgrades_are_answered_like_the_app(
        behind_tls: ServerProcess) -> None:
    port = behind_tls.port
    cases = [
        (upgrade(port, version="8"), 400, "bad_websocket_upgrade"),
        (upgrade(port, key=False), 400, "bad_websocket_upgrade"),
        (upgrade(port, method="POST"), 405, "method_not_allowed"),
        (upgrade(port, path="/elsewhere"), 403, "forbidden"),
        (upgrade(port, extra="Origin: https://evil.example\r\n"), 403, "origin_not_allowed"),
        # A header line over the WebSocket layer's own limit (8 KiB), within the server's
        # (16 KiB): answered, where the connection used to be left open without an answer.
        (upgrade(port, extra="X-Long: " + "a" * 9000 + "\r\n"), 431, "headers_too_large"),
    ]
    for request, status, code in cases:
        answer = await exchange(port, request)
        assert_like_the_app(answer, status, code, behind_tls=True)
        if status == 405:
            assert answer.headers["allow"] == "GET"
    assert "Sec-WebSocket-Version" in (await exchange(port, cases[0][0])).json()["message"]


async def test_beyond_the_concurrency_limit_requests_and_upgrades_get_a_json_503(
        database_url: str) -> None:
    server = ServerProcess(database_url, args=["--limit-concurrency", "3"]).start()
    try:
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        try:
            answer = await exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert_like_the_app(answer, 503, "server_busy", behind_tls=False)
            assert answer.headers["retry-after"] == "1"
            refused = await exchange(server.port, upgrade(server.port))
            assert_like_the_app(refused, 503, "server_busy", behind_tls=False)
            assert refused.headers["retry-after"] == "1"
        finally:
            for _, writer in held:
                writer.close()
        # Once the held connections are gone, requests and upgrades are served again.
        deadline = time.monotonic() + 10
        while (await exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                              b"Connection: close\r\n\r\n")).status != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(upgrade(server.port))
            status_line = await asyncio.wait_for(reader.readline(), 10)
            assert status_line.startswith(b"HTTP/1.1 101 "), status_line
        finally:
            writer.close()
    finally:
        server.stop()
