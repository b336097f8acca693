"""Leases: a write fenced by a lease commits only while the lease is held; one refused leaves
the rest of its group commit alone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from pipeline.log import EventLog, NewEvent, Transaction
from pipeline.processing.lease import Lease, LeaseLost
from tests.support import take_over


async def test_writes_fenced_by_a_lease_commit_while_it_is_held_and_alone_are_refused_after(
        event_log: EventLog) -> None:
    lease = Lease(event_log, "job", ttl=60)

    def fenced(name: str) -> Callable[[Transaction], Any]:
        async def unit(tx: Transaction) -> None:
            tx.append(NewEvent("job", name, {}))
        return unit

    assert await lease.acquire()
    await lease.transact(fenced("held"))
    await take_over(event_log, "job", "ahead", 60)
    # In one group commit: the refused unit writes nothing, the other unit commits.
    answers = await asyncio.gather(lease.transact(fenced("refused")),
                                   event_log.append([NewEvent("other", "other", {})]),
                                   return_exceptions=True)
    assert isinstance(answers[0], LeaseLost) and not isinstance(answers[1], BaseException)
    await take_over(event_log, "job", lease.holder, -1)  # ours, but lapsed
    with pytest.raises(LeaseLost):
        await lease.transact(fenced("lapsed"))
    # Taken again and written in one group commit: the write sees the lease as taken.
    taken, _ = await asyncio.gather(lease.acquire(), lease.transact(fenced("retaken")))
    assert taken
    assert [e.type for e in await event_log.read(0)] == ["held", "other", "retaken"]
