"""A disconnect storm: 500 subscribers dropping and coming back at random for a minute while
300 signals a second arrive. Every subscriber ends holding exactly its share of the log (no
gap, no repeat).

The subscribers drop their connection abruptly (no close handshake), at a random moment
between 0.5 and 6 s after each connect, and resume from the last position they saw. Most of
them follow one ticker's ``signal.accepted`` events, which is the resume path with a filter
(the cursor moves over events that did not match); a few follow everything. Spreading the
tickers keeps what this 2-core machine must deliver (the test's own clients included) within
what it can: 500 subscribers of everything would be 300,000 events a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from typing import Any

import httpx
import pytest
import websockets

from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    FastClient,
    ServerProcess,
    read_all_events,
)

SUBSCRIBERS = 500
EVERYTHING = 5  # of them follow the whole log
RATE = 300  # signals a second
SECONDS = 60
TICKERS = [f"T{i:02d}" for i in range(50)]


class StormSubscriber:
    def __init__(self, index: int, url: str) -> None:
        self.url = url
        self.filter: dict[str, list[str]] = {} if index < EVERYTHING else {
            "types": ["signal.accepted"], "tickers": [TICKERS[index % len(TICKERS)]]}
        self.positions: list[int] = []
        self.cursor = 0
        self.connections = 0
        self.storming = True
        self.error: str | None = None

    def matches(self, event: dict[str, Any]) -> bool:
        if not self.filter:
            return True
        return (event["type"] == "signal.accepted"
                and event["meta"].get("ticker") in self.filter["tickers"])

    async def run(self) -> None:
        while True:
            # Dropped by the server side (overload, restart): resume all the same.
            with contextlib.suppress(OSError, websockets.ConnectionClosed, TimeoutError):
                await self._connection()
            await asyncio.sleep(random.uniform(0, 0.2))

    async def _connection(self) -> None:
        async with websockets.connect(self.url, max_size=None, open_timeout=30) as ws:
            self.connections += 1
            await ws.send(json.dumps({"op": "hello", "token": ADMIN_TOKEN,
                                      "cursor": self.cursor, "filter": self.filter}))
            loop = asyncio.get_running_loop()
            drop_at = loop.time() + random.uniform(0.5, 6.0)
            while True:
                wait = drop_at - loop.time() if self.storming else 60.0
                try:
                    # Not wait_for: on 3.11 it can swallow the cancellation that ends the
                    # storm, and the subscriber would go on listening for ever.
                    async with asyncio.timeout(max(wait, 0)):
                        message = await ws.recv()
                except TimeoutError:
                    if not self.storming:
                        continue
                    ws.transport.abort()  # a dropped link, not a goodbye
                    return
                frame = json.loads(message)
                if frame["op"] == "event":
                    if frame["position"] <= self.cursor:
                        self.error = f"position {frame['position']} after {self.cursor}"
                    self.positions.append(frame["position"])
                    self.cursor = frame["position"]
                elif frame["op"] == "live":
                    self.cursor = max(self.cursor, frame["position"])
                elif frame["op"] == "ping":
                    await ws.send('{"op":"pong"}')
                elif frame["op"] == "error":
                    self.error = f"error frame {frame}"


async def post_at_rate(client: FastClient, seconds: float, acked: list[str]) -> None:
    start = time.monotonic()
    total = int(RATE * seconds)

    async def one(i: int) -> None:
        status, body = await client.post(
            "/api/signals", {"ticker": TICKERS[i % len(TICKERS)], "action": "buy",
                             "quantity": "1"}, INGEST_TOKEN, {"Idempotency-Key": str(uuid.uuid4())})
        assert status == 202, body
        acked.append(body["signal_id"])

    tasks = []
    for i in range(total):
        delay = start + i / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)


async def storm(server: ServerProcess, subscribers: list[StormSubscriber], seconds: float,
                acked: list[str]) -> None:
    for subscriber in subscribers:
        subscriber.storming = True
    tasks = [asyncio.create_task(s.run()) for s in subscribers]
    try:
        async with FastClient(server.base_url, connections=32) as client:
            await post_at_rate(client, seconds, acked)
        for subscriber in subscribers:
            subscriber.storming = False
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            log = await read_all_events(http)
        deadline = time.monotonic() + 120
        for subscriber in subscribers:
            expected = [e["position"] for e in log if subscriber.matches(e)]
            while subscriber.positions != expected and subscriber.error is None:
                assert len(subscriber.positions) <= len(expected), "more events than the log"
                assert time.monotonic() < deadline, (
                    f"subscriber {subscriber.filter} has {len(subscriber.positions)} of "
                    f"{len(expected)} events")
                await asyncio.sleep(0.05)
            assert subscriber.error is None, subscriber.error
            assert subscriber.positions == expected
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_disconnect_storm_loses_nothing_and_repeats_nothing(database_url: str) -> None:
    server = ServerProcess(database_url).start()
    try:
        acked: list[str] = []
        subscribers = [StormSubscriber(i, server.ws_url) for i in range(SUBSCRIBERS)]
        await storm(server, subscribers, SECONDS, acked)
        assert len(acked) == RATE * SECONDS
        reconnects = sum(s.connections for s in subscribers)
        assert reconnects > SUBSCRIBERS * SECONDS / 6  # a storm: one per 3.25 s each on average
    finally:
        server.stop()
