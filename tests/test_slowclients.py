"""Slow and oversized requests over raw sockets: a client that sends its headers too slowly,
or too many of them, or a body too slowly, is cut off while others are served."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.support import INGEST_TOKEN, ServerProcess

# The `server` fixture's flags: strict limits, so that slow clients are cut off quickly.
STRICT = pytest.mark.server_args("--header-timeout", "1", "--header-limit", "4096",
                                 "--header-count", "30", "--body-timeout", "1")

pytestmark = [pytest.mark.parametrize("database_url", ["sqlite"], indirect=True), STRICT]


async def open_raw(server: ServerProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def closed_by_server(reader: asyncio.StreamReader, wait: float = 10) -> bytes:
    """Everything the server sent until it closed the connection."""
    return await asyncio.wait_for(reader.read(), wait)


async def test_headers_sent_byte_by_byte_too_slowly_are_cut_off(
        server: ServerProcess, client: httpx.AsyncClient) -> None:
    reader, writer = await open_raw(server)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Drip: " + b"a" * 200 + b"\r\n\r\n"
    started = time.monotonic()
    sent = 0
    try:
        for byte in request:  # a byte every 50 ms: the whole request would take 12 s
            writer.write(bytes([byte]))
            await writer.drain()
            sent += 1
            # Meanwhile other clients are served.
            if sent % 10 == 0:
                assert (await client.get("/healthz")).status_code == 200
            if reader.at_eof():
                break
            try:
                data = await asyncio.wait_for(reader.read(1024), 0.05)
            except TimeoutError:
                continue
            assert data == b"", data  # closed, never answered
            break
    except ConnectionError:
        pass  # the server closed the connection while we wrote
    finally:
        writer.close()
    assert sent < len(request), "the slow client was allowed to finish its request"
    assert time.monotonic() - started < 10


async def test_a_connection_that_sends_nothing_is_closed(server: ServerProcess) -> None:
    reader, writer = await open_raw(server)
    try:
        assert await closed_by_server(reader) == b""
    finally:
        writer.close()


async def test_an_oversized_header_block_gets_431(server: ServerProcess,
                                                  client: httpx.AsyncClient) -> None:
    for extra in (b"X-Big: " + b"a" * 8000 + b"\r\n",
                  b"".join(b"X-H%d: v\r\n" % n for n in range(40))):
        reader, writer = await open_raw(server)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
            await writer.drain()
            answer = await closed_by_server(reader)
        except ConnectionError:
            answer = b""  # closed before it read all we sent: also a refusal
        finally:
            writer.close()
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        if answer:
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "headers_too_large"
    # Headers within the limits are served.
    response = await client.get("/healthz", headers={f"X-H{n}": "v" * 50 for n in range(20)})
    assert response.status_code == 200


async def test_a_header_without_end_is_refused_before_it_is_complete(
        server: ServerProcess) -> None:
    reader, writer = await open_raw(server)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        for _ in range(100):  # 100 KiB of one header value, never finished
            writer.write(b"a" * 1024)
            await writer.drain()
    except ConnectionError:
        pass  # refused while we wrote
    try:
        answer = await closed_by_server(reader)
    except ConnectionError:
        answer = b""
    finally:
        writer.close()
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:100]


async def test_a_body_sent_too_slowly_gets_408_and_nothing_is_recorded(
        server: ServerProcess, client: httpx.AsyncClient) -> None:
    reader, writer = await open_raw(server)
    body = json.dumps({"ticker": "BTCUSDT", "action": "buy", "quantity": "1"}).encode()
    try:
        writer.write(b"POST /api/signals HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + INGEST_TOKEN.encode() + b"\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        assert status_line.startswith(b"HTTP/1.1 408 "), status_line
    finally:
        writer.close()
    assert (await client.get("/readyz")).json()["head"] == 0


async def test_limit_concurrency_serves_that_many_connections_at_once(database_url: str) -> None:
    """--limit-concurrency 1 serves one client, and refuses a second while the first is open."""
    server = ServerProcess(database_url, args=["--limit-concurrency", "1"]).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            assert (await http.get("/healthz")).status_code == 200  # kept open (keep-alive)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as second:
                answer = await second.get("/healthz")
                assert answer.status_code == 503, answer.text
                assert answer.json()["error"] == "server_busy"
    finally:
        server.stop()


async def test_limit_concurrency_answers_503_beyond_it(database_url: str) -> None:
    server = ServerProcess(database_url, args=["--limit-concurrency", "3"]).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            assert (await http.get("/healthz")).status_code == 200
            held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
            try:
                async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as fresh:
                    assert (await fresh.get("/healthz")).status_code == 503
            finally:
                for _, writer in held:
                    writer.close()
            deadline = time.monotonic() + 10
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as fresh:
                while (await fresh.get("/healthz")).status_code != 200:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
    finally:
        server.stop()
