"""SIGKILL under load: nothing that was acknowledged is lost, and the log stays whole."""

from __future__ import annotations

import asyncio
import random
import uuid

import httpx

from tests.support import (
    INGEST_TOKEN,
    FastClient,
    ServerProcess,
    read_all_events,
    verify_chain,
)


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
    try:
        for _ in range(3):
            # Kill at a random moment: after a random number of acknowledgements.
            acknowledged.target = len(acknowledged.ids) + random.randint(50, 400)
            acknowledged.reached.clear()
            async with FastClient(server.base_url, connections=16) as client:
                senders = [asyncio.create_task(send_until_failure(client, acknowledged))
                           for _ in range(16)]
                await asyncio.wait_for(acknowledged.reached.wait(), 60)
                server.kill()
                await asyncio.wait_for(asyncio.gather(*senders), 30)
            server.restart()
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            events = await read_all_events(http)
        verify_chain(events)
        recorded = {e["data"]["signal_id"] for e in events if e["type"] == "signal.accepted"}
        missing = acknowledged.ids - recorded
        assert not missing, f"{len(missing)} acknowledged signals lost"
        received = [e for e in events if e["type"] == "signal.received"]
        assert len(received) == len(recorded)  # every received signal has its verdict
    finally:
        server.stop()
