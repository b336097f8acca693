"""The log writer's database session: one transaction at a time, in as few round trips as possible.

A group commit is: lock the log and read its head, let the units of work read what they must,
then write every staged row, move the head and commit. :class:`WriterSession` is that sequence
and nothing more, so that each backend can do it the cheapest way:

- SQLite (:class:`SqliteWriter`): the ``sqlite3`` module, called on the event loop's own
  thread: a hop to another thread costs more than a whole commit's CPU (see
  docs/performance.md). The loop waits for the commit's fsync (SQLite releases the GIL
  meanwhile, so the threads that read for subscribers go on); it never waits for a lock that
  another process holds: that wait, up to the busy timeout, happens on a thread of its own.
- PostgreSQL (:class:`SqlAlchemyWriter`): asyncpg through SQLAlchemy, one connection; the
  head row is locked with ``SELECT … FOR UPDATE`` and each batch ends with a ``NOTIFY``.

Rows go to the driver as tuples in an ``executemany``: the statements are compiled once per
dialect, and the log's columns (text and integers) need no conversion on the way.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import asyncpg
from sqlalchemy import Dialect, Executable, select, text, update
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from pipeline.log.backends import SQLITE_BUSY_TIMEOUT_MS, sqlite_pragmas
from pipeline.log.notify import CHANNEL
from pipeline.log.schema import events, log_head

log = logging.getLogger("signalbox.log")

T = TypeVar("T")
Row = dict[str, Any]
Writes = Sequence[tuple[Executable, Sequence[Row]]]

HEAD_ROW = 1
INSERT_EVENT = events.insert()


class StagedWriteFailed(Exception):
    """A staged write failed before the ``COMMIT`` was sent: nothing of the batch can have
    been committed (its cause is in ``__cause__``)."""


class CommitOutcomeUnknown(Exception):
    """The connection was lost once the ``COMMIT`` was sent: the server may have committed
    the batch or not, and nothing here can tell (its cause is in ``__cause__``)."""


class WriterSession(Protocol):
    dialect: Dialect

    async def begin(self) -> tuple[int, str]:
        """Open a transaction that holds the log's write lock; the head (position, hash)."""

    async def fetch_one(self, statement: Executable) -> Row | None:
        """The first row of a query inside the open transaction, as a dict."""

    async def fetch_all(self, statement: Executable) -> list[Row]:
        """Every row of a query inside the open transaction, as dicts."""

    async def commit(self, writes: Writes, head: tuple[int, str] | None) -> None:
        """Execute the staged writes, move the head (when events were appended), commit.
        Raises :class:`StagedWriteFailed` when a write fails, before the ``COMMIT``, and
        :class:`CommitOutcomeUnknown` when the connection was lost during the ``COMMIT``."""

    async def abandon(self) -> None:
        """After a failure: roll back and drop the connection; the next begin reconnects."""

    async def close(self) -> None: ...


class Compiled(NamedTuple):
    sql: str
    names: tuple[str, ...]  # the parameters, in order
    defaults: dict[str, Any]  # values the statement fixes itself (an OFFSET 0, say)

    def values(self, params: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(params[n] if n in params else self.defaults[n] for n in self.names)


_COMPILED: dict[tuple[Executable, str], Compiled] = {}


def compiled(statement: Executable, dialect: Dialect) -> Compiled:
    """The statement's SQL for ``dialect`` and its parameters in order.

    Statements executed this way are module constants whose values are all bind parameters,
    so the cache stays as small as the code."""
    key = (statement, dialect.name)
    if key not in _COMPILED:
        compiled_ = statement.compile(dialect=dialect)  # type: ignore[attr-defined]
        names = compiled_.positiontup
        if names is None:
            raise TypeError(f"{dialect.name} does not use positional parameters")
        defaults = {k: v for k, v in compiled_.params.items() if v is not None}
        _COMPILED[key] = Compiled(str(compiled_), tuple(names), defaults)
    return _COMPILED[key]


def as_tuples(names: tuple[str, ...], rows: Sequence[Row]) -> list[tuple[Any, ...]]:
    return [tuple(row[n] for n in names) for row in rows]


class SqliteWriter:
    """The writer's own ``sqlite3`` connection, used only from its own thread."""

    dialect: Dialect = sqlite_dialect.dialect(paramstyle="qmark")

    def __init__(self, path: Path, *, checkpoint_every: float = 1.0) -> None:
        self.path = path
        self.checkpoint_every = checkpoint_every
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="signalbox-sqlite-writer")
        self._db: sqlite3.Connection | None = None
        # WAL checkpoints (copying the log's pages into the database file, with an fsync) run
        # on a connection and thread of their own, so that no commit ever waits for one.
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="signalbox-checkpoint")
        self._checkpoint_db: sqlite3.Connection | None = None
        self._checkpointing: asyncio.Future[None] | None = None
        self._last_checkpoint = time.monotonic()

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)
        for pragma in sqlite_pragmas():
            db.execute(pragma)
        return db

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            db = self._open()
            db.execute("PRAGMA wal_autocheckpoint=0")  # see _checkpoint
            db.execute("PRAGMA busy_timeout=0")  # see begin
            self._db = db
        return self._db

    def _checkpoint(self) -> None:
        if self._checkpoint_db is None:
            self._checkpoint_db = self._open()
        # PASSIVE: copies what no reader still needs and never blocks the writer.
        self._checkpoint_db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _after_commit(self) -> None:
        now = time.monotonic()
        if self._checkpointing is None and now - self._last_checkpoint >= self.checkpoint_every:
            self._last_checkpoint = now
            future = asyncio.get_running_loop().run_in_executor(self._checkpointer,
                                                                self._checkpoint)
            self._checkpointing = future
            future.add_done_callback(self._checkpointed)

    def _checkpointed(self, future: asyncio.Future[None]) -> None:
        self._checkpointing = None
        if not future.cancelled() and future.exception() is not None:
            log.warning("WAL checkpoint failed: %r", future.exception())

    @staticmethod
    def _head(db: sqlite3.Connection) -> tuple[int, str]:
        position, digest = db.execute(
            "SELECT position, hash FROM log_head WHERE id = ?", (HEAD_ROW,)).fetchone()
        return int(position), str(digest)

    def _begin_waiting(self) -> tuple[int, str]:
        """On the writer's thread: connect if need be, and wait for the lock as long as the
        busy timeout allows."""
        db = self._connection()
        db.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        try:
            db.execute("BEGIN IMMEDIATE")
        finally:
            db.execute("PRAGMA busy_timeout=0")
        return self._head(db)

    async def begin(self) -> tuple[int, str]:
        db = self._db
        if db is not None:
            try:
                db.execute("BEGIN IMMEDIATE")  # with no busy timeout: at once, or SQLITE_BUSY
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
            else:
                return self._head(db)
        # Not connected yet, or another process holds the lock (a command, another instance):
        # wait on the writer's thread, never on the event loop's.
        return await self._run(self._begin_waiting)

    def _query(self, statement: Executable) -> tuple[str, tuple[Any, ...]]:
        """The SQL and its values, lists of an ``IN`` spelled out as one parameter each."""
        compiled_ = statement.compile(  # type: ignore[attr-defined]
            dialect=self.dialect, compile_kwargs={"render_postcompile": True})
        params = compiled_.construct_params()
        return str(compiled_), tuple(params[name] for name in compiled_.positiontup or ())

    def _fetch(self, sql: str, params: tuple[Any, ...], limit: int | None) -> list[Row]:
        cursor = self._connection().execute(sql, params)
        found = cursor.fetchall() if limit is None else cursor.fetchmany(limit)
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in found]

    async def fetch_one(self, statement: Executable) -> Row | None:
        rows = self._fetch(*self._query(statement), 1)
        return rows[0] if rows else None

    async def fetch_all(self, statement: Executable) -> list[Row]:
        return self._fetch(*self._query(statement), None)

    def _commit(self, batches: list[tuple[str, list[tuple[Any, ...]]]],
                head: tuple[int, str] | None) -> None:
        db = self._connection()
        try:
            for sql, rows in batches:
                db.executemany(sql, rows)
            if head is not None:
                db.execute("UPDATE log_head SET position = ?, hash = ? WHERE id = ?",
                           (*head, HEAD_ROW))
        except Exception as exc:
            raise StagedWriteFailed(exc) from exc
        db.execute("COMMIT")

    async def commit(self, writes: Writes, head: tuple[int, str] | None) -> None:
        batches = []
        for statement, rows in writes:
            sql, names, _ = compiled(statement, self.dialect)
            batches.append((sql, as_tuples(names, rows)))
        self._commit(batches, head)
        self._after_commit()

    def _abandon(self) -> None:
        if self._db is not None:
            try:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            finally:
                self._db.close()
                self._db = None

    async def abandon(self) -> None:
        await self._run(self._abandon)

    async def close(self) -> None:
        try:
            await self._run(self._abandon)
            if self._checkpointing is not None:
                await self._checkpointing
        finally:
            self._thread.shutdown(wait=False)
            self._checkpointer.shutdown(wait=True)
            if self._checkpoint_db is not None:
                self._checkpoint_db.close()


NOTIFY = text(f"SELECT pg_notify('{CHANNEL}', :head)")
HEAD_FOR_UPDATE = (select(log_head.c.position, log_head.c.hash)
                   .where(log_head.c.id == HEAD_ROW).with_for_update())


class SqlAlchemyWriter:
    """One pooled connection of an async engine (PostgreSQL through asyncpg)."""

    def __init__(self, engine: AsyncEngine, *, begin_timeout: float = 5.0) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        self.begin_timeout = begin_timeout
        self._conn: AsyncConnection | None = None

    async def begin(self) -> tuple[int, str]:
        """Begin on the writer's connection, kept between commits (the pool's check never
        sees it): one the server closed meanwhile (a restart, an idle timeout, a proxy's) is
        replaced once, since nothing was sent on it yet.

        One that a NAT, a firewall or a pooler forgot without a word never answers (TCP gives
        up after a quarter of an hour; through a proxy, never): beginning gives up after
        ``begin_timeout`` (the commit timeout, after which the callers were answered 503
        anyway), and the caller drops the connection. A wait for the log's lock that long
        (behind a long ``rebuild --swap``, say) costs no more than a new connection. The
        server bounds every wait of the transaction for a lock as well (``lock_timeout``, see
        :func:`pipeline.log.backends.create_engines`), but a ``COMMIT`` is left to take as
        long as it takes (a synchronous standby's), since giving up on it would let it be
        seen before it is replicated."""
        try:
            return await asyncio.wait_for(self._begin(), self.begin_timeout)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        await self.abandon()
        return await asyncio.wait_for(self._begin(), self.begin_timeout)

    async def _begin(self) -> tuple[int, str]:
        if self._conn is None or self._conn.closed or self._conn.invalidated:
            self._conn = await self.engine.connect()
        await self._conn.begin()
        row = (await self._conn.execute(HEAD_FOR_UPDATE)).one()
        return int(row.position), str(row.hash)

    async def fetch_one(self, statement: Executable) -> Row | None:
        assert self._conn is not None
        found = (await self._conn.execute(statement)).one_or_none()
        return None if found is None else dict(found._mapping)

    async def fetch_all(self, statement: Executable) -> list[Row]:
        assert self._conn is not None
        return [dict(row._mapping) for row in (await self._conn.execute(statement)).all()]

    async def commit(self, writes: Writes, head: tuple[int, str] | None) -> None:
        conn = self._conn
        assert conn is not None
        try:
            for statement, rows in writes:
                sql, names, _ = compiled(statement, self.dialect)
                await conn.exec_driver_sql(sql, as_tuples(names, rows))
            if head is not None:
                await conn.execute(update(log_head).where(log_head.c.id == HEAD_ROW)
                                   .values(position=head[0], hash=head[1]))
                await conn.execute(NOTIFY, {"head": str(head[0])})  # delivered at commit
        except Exception as exc:
            raise StagedWriteFailed(exc) from exc
        try:
            await conn.commit()
        except DBAPIError as exc:
            # An error the server answered means no commit; a lost connection, anything.
            if exc.connection_invalidated:
                raise CommitOutcomeUnknown(exc) from exc
            raise
        except (OSError, asyncpg.InterfaceError) as exc:
            raise CommitOutcomeUnknown(exc) from exc

    async def abandon(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.invalidate()
            finally:
                await conn.close()

    async def close(self) -> None:
        if self._conn is not None:
            await asyncio.wait_for(self._conn.close(), 5)
            self._conn = None
