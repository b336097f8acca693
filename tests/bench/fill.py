"""A log of N events for the catch-up figures, written through the log's own writer.

The events have the shape and size of real ingestion (a ``signal.received`` with the raw body,
then its ``signal.accepted``), in group commits of 2,000 events, hash chain and all.
"""

from __future__ import annotations

import asyncio
import uuid

from pipeline.log import EventLog, NewEvent
from pipeline.migrate import upgrade
from tests.bench.loadgen import signal_body

PER_COMMIT = 2000


def signal_pair(n: int) -> list[NewEvent]:
    signal_id = str(uuid.UUID(int=n))
    stream = f"signal-{signal_id}"
    meta = {"signal_id": signal_id, "ticker": "BTCUSDT", "strategy": "bench-trend"}
    received = {"signal_id": signal_id, "body": signal_body(n).decode(), "format": "json",
                "idempotency_key": None, "source": "api", "token": "admin",
                "remote_addr": "127.0.0.1", "content_type": "application/json"}
    accepted = {"signal_id": signal_id, "signal": {
        "ticker": "BTCUSDT", "exchange": "BINANCE", "action": "buy" if n % 2 else "sell",
        "quantity": "0.015", "price": "67432.5", "order_type": "market",
        "strategy": "bench-trend", "interval": "5", "order_id": f"b-{n}"}}
    return [NewEvent(stream, "signal.received", received, meta),
            NewEvent(stream, "signal.accepted", accepted, meta)]


async def _fill(url: str, count: int) -> None:
    log = await EventLog.open(url, max_batch=1)
    try:
        written = 0
        while written < count:
            size = min(PER_COMMIT, count - written)
            batch = [e for n in range(written // 2, (written + size + 1) // 2)
                     for e in signal_pair(n)][:size]
            await log.append(batch)
            written += size
    finally:
        await log.close()


def sqlite_log(url: str, count: int) -> None:
    """Create the schema at ``url`` and append ``count`` events."""
    upgrade(url)
    asyncio.run(_fill(url, count))
