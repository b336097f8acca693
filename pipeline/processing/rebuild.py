"""``signalbox rebuild``: the signals projection made again from the log, compared, swapped.

The projection is, by definition, the fold of the log: ``projection.fold``.
A rebuild folds every event up to the log's head as it was when the rebuild began, oldest
first and a page at a time, into a fresh table (``signals_rebuild``), then compares it with the
live ``signals`` table row by row, in ``signal_id`` order, a page of each at a time: memory does
not grow with the log, and a busy log does not keep the fold chasing its head. Live rows that
moved past that head while the rebuild ran are counted (``moved_on``), not compared.

The live table is only touched when asked (``--swap``). The swap first folds, without a lock,
what was appended during the fold and the comparison; then, in one transaction that takes the
log's write lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: the ``log_head`` row, which every
append locks first), it folds the little appended since and replaces the live rows with the
rebuilt ones. No append can fall between the last event folded and the swap, and a running
server goes on without a restart: its appends wait only for the swap's short transaction.

One rebuild at a time: a rebuild holds a lock for as long as it runs (PostgreSQL: an advisory
lock; SQLite: an exclusive ``flock`` of a file beside the database), and one started meanwhile
(on another host, by a timer) is refused, since it would drop the scratch table of the first or
fold into it, and the first's swap would then put in place a projection missing signals. Both
locks go when the process holding them ends, however it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Column, MetaData, Table, bindparam, delete, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from pipeline.errors import Conflict
from pipeline.log import Event
from pipeline.log.backends import lock_timed_out, migration_engine, sqlite_path
from pipeline.log.schema import events, log_head, signals
from pipeline.log.store import EVENT_COLUMNS
from pipeline.processing.projection import Row, fold

PAGE = 2000
REBUILD_LOCK = 0x5267_6E61_6C62_6F78  # the advisory lock key (migrations use another)
ANOTHER_REBUILD = ("another rebuild is running on this database: run this one again once it "
                   "has ended")
SHOWN = 100  # differences and problems kept in the report (all are counted)
COLUMNS = [c.name for c in signals.columns]

scratch = Table("signals_rebuild", MetaData(),
                *(Column(c.name, c.type, primary_key=c.primary_key) for c in signals.columns))
_UPDATE_SCRATCH = (update(scratch).where(scratch.c.signal_id == bindparam("b_signal_id"))
                   .values({name: bindparam(name) for name in COLUMNS if name != "signal_id"}))


@dataclass
class Difference:
    kind: str  # missing (in the log, not live), extra (live, not in the log), differs
    signal_id: str
    columns: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {live, rebuilt}

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "signal_id": self.signal_id, "columns": self.columns}


@dataclass
class RebuildReport:
    events: int = 0  # events folded
    head: int = 0  # the last position folded
    signals: int = 0  # rows rebuilt
    problems: list[dict[str, Any]] = field(default_factory=list)  # events fold refused
    problem_count: int = 0
    differences: list[Difference] = field(default_factory=list)
    difference_count: int = 0
    moved_on: int = 0  # live rows that advanced past the folded head while comparing
    swapped: bool = False

    def note_problem(self, event: Event, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < SHOWN:
            self.problems.append({"position": event.position, "type": event.type,
                                  "message": message})

    def note_difference(self, difference: Difference) -> None:
        self.difference_count += 1
        if len(self.differences) < SHOWN:
            self.differences.append(difference)

    def to_json(self) -> dict[str, Any]:
        return {"events": self.events, "head": self.head, "signals": self.signals,
                "problem_count": self.problem_count, "problems": self.problems,
                "difference_count": self.difference_count,
                "differences": [d.to_json() for d in self.differences],
                "moved_on": self.moved_on, "swapped": self.swapped}


Progress = Callable[[RebuildReport], None]


async def rebuild(url: str, *, swap: bool = False, progress: Progress | None = None,
                  wait: float = 5.0) -> RebuildReport:
    """Fold the log into ``signals_rebuild``, compare with ``signals``; swap when asked.

    ``wait``: how long the swap may wait for the log's lock, held by appends (the commit
    timeout, after which appends give up anyway: see ``migration_engine``); past it, it
    raises :class:`Conflict`, having changed nothing."""
    report = RebuildReport()
    engine = migration_engine(url, wait=wait)
    try:
        async with _alone(engine):
            await fold_and_compare(engine, report, progress)
            if swap:
                try:
                    await swap_in(engine, report)
                except DBAPIError as exc:
                    if not lock_timed_out(exc):
                        raise
                    raise Conflict(
                        f"the swap waited {wait:g} s (SIGNALBOX_COMMIT_TIMEOUT) for the log's "
                        "lock, held by another session, and left the live projection as it "
                        "was: run it again"
                    ) from exc
            else:
                async with engine.begin() as conn:
                    await conn.run_sync(scratch.drop)
    finally:
        await engine.dispose()
    return report


@contextlib.asynccontextmanager
async def _alone(engine: AsyncEngine) -> AsyncIterator[None]:
    """Hold the rebuild's lock until the rebuild ends; raise :class:`Conflict` at once when
    another rebuild holds it."""
    if engine.dialect.name == "postgresql":
        async with _advisory_lock(engine):
            yield
    else:
        with _lock_file(sqlite_path(engine.url)):
            yield


@contextlib.asynccontextmanager
async def _advisory_lock(engine: AsyncEngine) -> AsyncIterator[None]:
    """PostgreSQL: the advisory lock, on a connection of its own (the server lets go of it
    when the connection ends, also when the process dies)."""
    async with engine.connect() as conn:
        held = (await conn.execute(text("SELECT pg_try_advisory_lock(:key)"),
                                   {"key": REBUILD_LOCK})).scalar_one()
        await conn.commit()  # the lock is the session's: no transaction needs to stay open
        if not held:
            raise Conflict(ANOTHER_REBUILD)
        yield  # the connection closes as the block ends, and the lock goes with it


@contextlib.contextmanager
def _lock_file(database: Path | None) -> Iterator[None]:
    """SQLite: an exclusive ``flock`` of ``<database>-rebuild.lock``, made beside it when
    missing and left there (removing it would let a rebuild lock a file another has just
    opened anew). The system lets go of it when the file is closed, also when the process
    dies. A database in memory is the process's own: nothing to lock."""
    if database is None:
        yield
        return
    with database.with_name(database.name + "-rebuild.lock").open("ab") as file:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(ANOTHER_REBUILD) from None
        yield


async def fold_and_compare(engine: AsyncEngine, report: RebuildReport,
                           progress: Progress | None = None) -> None:
    """The log folded into a fresh ``signals_rebuild`` (no lock held), then compared with
    the live table into ``report``."""
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: scratch.drop(sync, checkfirst=True))
        await conn.run_sync(scratch.create)
        until = await _head(conn)
    while await _fold_page(engine, report, until):
        if progress is not None:
            progress(report)
    await _compare(engine, report)


async def _head(conn: AsyncConnection) -> int:
    """The log's head: every event up to it is committed."""
    return int((await conn.execute(select(log_head.c.position))).scalar_one())


async def _fold_page(engine: AsyncEngine, report: RebuildReport, until: int) -> bool:
    async with engine.begin() as conn:
        return await _fold_page_in(conn, report, until)


async def _fold_page_in(conn: AsyncConnection, report: RebuildReport,
                        until: int | None = None) -> bool:
    """Fold the next page of events (up to position ``until``, when given) into the scratch
    table; False when there is none."""
    query = select(*EVENT_COLUMNS).where(events.c.position > report.head)
    if until is not None:
        query = query.where(events.c.position <= until)
    rows = (await conn.execute(query.order_by(events.c.position).limit(PAGE))).all()
    if not rows:
        return False
    page = [Event(*row) for row in rows]
    ids = {e.stream.removeprefix("signal-") for e in page if e.stream.startswith("signal-")}
    known: dict[str, Row] = {}
    for chunk in _chunks(sorted(ids), 500):
        found = await conn.execute(select(scratch).where(scratch.c.signal_id.in_(chunk)))
        known.update((r.signal_id, dict(r._mapping)) for r in found)
    existing = set(known)
    for event in page:
        report.events += 1
        report.head = event.position
        if not event.stream.startswith("signal-"):
            continue
        signal_id = event.stream.removeprefix("signal-")
        try:
            known[signal_id] = fold(known.get(signal_id), event)
        except (ValueError, KeyError, TypeError) as exc:
            report.note_problem(event, str(exc))
    new = [row for sid, row in known.items() if sid not in existing]
    changed = [{"b_signal_id": sid, **{k: v for k, v in row.items() if k != "signal_id"}}
               for sid, row in known.items() if sid in existing]
    if new:
        await conn.execute(insert(scratch), new)
        report.signals += len(new)
    if changed:
        await conn.execute(_UPDATE_SCRATCH, changed)
    return True


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


async def _compare(engine: AsyncEngine, report: RebuildReport) -> None:
    """Merge the two tables in signal_id order, a page of each at a time."""
    async with engine.connect() as conn:
        lives, rebuilts = _rows(conn, signals), _rows(conn, scratch)
        live, rebuilt = await anext(lives, None), await anext(rebuilts, None)
        while live is not None or rebuilt is not None:
            if live is None or (rebuilt is not None
                                and rebuilt["signal_id"] < live["signal_id"]):
                assert rebuilt is not None
                report.note_difference(Difference("missing", rebuilt["signal_id"]))
                rebuilt = await anext(rebuilts, None)
            elif rebuilt is None or live["signal_id"] < rebuilt["signal_id"]:
                if live["first_position"] > report.head:
                    report.moved_on += 1  # received after the fold's last page
                else:
                    report.note_difference(Difference("extra", live["signal_id"]))
                live = await anext(lives, None)
            else:
                _compare_rows(live, rebuilt, report)
                live, rebuilt = await anext(lives, None), await anext(rebuilts, None)


async def _rows(conn: AsyncConnection, table: Table) -> AsyncIterator[Row]:
    """Every row of ``table`` in signal_id order, read a page at a time."""
    after = ""
    while True:
        found = (await conn.execute(select(table).where(table.c.signal_id > after)
                                    .order_by(table.c.signal_id).limit(PAGE))).all()
        if not found:
            return
        for row in found:
            yield dict(row._mapping)
        after = found[-1].signal_id


def _compare_rows(live: Row, rebuilt: Row, report: RebuildReport) -> None:
    if live["last_position"] > report.head:
        report.moved_on += 1  # it changed after the fold's last page: not comparable
        return
    columns = {name: {"live": live[name], "rebuilt": rebuilt[name]} for name in COLUMNS
               if live[name] != rebuilt[name]}
    if columns:
        report.note_difference(Difference("differs", live["signal_id"], columns))


async def swap_in(engine: AsyncEngine, report: RebuildReport) -> None:
    """Fold what was appended since ``fold_and_compare``, then replace the live rows with
    the rebuilt ones: :func:`catch_up`, then :func:`replace_live`."""
    await catch_up(engine, report)
    await replace_live(engine, report)


async def catch_up(engine: AsyncEngine, report: RebuildReport) -> None:
    """Fold, without a lock, what was appended up to the head as it is now, so that
    :func:`replace_live` (which appends wait for) has little left to fold."""
    async with engine.connect() as conn:
        until = await _head(conn)
    while await _fold_page(engine, report, until):
        pass


async def replace_live(engine: AsyncEngine, report: RebuildReport) -> None:
    """Under the log's write lock: fold the rest of the log, then replace the live rows."""
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Appends lock this row first: none can commit until the swap has.
            await conn.execute(select(log_head.c.position).with_for_update())
        # (SQLite: the engine began with BEGIN IMMEDIATE, the database's one write lock.)
        while await _fold_page_in(conn, report):
            pass
        await conn.execute(delete(signals))
        await conn.execute(insert(signals).from_select(COLUMNS, select(
            *(scratch.c[name] for name in COLUMNS))))
        await conn.run_sync(scratch.drop)
    report.swapped = True
