"""Leases: one holder at a time for a job that N instances could each run.

A lease is a row with a holder and an expiry, taken or renewed inside a group commit: the
commit locks the log head first, so two instances can never both see it free. The expiry
stored is ``ttl`` after the commit began, hence at least ``ttl`` after the call was made: a
holder counts its lease from a moment noted before calling, and stops the job before that can
lapse unless a later call has been confirmed (see ``HandlerRunner._hold`` in
:mod:`pipeline.processing.runner`). The instances' clocks must agree to well within the
margin it keeps.

That margin decides when the job stops; it is not what keeps the job's writes apart. A holder
writes through :meth:`Lease.transact`, which checks the row in the same group commit, under
the same lock as any taking of the lease: a write that comes late (sent before the holder was
cut off, or made by a holder that did not notice in time) is refused once another instance
holds the lease or it has lapsed, whatever the clocks say.
"""

from __future__ import annotations

from datetime import timedelta
from enum import Enum
from typing import TypeVar

from sqlalchemy import bindparam, select

from pipeline.log import EventLog, Transaction, format_time
from pipeline.log.model import new_id
from pipeline.log.schema import leases
from pipeline.log.store import Hints, Unit

T = TypeVar("T")

_TAKE = leases.insert()
_RENEW = (leases.update().where(leases.c.name == bindparam("b_name"))
          .values(holder=bindparam("holder"), expires_at=bindparam("expires_at")))
_DROP = leases.delete().where(leases.c.name == bindparam("b_name"),
                              leases.c.holder == bindparam("b_holder"))


class LeaseLost(Exception):
    """A write fenced by a lease was refused, having written nothing: the lease was
    another's, or had lapsed, when the write was to commit."""


class _Refused(Enum):
    REFUSED = "refused"


class Lease:
    def __init__(self, event_log: EventLog, name: str, *, ttl: float = 10.0) -> None:
        self.log = event_log
        self.name = name
        self.ttl = ttl
        self.holder = new_id()
        self._key = f"lease:{name}"  # of the row as this group commit has it, in tx.local

    async def acquire(self) -> bool:
        """Take or renew the lease; False while another live holder has it. Once True, the
        lease is ours until at least ``ttl`` after this call was made."""

        async def unit(tx: Transaction) -> bool:
            row = await self._row(tx)
            if row is not None and row[0] != self.holder and row[1] >= format_time(tx.now):
                return False
            until = format_time(tx.now + timedelta(seconds=self.ttl))
            if row is None:
                tx.stage(_TAKE, {"name": self.name, "holder": self.holder,
                                 "expires_at": until})
            else:
                tx.stage(_RENEW, {"b_name": self.name, "holder": self.holder,
                                  "expires_at": until})
            tx.local[self._key] = (self.holder, until)
            return True

        return await self.log.transact(unit)

    async def release(self) -> None:
        async def unit(tx: Transaction) -> None:
            row = await self._row(tx)
            if row is not None and row[0] == self.holder:
                tx.stage(_DROP, {"b_name": self.name, "b_holder": self.holder})
                tx.local[self._key] = None

        await self.log.transact(unit)

    async def transact(self, unit: Unit[T], hints: Hints | None = None) -> T:
        """Run ``unit`` in a group commit as the lease's holder: as
        :meth:`EventLog.transact`, but if the lease is not ours at the commit's time
        (``tx.now``), ``unit`` does not run and :class:`LeaseLost` is raised. The check is
        one read of the lease's row per group commit, made before ``unit`` stages anything,
        so a refused unit leaves the other units of its batch alone."""

        async def fenced(tx: Transaction) -> T | _Refused:
            if not await self.holds(tx):
                return _Refused.REFUSED
            return await unit(tx)

        result = await self.log.transact(fenced, hints)
        if isinstance(result, _Refused):
            raise LeaseLost(f"the lease {self.name!r} is held by another instance or has "
                            "lapsed: nothing was written")
        return result

    async def holds(self, tx: Transaction) -> bool:
        """Whether the lease is ours at ``tx.now``, as of ``tx`` (taken or renewed by an
        earlier unit of the same group commit counts)."""
        row = await self._row(tx)
        return row is not None and row[0] == self.holder and row[1] >= format_time(tx.now)

    async def _row(self, tx: Transaction) -> tuple[str, str] | None:
        """The lease's holder and expiry in this group commit: read from the database once,
        then as its units staged them (staged writes are not visible to reads)."""
        if self._key not in tx.local:
            row = await tx.fetch_one(select(leases.c.holder, leases.c.expires_at)
                                     .where(leases.c.name == self.name))
            tx.local[self._key] = None if row is None else (row["holder"], row["expires_at"])
        found: tuple[str, str] | None = tx.local[self._key]
        return found
