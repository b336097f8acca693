"""Hostile WebSocket clients get the close codes of docs/protocol.md, and nobody else notices.

Frames that no library would send are written on a bare socket (tests/wsraw.py). While they
arrive, signals are posted steadily and a well-behaved subscriber must receive every one of
their events, in order, without a gap.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.support import ADMIN_TOKEN, INGEST_TOKEN, ServerProcess, headers, next_frame, ws_connect
from tests.test_metrics import scrape_one
from tests.wsraw import (
    BINARY,
    CONTINUATION,
    PING,
    TEXT,
    RawClient,
    encode_frame,
)

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}
HELLO = json.dumps({"op": "hello", "token": ADMIN_TOKEN, "cursor": None}).encode()
FRAME_RATE = 200
PROTOCOL_ERROR, INVALID_UTF8, TOO_BIG, POLICY = 1002, 1007, 1009, 1008

# name: (what the client sends, the close code it must get)
ABUSE: dict[str, tuple[list[bytes], int]] = {
    "garbage text": ([encode_frame(TEXT, b"\x00\x01 {{{ not json")], 4400),
    "a number instead of an object": ([encode_frame(TEXT, b"12345678901234567890")], 4400),
    "deep JSON": ([encode_frame(TEXT, b"[" * 50_000)], 4400),
    "binary frame": ([encode_frame(BINARY, b"\x00\x01\x02")], 4400),
    "fragmented binary": ([encode_frame(BINARY, b"\x00", fin=False),
                           encode_frame(CONTINUATION, b"\x01")], 4400),
    "fragmented garbage": ([encode_frame(TEXT, b"{\"op\"", fin=False),
                            encode_frame(CONTINUATION, b": 42}")], 4400),
    "over the protocol's message limit": ([encode_frame(TEXT, b" " * 70_000)], 4400),
    "over 1 MiB in fragments": ([encode_frame(TEXT, b"x" * 600_000, fin=False),
                                 encode_frame(CONTINUATION, b"x" * 600_000)], TOO_BIG),
    "a length of a terabyte": ([encode_frame(TEXT, b"x", declared=1 << 40)], TOO_BIG),
    "invalid UTF-8 text": ([encode_frame(TEXT, b"{\"op\": \"\xff\xfe\"}")], INVALID_UTF8),
    "continuation without a start": ([encode_frame(CONTINUATION, b"abc")], PROTOCOL_ERROR),
    "a new message inside fragments": ([encode_frame(TEXT, b"{", fin=False),
                                        encode_frame(TEXT, b"}")], PROTOCOL_ERROR),
    "unmasked frame": ([encode_frame(TEXT, HELLO, masked=False)], PROTOCOL_ERROR),
    "oversized ping": ([encode_frame(PING, b"p" * 200)], PROTOCOL_ERROR),
    "reserved opcode": ([encode_frame(0x3, b"?")], PROTOCOL_ERROR),
    "a thousand hellos": ([encode_frame(TEXT, HELLO)] * 1000, 4400),
    "a flood of protocol pings": ([encode_frame(TEXT, HELLO)]
                                  + [encode_frame(TEXT, b'{"op": "ping"}')] * 2000, POLICY),
}


async def post_until(stop: asyncio.Event, base_url: str) -> int:
    """Post signals one after another until told to stop; the last position appended."""
    last = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        while not stop.is_set() or last == 0:
            response = await client.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
            assert response.status_code == 202, response.text
            last = response.json()["position"]
    return last


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_abusive_clients_are_closed_and_a_subscriber_misses_nothing(
        database_url: str) -> None:
    server = ServerProcess(database_url, env={"SIGNALBOX_HELLO_TIMEOUT": "2"},
                           args=["--ws-frame-rate", str(FRAME_RATE)]).start()
    try:
        bystander = await ws_connect(server, cursor=None)
        welcome = await next_frame(bystander)
        assert (await next_frame(bystander))["op"] == "live"
        stop = asyncio.Event()
        poster = asyncio.create_task(post_until(stop, server.base_url))

        observed: dict[str, int | None] = {}
        for name, (frames, _) in ABUSE.items():
            abuser = await RawClient.connect(server.port)
            abuser.send(*frames)
            received = await abuser.until_close()
            observed[name] = received.close_code
            if received.close_code is not None and received.close_code >= 4000:
                error = json.loads(received.texts[-1])  # the error frame comes first
                assert error["op"] == "error" and error["code"] == received.close_code, name
                assert error["message"], name
        assert observed == {name: code for name, (_, code) in ABUSE.items()}

        # WebSocket-level pings are answered by the protocol layer and count for nothing.
        pinger = await RawClient.connect(server.port)
        pinger.send(*[encode_frame(PING, b"p")] * 5000, encode_frame(TEXT, HELLO))
        assert json.loads(await pinger.text())["op"] == "welcome"
        pinger.abort()

        # Many connections that never say hello: each closed after the hello timeout.
        silent = [await RawClient.connect(server.port) for _ in range(100)]
        closed = await asyncio.gather(*(client.until_close() for client in silent))
        assert [c.close_code for c in closed] == [4408] * 100

        stop.set()
        last = await poster
        positions: list[int] = []
        while not positions or positions[-1] < last:
            frame = await next_frame(bystander, 15)
            if frame["op"] == "event":
                positions.append(frame["position"])
        assert positions == list(range(welcome["head"] + 1, last + 1))
        await bystander.close()

        assert scrape_one(server, "signalbox_websocket_closes_total", code="4408") == 100
        assert scrape_one(server, "signalbox_websocket_closes_total", code="1008") == 1
        assert scrape_one(server, "signalbox_websocket_closes_total", code="4400") == sum(
            code == 4400 for _, code in ABUSE.values())
    finally:
        server.stop()
