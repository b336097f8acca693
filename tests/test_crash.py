"""SIGKILL under load, again and again: nothing acknowledged is lost, the log stays whole, and
subscribers that lived through every crash hold the log exactly: no gap, no repeat."""

from __future__ import annotations

import asyncio
import random
import uuid

import httpx

from replay import Subscriber
from replay.audit import DatabaseSource, verify
from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    FastClient,
    ServerProcess,
    read_all_events,
    verify_chain,
)
from tests.test_client import FAST, Collector

KILLS = 20


class Acknowledged:
    """Signal ids answered 2xx, and an event set once a chosen number of them arrived."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.target = 0
        self.reached = asyncio.Event()

    def add(self, signal_id: str) -> None:
        self.ids.add(signal_id)
        if len(self.ids) >= self.target:
            self.reached.set()


async def send_until_failure(client: FastClient, acknowledged: Acknowledged) -> None:
    while True:
        try:
            status, body = await client.post(
                "/api/signals", {"ticker": "BTCUSDT", "action": "buy", "quantity": "1"},
                INGEST_TOKEN, {"Idempotency-Key": str(uuid.uuid4())})
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            return  # the server died under us: this request was never acknowledged
        if status == 202:
            acknowledged.add(body["signal_id"])


async def test_sigkill_during_load_loses_no_acknowledged_signal(database_url: str) -> None:
    server = ServerProcess(database_url).start()
    acknowledged = Acknowledged()
    subscribers = [Collector(Subscriber(server.base_url, ADMIN_TOKEN, cursor=0, backoff=FAST,
                                        batch=batch)) for batch in (True, False)]
    try:
        for _ in range(KILLS):
            # Kill at a random moment: after a random number of acknowledgements.
            acknowledged.target = len(acknowledged.ids) + random.randint(1, 300)
            acknowledged.reached.clear()
            async with FastClient(server.base_url, connections=16) as client:
                senders = [asyncio.create_task(send_until_failure(client, acknowledged))
                           for _ in range(16)]
                await asyncio.wait_for(acknowledged.reached.wait(), 60)
                server.kill()
                await asyncio.wait_for(asyncio.gather(*senders), 30)
            await asyncio.to_thread(server.restart)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            events = await read_all_events(http)
        verify_chain(events)
        recorded = {e["data"]["signal_id"] for e in events if e["type"] == "signal.accepted"}
        missing = acknowledged.ids - recorded
        assert not missing, f"{len(missing)} acknowledged signals lost"
        received = [e for e in events if e["type"] == "signal.received"]
        assert len(received) == len(recorded)  # every received signal has its verdict
        head = events[-1]["position"]
        assert [e["position"] for e in events] == list(range(1, head + 1))
        source = DatabaseSource(database_url)
        try:
            assert (await verify(source)).ok
        finally:
            await source.close()
        for subscriber in subscribers:
            await subscriber.until_position(head, within=60)
            assert subscriber.positions == list(range(1, head + 1))
            assert [e.hash for e in subscriber.events] == [e["hash"] for e in events]
    finally:
        for subscriber in subscribers:
            subscriber.task.cancel()
        server.stop()
