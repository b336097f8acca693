"""A bot built on the client library, under a crashing server and a flaky network."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import httpx

from replay import Backoff, Event, Worker
from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    FastClient,
    ServerProcess,
    TcpProxy,
    read_all_events,
)

SIGNALS = 1000


async def test_worker_processes_everything_once_through_kills_and_cut_connections(
        database_url: str) -> None:
    server = ServerProcess(database_url).start()
    try:
        async with TcpProxy(server) as proxy:
            handled: list[tuple[str, int]] = []
            worker = Worker(proxy.base_url, ADMIN_TOKEN, consumer="bot",
                            backoff=Backoff(base=0.05, cap=1.0))

            @worker.handler
            async def handle(signal: dict[str, Any], event: Event) -> str:
                handled.append((signal["ticker"], event.position))
                return "filled"

            running = asyncio.create_task(worker.run())
            # A new consumer starts at the head: let it get there before the signals come.
            await until(lambda: worker.state.value == "live", running, lambda: worker.state)
            async with FastClient(server.base_url, connections=8) as poster:
                answers = await asyncio.gather(*(
                    poster.post("/api/signals", {"ticker": f"T{i % 10}", "action": "buy"},
                                INGEST_TOKEN) for i in range(SIGNALS)))
            accepted = {body["signal_id"] for status, body in answers if status == 202}
            assert len(accepted) == SIGNALS
            # Chaos at random points of the run: two server kills, five network cuts.
            moments = sorted(random.sample(range(50, SIGNALS - 100), 7))
            kills = set(random.sample(moments, 2))
            for moment in moments:
                await until(lambda moment=moment: len(handled) >= moment, running,
                            lambda: f"{len(handled)} handled, {worker.state}, {proxy.cuts} cuts")
                if moment in kills:
                    server.kill()
                    server.restart()
                else:
                    proxy.cut()
            await until(lambda: len(handled) >= SIGNALS, running,
                        lambda: f"{len(handled)} handled, {worker.state}", within=180)
            events = await wait_for_processed(server, SIGNALS)
            worker.stop()
            await asyncio.wait_for(running, 30)
    finally:
        server.stop()
    processed = Counter(e["data"]["signal_id"] for e in events if e["type"] == "signal.processed")
    assert set(processed) == accepted, "a signal was skipped"
    assert set(processed.values()) == {1}, "a signal was processed twice"
    claims = Counter(e["data"]["signal_id"] for e in events if e["type"] == "signal.processing")
    assert set(claims.values()) == {1}
    assert len(handled) == SIGNALS  # the handler itself ran once per signal
    for ticker in {t for t, _ in handled}:
        positions = [p for t, p in handled if t == ticker]
        assert positions == sorted(positions), f"{ticker} handled out of order"


async def until(condition: Any, running: asyncio.Task[None], describe: Any,
                within: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if running.done():
            running.result()  # the worker died: show why
            raise AssertionError("the worker stopped early")
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"the worker made no progress in time: {describe()}")
        await asyncio.sleep(0.01)


async def wait_for_processed(server: ServerProcess, count: int) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            events = await read_all_events(client)
            if sum(e["type"] == "signal.processed" for e in events) >= count:
                return events
            assert asyncio.get_running_loop().time() < deadline, "outcomes missing"
            await asyncio.sleep(0.1)
