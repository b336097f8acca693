"""The floor of ``make bench`` (``tests/bench/floor.py``) stores what it says before it
answers: were it to answer first, every ratio printed beside it would flatter it."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import httpx

from tests.bench.__main__ import limit_server


async def test_the_floor_has_committed_every_signal_it_acknowledged(tmp_path: Path) -> None:
    database = tmp_path / "floor.db"
    tickers = [f"T{n}" for n in range(40)]
    with limit_server("tests.bench.floor", "--database", str(database)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            answers = await asyncio.gather(*(
                client.post("/api/signals", json={"ticker": t, "action": "buy"})
                for t in tickers))
        assert [a.status_code for a in answers] == [202] * len(tickers)
        # Read while the server still runs: what was acknowledged is in the file already.
        with sqlite3.connect(database) as db:
            events = db.execute("SELECT position, stream, type, ticker FROM events "
                                "ORDER BY position").fetchall()
            signals = db.execute("SELECT signal_id, ticker, first_position, last_position "
                                 "FROM signals").fetchall()
            (head,) = db.execute("SELECT position FROM log_head").fetchone()
    assert [e[0] for e in events] == list(range(1, 2 * len(tickers) + 1)) and head == len(events)
    assert sorted(s[1] for s in signals) == sorted(tickers)
    by_position = {e[0]: e for e in events}
    for signal_id, ticker, first, last in signals:
        assert [by_position[p][1:] for p in (first, last)] == [
            (f"signal-{signal_id}", "signal.received", ticker),
            (f"signal-{signal_id}", "signal.accepted", ticker)]
