"""The event log: group-committed appends, reads by cursor, the head and the epoch.

Appends go through one writer task per process. Callers queue a *unit of work*; the writer
takes every unit that is waiting, runs them one after the other inside one database
transaction, commits once, and only then answers each caller. So many concurrent requests
share one fsync, and nobody is answered before the commit that holds their events.

Inside the transaction the writer first locks the ``log_head`` row. Positions and the hash
chain continue from what that row says, so writers on other connections, processes or hosts
queue behind the lock: positions are assigned in commit order and a rollback leaves no hole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, Executable, bindparam, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from pipeline.context import CLIENT_GONE, REQUEST_ID
from pipeline.errors import LogUnavailable, SignalboxError
from pipeline.instruments import APPEND_SECONDS, BATCH_UNITS, COMMIT_SECONDS
from pipeline.log.backends import (
    DATABASE_ERRORS,
    Engines,
    create_engines,
    drop_unanswered,
    lock_timed_out,
    redacted_url,
    sqlite_path,
    unreadable,
)
from pipeline.log.model import (
    STRATEGY_LIMIT,
    TICKER_LIMIT,
    Event,
    EventFilter,
    NewEvent,
    canonical_json,
    chain_hash,
    event_frame,
    format_time,
    new_id,
    safe_text,
    utc_now,
)
from pipeline.log.schema import events, log_head
from pipeline.log.writer import (
    INSERT_EVENT,
    CommitOutcomeUnknown,
    SqlAlchemyWriter,
    SqliteWriter,
    StagedWriteFailed,
    WriterSession,
    compiled,
)

log = logging.getLogger("signalbox.log")

T = TypeVar("T")
Unit = Callable[["Transaction"], Awaitable[T]]
Hints = Mapping[str, str]  # what a unit will look up: {"signal_id": ...}, say
CommitListener = Callable[[Sequence[Event]], None]


class Transaction:
    """What a unit of work sees: the open transaction of one group commit.

    Writes are staged and flushed together at the end of the batch (``executemany``), so a
    unit that reads must not expect to see what an earlier unit of the same batch staged:
    such units keep their in-batch facts in ``local``. A unit that raises has its staged events
    and writes discarded; it must change ``local`` only after its last check.
    """

    def __init__(self, session: WriterSession, position: int, last_hash: str,
                 hints: Sequence[Hints] = ()) -> None:
        self.session = session
        self._hints = hints
        self.position = position
        self.last_hash = last_hash
        self.now: datetime = utc_now()
        self._time = format_time(self.now)
        self.local: dict[str, Any] = {}
        self.request_id: str | None = None  # of the HTTP request whose unit is running
        self._events: list[Event] = []
        self._writes: list[tuple[Executable, dict[str, Any]]] = []

    def append(self, new: NewEvent) -> Event:
        position = self.position + 1
        meta = new.meta if self.request_id is None else {**new.meta,
                                                           "request_id": self.request_id}
        data_json = canonical_json(dict(new.data))
        meta_json = canonical_json(dict(meta))
        event_id = new_id()
        digest = chain_hash(self.last_hash, position, event_id, new.stream, new.type,
                            data_json, meta_json, self._time)
        event = Event.decoded(position, event_id, new.stream, new.type, data_json, meta_json,
                              self._time, digest, new.data, meta)
        self._events.append(event)
        self.position = position
        self.last_hash = digest
        return event

    def stage(self, statement: Executable, params: dict[str, Any]) -> None:
        """Queue a write (insert/update of a projection) to run in this transaction.

        ``statement`` is a module constant whose every value is a bind parameter named in
        ``params``: it is compiled once and executed at the driver (:mod:`pipeline.log.writer`).
        """
        self._writes.append((statement, params))

    @property
    def events(self) -> Sequence[Event]:
        return self._events

    def _mark(self) -> tuple[int, int, int, str]:
        return len(self._events), len(self._writes), self.position, self.last_hash

    def _reset(self, mark: tuple[int, int, int, str]) -> None:
        n_events, n_writes, self.position, self.last_hash = mark
        del self._events[n_events:]
        del self._writes[n_writes:]

    @property
    def dialect(self) -> str:
        """The database's dialect name (``sqlite``, ``postgresql``)."""
        return self.session.dialect.name

    def batch_hints(self, name: str) -> list[str]:
        """The values named ``name`` in the hints of this batch's units, once each, in order:
        what a unit may look up for the whole batch in one query (see :meth:`EventLog.transact`)."""
        return list(dict.fromkeys(h[name] for h in self._hints if name in h))

    async def fetch_one(self, statement: Executable) -> dict[str, Any] | None:
        """The first row of a query, inside this transaction (committed data only)."""
        return await self.session.fetch_one(statement)

    async def fetch_all(self, statement: Executable) -> list[dict[str, Any]]:
        """Every row of a query, inside this transaction (committed data only)."""
        return await self.session.fetch_all(statement)

    def _grouped_writes(self) -> list[tuple[Executable, list[dict[str, Any]]]]:
        """The events, then the staged writes: each run of one statement as one batch."""
        grouped: list[tuple[Executable, list[dict[str, Any]]]] = []
        if self._events:
            grouped.append((INSERT_EVENT, [_event_row(e) for e in self._events]))
        for statement, params in self._writes:
            if grouped and grouped[-1][0] is statement:
                grouped[-1][1].append(params)
            else:
                grouped.append((statement, [params]))
        return grouped


# The columns of an Event, in the order of its fields.
EVENT_COLUMNS = (events.c.position, events.c.id, events.c.stream, events.c.type, events.c.data,
                 events.c.meta, events.c.time, events.c.hash)
_READ = (select(*EVENT_COLUMNS).where(events.c.position > bindparam("after"))
         .order_by(events.c.position).limit(bindparam("limit")))


async def _read_at_driver(conn: AsyncConnection, after: int,
                          limit: int) -> Sequence[Sequence[Any]]:
    """The common read (no filter) straight from the driver: one round trip, plain rows.
    Catch-up reads a million events this way; SQLAlchemy's result rows cost more than the
    query."""
    statement = compiled(_READ, conn.dialect)
    values = statement.values({"after": after, "limit": limit})
    driver = (await conn.get_raw_connection()).driver_connection
    if conn.dialect.name == "sqlite":
        rows: Sequence[Sequence[Any]] = await driver.execute_fetchall(  # type: ignore[union-attr]
            statement.sql, values)
    else:
        try:
            rows = await driver.fetch(statement.sql, *values)  # type: ignore[union-attr]
        except TimeoutError:
            await drop_unanswered(conn)
            raise
    return rows


def open_session(engines: Engines, commit_timeout: float = 5.0) -> WriterSession:
    if engines.writer is None:  # SQLite: the writer's own connection on its own thread
        path = sqlite_path(engines.url)
        assert path is not None
        return SqliteWriter(path)
    return SqlAlchemyWriter(engines.writer, begin_timeout=commit_timeout)


def _event_row(event: Event) -> dict[str, Any]:
    return {
        "position": event.position,
        "id": event.id,
        "stream": event.stream,
        "type": event.type,
        "data": event.data_json,
        "meta": event.meta_json,
        "time": event.time,
        "hash": event.hash,
        "ticker": safe_text(event.ticker, TICKER_LIMIT),
        "strategy": safe_text(event.strategy, STRATEGY_LIMIT),
    }


# The two endings of a 503's message (docs/protocol.md): the sender may send again as it
# likes, or only with the same key.
NOTHING_RECORDED = "nothing was recorded: retry later"
MAY_HAVE_BEEN_RECORDED = ("so it may or may not have been recorded: retry with the same "
                          "Idempotency-Key, which is answered as a repeat if it was")


class _Pending(Generic[T]):
    """A unit on its way through the group commit, and the future its caller waits on.

    ``ran``: the unit has run in the transaction now open, so its writes may be committed.
    ``dropped``: its caller was answered that nothing was recorded, so it must never run."""

    __slots__ = ("client_gone", "dropped", "future", "hints", "ran", "request_id", "unit")

    def __init__(self, unit: Unit[T], hints: Hints | None = None) -> None:
        self.unit = unit
        self.hints = hints
        self.future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        # Taken where the unit is queued: the writer task runs it in a context of its own.
        self.request_id: str | None = REQUEST_ID.get()
        self.client_gone = CLIENT_GONE.get()
        self.ran = False
        self.dropped = False

    def overdue(self, timeout: float) -> LogUnavailable:
        """The answer to a caller that waited ``timeout`` for the commit. A unit that has not
        run yet is dropped, and its caller told that nothing was recorded, unless that caller
        is an HTTP client that hung up (TradingView gives up after 3 s): it hears nothing, so
        cannot know to send again, and its unit keeps its place in line."""
        if self.ran or (self.client_gone is not None and self.client_gone()):
            return LogUnavailable(f"the log did not commit within {timeout:g} s, but the "
                                  f"commit was under way, {MAY_HAVE_BEEN_RECORDED}")
        self.dropped = True
        return LogUnavailable(
            f"the log did not commit within {timeout:g} s; {NOTHING_RECORDED}")


class EventLog:
    """The append-only log of one database. Open with :meth:`open`, then :meth:`close`."""

    def __init__(self, engines: Engines, epoch: str, *, max_batch: int = 1000,
                 commit_timeout: float = 5.0) -> None:
        self.engines = engines
        self.epoch = epoch
        self.max_batch = max_batch
        self.commit_timeout = commit_timeout
        self._queue: asyncio.Queue[_Pending[Any]] = asyncio.Queue()
        # Every unit not yet answered, with its deadline, oldest first, and the one timer that
        # fails those past it (all wait as long: the oldest's deadline is always the next).
        self._waiting: deque[tuple[float, _Pending[Any]]] = deque()
        self._deadline: asyncio.TimerHandle | None = None
        self._listeners: list[CommitListener] = []
        self._writer: asyncio.Task[None] | None = None
        self._session = open_session(engines, commit_timeout)
        self._closing = False
        self.failure: str | None = None  # why the last group commit failed; None once one works

    @classmethod
    async def open(cls, url: str, *, reader_pool: int = 5, read_timeout: float | None = None,
                   query_timeout: float = 30.0, **options: Any) -> EventLog:
        """``read_timeout``, ``query_timeout``: see
        :func:`pipeline.log.backends.create_engines`."""
        engines = create_engines(url, reader_pool=reader_pool,
                                 writer_timeout=options.get("commit_timeout", 5.0),
                                 read_timeout=read_timeout, query_timeout=query_timeout)
        try:
            async with engines.reader.connect() as conn:
                epoch = (await conn.execute(select(log_head.c.epoch))).scalar_one_or_none()
        except DATABASE_ERRORS as exc:
            await engines.dispose()
            raise LogUnavailable(
                f"cannot read the log at {redacted_url(url)}: {exc.__class__.__name__}; "
                "run `signalbox migrate` first, or check the database URL"
            ) from exc
        if epoch is None:
            await engines.dispose()
            raise LogUnavailable("the log has no head row: run `signalbox migrate`")
        log_ = cls(engines, epoch, **options)
        log_._writer = asyncio.create_task(log_._write_loop(), name="signalbox-log-writer")
        return log_

    async def close(self) -> None:
        """Stop taking appends, commit what is queued, then release the database."""
        self._closing = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._writer is not None:
            await self._queue.put(_Pending(_stop_unit))
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._session.close(), 5)
        try:
            await asyncio.wait_for(self.engines.dispose(), 5)
        except TimeoutError:
            log.warning("database connections did not close within 5 s; leaving them")

    def add_listener(self, listener: CommitListener) -> None:
        """Call ``listener(events)`` after each commit that appended events, in order."""
        self._listeners.append(listener)

    # -- writing -----------------------------------------------------------------------------

    async def transact(self, unit: Unit[T], hints: Hints | None = None) -> T:
        """Run ``unit`` in the next group commit; return its result once that has committed.

        ``hints`` name what the unit will look up (``{"signal_id": ...}``): the units of a
        batch see each other's through :meth:`Transaction.batch_hints`, so the first to need
        a row can read every row the batch needs at once instead of one round trip each.

        Raises :class:`LogUnavailable` when the commit failed or did not finish within
        ``commit_timeout`` (then nothing is acknowledged), or whatever the unit raised. A unit
        whose caller was answered so before it ran is never run (see :meth:`_Pending.overdue`).
        """
        if self._closing:
            raise LogUnavailable("the server is shutting down: retry against another instance")
        pending: _Pending[T] = _Pending(unit, hints)
        queued = time.perf_counter()
        self._queue.put_nowait(pending)
        loop = pending.future.get_loop()
        self._waiting.append((loop.time() + self.commit_timeout, pending))
        if self._deadline is None:
            self._deadline = loop.call_at(self._waiting[0][0], self._expire)
        # Cancelling the wait cancels only the answer: the writer still commits or fails the
        # unit as a whole, and skips a future that is already done. Only the expiry's answer,
        # to a caller still there, drops a unit not yet run.
        result = await pending.future
        APPEND_SECONDS.observe(time.perf_counter() - queued)
        return result

    def _expire(self) -> None:
        """Fail the units whose commit is overdue (a database locked elsewhere, say): their
        callers are answered 503 while the writer goes on trying (see
        :meth:`_Pending.overdue`). One timer for all units, rather than one each: under load
        it fires about once per ``commit_timeout``."""
        self._deadline = None
        waiting = self._waiting
        self._forget_answered()
        if not waiting:
            return
        loop = waiting[0][1].future.get_loop()
        now = loop.time()
        while waiting and waiting[0][0] <= now:
            _, pending = waiting.popleft()
            if not pending.future.done():
                pending.future.set_exception(pending.overdue(self.commit_timeout))
        if waiting:
            self._deadline = loop.call_at(waiting[0][0], self._expire)

    def _forget_answered(self) -> None:
        waiting = self._waiting
        while waiting and waiting[0][1].future.done():
            waiting.popleft()

    async def append(self, new_events: Iterable[NewEvent]) -> list[Event]:
        batch = list(new_events)

        async def unit(tx: Transaction) -> list[Event]:
            return [tx.append(e) for e in batch]

        return await self.transact(unit)

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            stop = any(p.unit is _stop_unit for p in batch)
            work = [p for p in batch if p.unit is not _stop_unit]
            if work:
                await self._commit(work)
            if stop and self._queue.empty():
                return

    async def _commit(self, batch: list[_Pending[Any]]) -> bool:
        """Run and commit ``batch``; settle every unit's future. False when no transaction
        could even begin (the database is down, say)."""
        results: list[tuple[_Pending[Any], Any, BaseException | None]] = []
        started = time.perf_counter()
        begun = committing = False
        try:
            position, digest = await self._session.begin()
            begun = True
            tx = Transaction(self._session, position, digest,
                             [p.hints for p in batch if p.hints is not None])
            for pending in batch:
                if not pending.dropped:  # checked once begun: BEGIN may have waited long
                    results.append(await _run_unit(tx, pending))
            head = (tx.position, tx.last_hash) if tx.events else None
            committing = True
            await self._session.commit(tx._grouped_writes(), head)
        except Exception as exc:  # the database is down, locked, full, or refused a value
            with contextlib.suppress(Exception):
                await self._session.abandon()
            if len(batch) > 1 and begun and not _held_up(exc) and (
                    not committing or isinstance(exc, StagedWriteFailed)):
                # Nothing was committed, and the cause may be one unit's data (a value the
                # database refuses): commit each unit on its own, so one cannot fail the rest.
                # Not after a lock's wait timed out: each would wait as long again.
                log.warning("group commit of %d units failed before its COMMIT (%r): "
                            "committing them one at a time", len(batch), exc)
                for pending in batch:
                    pending.ran = False  # nothing of theirs was committed
                await self._commit_each(batch)
                return True
            log.warning("group commit of %d units failed: %r", len(batch), exc)
            self._fail(batch, exc)
            return begun
        self.failure = None
        COMMIT_SECONDS.observe(time.perf_counter() - started)
        BATCH_UNITS.observe(len(batch))
        for pending, value, unit_error in results:
            _settle(pending, value, unit_error)
        self._forget_answered()
        if tx.events:
            for listener in self._listeners:
                listener(tx.events)
        return True

    async def _commit_each(self, batch: list[_Pending[Any]]) -> None:
        for index, pending in enumerate(batch):
            if not await self._commit([pending]):  # the database went away: no use trying on
                self._fail(batch[index + 1:], None)
                return

    def _fail(self, batch: list[_Pending[Any]], exc: BaseException | None) -> None:
        """Answer ``batch`` that nothing was recorded (``exc``: why; None: as last time), or,
        when the connection was lost during the ``COMMIT``, that it may have been."""
        if exc is not None:
            self.failure = _reason(exc)
        if isinstance(exc, CommitOutcomeUnknown):
            error = LogUnavailable(f"the connection to the database was lost during the "
                                   f"commit ({self.failure}), {MAY_HAVE_BEEN_RECORDED}")
        else:
            error = LogUnavailable(f"the log could not commit ({self.failure}); "
                                   f"{NOTHING_RECORDED}")
        for pending in batch:
            _settle(pending, None, error)
        self._forget_answered()

    # -- reading -----------------------------------------------------------------------------

    async def read(self, after: int, limit: int = 500,
                   filter: EventFilter | None = None) -> list[Event]:
        """Committed events with ``position > after``, oldest first, at most ``limit``."""
        stmt: Executable = _READ
        if filter is not None and not filter.is_empty:
            stmt = (select(*EVENT_COLUMNS).where(events.c.position > bindparam("after"),
                                                 *filter_clauses(filter))
                    .order_by(events.c.position).limit(bindparam("limit")))
        try:
            async with self.engines.reader.connect() as conn:
                if stmt is _READ:
                    rows = await _read_at_driver(conn, after, limit)
                else:
                    rows = (await conn.execute(stmt, {"after": after, "limit": limit})).all()
        except DATABASE_ERRORS as exc:
            raise LogUnavailable(unreadable(exc)) from exc
        return [Event(*row) for row in rows]

    async def read_newest(self, after: int, before: int, limit: int = 500,
                          filter: EventFilter | None = None) -> list[Event]:
        """Committed events with ``after < position < before``, newest first, at most
        ``limit``: the end of a long history without reading the rest of it."""
        clauses = [] if filter is None else filter_clauses(filter)
        stmt = (select(*EVENT_COLUMNS)
                .where(events.c.position > after, events.c.position < before, *clauses)
                .order_by(events.c.position.desc()).limit(limit))
        try:
            async with self.engines.reader.connect() as conn:
                rows = (await conn.execute(stmt)).all()
        except DATABASE_ERRORS as exc:
            raise LogUnavailable(unreadable(exc)) from exc
        return [Event(*row) for row in rows]

    async def read_frames(self, after: int, limit: int = 500) -> list[tuple[int, str]]:
        """:meth:`read` without a filter, as each event's position and WebSocket frame,
        built from its row without an ``Event``: what catch-up reads, a million at a time."""
        try:
            async with self.engines.reader.connect() as conn:
                rows = await _read_at_driver(conn, after, limit)
        except DATABASE_ERRORS as exc:
            raise LogUnavailable(unreadable(exc)) from exc
        return [(row[0], event_frame(*row)) for row in rows]

    async def check_writable(self) -> None:
        """Raise :class:`LogUnavailable` unless the log can commit.

        Free while commits succeed; after a failed one, an empty group commit is tried, so a
        database that came back is seen as such without waiting for a client's append.
        """
        if self.failure is not None:
            await self.transact(_empty_unit)

    async def head(self) -> int:
        """The position of the last committed event (0 for an empty log)."""
        try:
            async with self.engines.reader.connect() as conn:
                value = (await conn.execute(select(log_head.c.position))).scalar_one()
        except DATABASE_ERRORS as exc:
            raise LogUnavailable(unreadable(exc)) from exc
        return int(value)


async def _stop_unit(tx: Transaction) -> None:  # pragma: no cover - a marker, never run
    return None


async def _empty_unit(tx: Transaction) -> None:
    return None


def _cause(exc: BaseException) -> BaseException:
    if isinstance(exc, StagedWriteFailed | CommitOutcomeUnknown) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def _held_up(exc: BaseException) -> bool:
    """Whether a commit failed for having waited a commit timeout for a lock (PostgreSQL's
    ``lock_timeout``, see :func:`pipeline.log.backends.create_engines`)."""
    return lock_timed_out(_cause(exc))


def _reason(exc: BaseException) -> str:
    """Why a commit failed, in words fit for a client: SQLite says it plainly ("database is
    locked", "database or disk is full"); other drivers' messages may quote SQL, so only the
    kind of error is given."""
    exc = _cause(exc)
    if lock_timed_out(exc):
        return "it waited SIGNALBOX_COMMIT_TIMEOUT for a lock held by another session"
    if isinstance(exc, sqlite3.Error) and exc.args:
        return str(exc.args[0])[:200]
    return exc.__class__.__name__


async def _run_unit(tx: Transaction, pending: _Pending[Any]) -> tuple[_Pending[Any], Any,
                                                                      BaseException | None]:
    mark = tx._mark()
    tx.request_id = pending.request_id
    pending.ran = True
    try:
        return pending, await pending.unit(tx), None
    except SignalboxError as exc:
        tx._reset(mark)
        return pending, None, exc
    except DATABASE_ERRORS:
        raise  # the transaction itself is broken: the whole batch fails
    except Exception as exc:
        log.exception("unit of work failed")
        tx._reset(mark)
        return pending, None, exc


def _settle(pending: _Pending[Any], value: Any, error: BaseException | None) -> None:
    if pending.future.done():
        return
    if error is not None:
        pending.future.set_exception(error)
    else:
        pending.future.set_result(value)


def _like(pattern: str) -> str:
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def filter_clauses(filter: EventFilter) -> list[ColumnElement[bool]]:
    """The SQL conditions of a filter on the events table (all but ``partition``)."""
    clauses: list[ColumnElement[bool]] = []
    if filter.types:
        exact = filter.exact_types()
        if exact is not None:
            clauses.append(events.c.type.in_(exact))
        else:
            clauses.append(or_(*(events.c.type.like(_like(t), escape="\\")
                                 for t in filter.types)))
    if filter.streams:
        clauses.append(events.c.stream.in_(filter.streams))
    if filter.tickers:
        clauses.append(events.c.ticker.in_(filter.tickers))
    if filter.strategies:
        clauses.append(events.c.strategy.in_(filter.strategies))
    return clauses
