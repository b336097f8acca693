"""Leases: one holder at a time for a job that N instances could each run.

A lease is a row with a holder and an expiry, taken or renewed inside a group commit: the
commit locks the log head first, so two instances can never both see it free. The expiry
stored is ``ttl`` after the commit began, hence at least ``ttl`` after the call was made: a
holder counts its lease from a moment noted before calling, and stops the job before that can
lapse unless a later call has been confirmed (see ``HandlerRunner._hold`` in
:mod:`pipeline.processing.runner`). The instances' clocks must agree to well within the
margin it keeps.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import bindparam, select

from pipeline.log import EventLog, Transaction, format_time
from pipeline.log.model import new_id
from pipeline.log.schema import leases

_TAKE = leases.insert()
_RENEW = (leases.update().where(leases.c.name == bindparam("b_name"))
          .values(holder=bindparam("holder"), expires_at=bindparam("expires_at")))
_DROP = leases.delete().where(leases.c.name == bindparam("b_name"),
                              leases.c.holder == bindparam("b_holder"))


class Lease:
    def __init__(self, event_log: EventLog, name: str, *, ttl: float = 10.0) -> None:
        self.log = event_log
        self.name = name
        self.ttl = ttl
        self.holder = new_id()

    async def acquire(self) -> bool:
        """Take or renew the lease; False while another live holder has it. Once True, the
        lease is ours until at least ``ttl`` after this call was made."""

        async def unit(tx: Transaction) -> bool:
            row = await tx.fetch_one(select(leases).where(leases.c.name == self.name))
            now = format_time(tx.now)
            until = format_time(tx.now + timedelta(seconds=self.ttl))
            if row is None:
                tx.stage(_TAKE, {"name": self.name, "holder": self.holder,
                                           "expires_at": until})
                return True
            if row["holder"] != self.holder and row["expires_at"] >= now:
                return False
            tx.stage(_RENEW, {"b_name": self.name, "holder": self.holder,
                              "expires_at": until})
            return True

        return await self.log.transact(unit)

    async def release(self) -> None:
        async def unit(tx: Transaction) -> None:
            tx.stage(_DROP, {"b_name": self.name, "b_holder": self.holder})

        await self.log.transact(unit)
