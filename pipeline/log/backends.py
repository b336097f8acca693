"""Engines per database, chosen by the URL's scheme: the only place where backends differ.

SQLite: WAL, ``synchronous=FULL`` (a commit is on disk before anyone is answered), a busy
timeout, and ``BEGIN IMMEDIATE`` for the writer so that it takes the write lock before it reads
the log head. Readers run in autocommit: each SELECT is its own consistent snapshot.

PostgreSQL: asyncpg; the writer locks the ``log_head`` row (``SELECT … FOR UPDATE``), which is
what makes positions follow commit order across connections, processes and hosts.
"""

from __future__ import annotations

import inspect
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy import exc as sqlalchemy_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

SQLITE_BUSY_TIMEOUT_MS = 5000
# How long a pooled PostgreSQL connection may take to answer the check made as it is taken
# from the pool: a trivial statement, answered in a millisecond by a server that is there.
PING_TIMEOUT = 1.0
# How much longer than the server's limit on a read (``statement_timeout``) a reader waits for
# the server's answer, which says that it cancelled the statement, before it takes the
# connection for lost.
CANCEL_MARGIN = 0.5
# What each TCP connection to PostgreSQL is told of a peer that goes silent: probed after 15 s
# idle, every 5 s; given up when data it sent (or a probe) is unacknowledged for 20 s.
TCP_OPTIONS = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)] + [
    (socket.IPPROTO_TCP, getattr(socket, name), value)
    for name, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3),
                        ("TCP_USER_TIMEOUT", 20_000))
    if hasattr(socket, name)  # Linux has them all; other systems some
]

# What a database that is down, restarting or unreachable raises: SQLAlchemy wraps most of it,
# but a connection refused or lost while connecting can surface as the driver's own error.
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    SQLAlchemyError, OSError, sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError,
)


# SQLSTATEs of a statement PostgreSQL ended for a limit of the session's: statement_timeout
# (query_canceled), lock_timeout (lock_not_available).
QUERY_CANCELED, LOCK_NOT_AVAILABLE = "57014", "55P03"


def sqlstate(exc: BaseException) -> str | None:
    """PostgreSQL's SQLSTATE of ``exc`` (or of the driver's error SQLAlchemy wrapped in it)."""
    code: str | None = getattr(getattr(exc, "orig", exc), "sqlstate", None)
    return code


def unreadable(exc: BaseException) -> str:
    """Why a read of the log failed, in words for a client: one held up or too slow says
    which settings bound it, for a retry may not help a read that is only long."""
    if (isinstance(exc, TimeoutError | sqlalchemy_exc.TimeoutError)
            or sqlstate(exc) in (QUERY_CANCELED, LOCK_NOT_AVAILABLE)):
        return ("a read of the log took too long (behind a lock, waiting for a connection, or "
                "a slow query: SIGNALBOX_READ_TIMEOUT and SIGNALBOX_QUERY_TIMEOUT bound it): "
                "retry later")
    return f"the log cannot be read ({exc.__class__.__name__}): retry later"


# Query options of a URL that SQLAlchemy's asyncpg adapter takes for itself rather than pass
# to ``asyncpg.connect`` (see ``AsyncAdapt_asyncpg_dbapi.connect``), and those of asyncpg.
ADAPTER_OPTIONS = frozenset({"prepared_statement_cache_size", "prepared_statement_name_func",
                             "async_fallback", "async_creator_fn"})
CONNECT_OPTIONS = frozenset(inspect.signature(asyncpg.connect).parameters)


def server_settings(url: str | URL) -> tuple[URL, dict[str, str]]:
    """A PostgreSQL URL without its server settings, and those settings.

    A query key that is neither a connection option of asyncpg (``ssl``, ``command_timeout``,
    …) nor the adapter's is a setting of the session, sent when connecting, as asyncpg reads
    a DSN: ``?search_path=signalbox``, ``?options=-csearch_path%3Dsignalbox`` (libpq's form),
    ``?application_name=…``. SQLAlchemy would pass them to ``asyncpg.connect``, which
    knows no such argument."""
    url = make_url(url)
    settings = {key: value if isinstance(value, str) else value[-1]
                for key, value in url.query.items()
                if key not in CONNECT_OPTIONS and key not in ADAPTER_OPTIONS}
    return url.difference_update_query(settings), settings


def _give_up_on_silence(driver_connection: Any) -> None:
    """Have the kernel give up on the connection's peer when it goes silent (a host powered
    off or cut off answers nothing, not even a reset), rather than after its defaults: no
    keepalive at all, and a quarter of an hour of retransmissions for data it sent. Then
    whatever waits on the connection fails: the LISTEN connection (which also asks for an
    answer every few seconds), or the writer's ``COMMIT``, which is waited for as long as it
    takes (a synchronous standby acknowledges at the TCP level meanwhile: only a silent peer
    counts). asyncpg takes no such option (libpq's ``keepalives_*`` are not among its own),
    so they are set on its socket once connected; a Unix socket needs none."""
    sock = driver_connection._transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        for level, option, value in TCP_OPTIONS:
            sock.setsockopt(level, option, value)


async def open_connection(connect_args: dict[str, Any]) -> Any:
    """``asyncpg.connect(**connect_args)``, for a connection made outside the engines, with
    the engines' TCP settings (:func:`_give_up_on_silence`)."""
    conn = await asyncpg.connect(**connect_args)
    _give_up_on_silence(conn)
    return conn


def _postgresql_engine(url: URL, connect_args: dict[str, Any] | None = None,
                       **options: Any) -> AsyncEngine:
    url, settings = server_settings(url)
    connect_args = dict(connect_args or {})
    if settings:
        connect_args["server_settings"] = settings
    engine = create_async_engine(url, connect_args=connect_args, **options)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        _give_up_on_silence(dbapi_connection.driver_connection)

    return engine


@dataclass(frozen=True)
class Engines:
    """A pool for readers and, on PostgreSQL, a writer engine with a single connection (the
    SQLite writer has a connection of its own: see :mod:`pipeline.log.writer`)."""

    kind: str
    url: URL
    writer: AsyncEngine | None
    reader: AsyncEngine

    async def dispose(self) -> None:
        if self.writer is not None:
            await self.writer.dispose()
        await self.reader.dispose()


def redacted_url(url: str | URL) -> str:
    """The URL without its password, fit for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def backend_kind(url: str | URL) -> str:
    name = make_url(url).get_backend_name()
    if name == "sqlite":
        return "sqlite"
    if name == "postgresql":
        return "postgresql"
    raise ValueError(
        f"unsupported database URL scheme {name!r}: use sqlite+aiosqlite:///PATH "
        "or postgresql+asyncpg://USER@HOST/DB"
    )


def create_engines(url: str | URL, *, reader_pool: int = 5, writer_timeout: float = 5.0,
                   read_timeout: float | None = None, query_timeout: float = 30.0) -> Engines:
    """``writer_timeout`` (the log's commit timeout), on PostgreSQL: how long the writer's
    session may wait for a lock, or sit in a transaction waiting for the writer (see
    :func:`_bound_writer`); ``read_timeout`` and ``query_timeout``: how long a
    read may wait, and then run (see :func:`_bound_reads`; no ``read_timeout``, as for the
    commands: a read takes as long as it takes)."""
    kind = backend_kind(url)
    url = make_url(url)
    if kind == "sqlite":
        if sqlite_path(url) is None:
            raise ValueError("SQLite needs a file: sqlite+aiosqlite:///PATH")
        return Engines(kind, url, None, _sqlite_engine(url, writer=False, pool=reader_pool))
    writer = _postgresql_engine(url, pool_size=1, max_overflow=1)
    _bound_writer(writer, writer_timeout)
    if read_timeout is None:
        reader = _postgresql_engine(url, pool_size=reader_pool, max_overflow=reader_pool)
    else:
        reader = _postgresql_engine(
            url, {"timeout": read_timeout, "command_timeout": query_timeout + CANCEL_MARGIN},
            pool_size=reader_pool, max_overflow=reader_pool, pool_timeout=read_timeout)
        _bound_reads(reader, read_timeout, query_timeout)
    for engine in (writer, reader):
        _check_on_checkout(engine)
    return Engines(kind, url, writer, reader)


def _bound_reads(reader: AsyncEngine, wait: float, run: float) -> None:
    """Have a read that is held up fail (its request is answered 503) rather than wait for as
    long as what holds it up, while one that only has much to read may take its time.

    A read waits ``wait`` seconds at most: behind a lock on its table (a schema upgrade's, an
    operator's ``LOCK TABLE``; ``lock_timeout``), for a free connection when every one of the
    pool is taken (the pool's ``pool_timeout``, 30 s by default), and for a new one to be made
    when the server does not answer (asyncpg's ``timeout``, a minute by default). It runs
    ``run`` seconds at most (``statement_timeout``): an audit report over a long window of a
    large log may take seconds, and is not cut off at ``wait``. The server ends the statement
    and says so; the connection serves on. A connection whose answers are lost (a NAT, a
    firewall, a host gone) cannot say so: the driver gives up :data:`CANCEL_MARGIN` after
    ``run`` (asyncpg's ``command_timeout``, which replaces one given in the URL), and the
    connection is dropped at once, so that neither this request (on its way out) nor the next
    one waits for it again."""
    _set_on_connect(reader, lock_timeout=wait, statement_timeout=run)

    @event.listens_for(reader.sync_engine, "handle_error")
    def _on_error(context: Any) -> None:
        if isinstance(context.original_exception, TimeoutError) and context.connection:
            context.connection.connection.driver_connection.terminate()
            context.is_disconnect = True
            context.invalidate_pool_on_disconnect = False  # the others may be fine


def _set_on_connect(engine: AsyncEngine, **timeouts: float) -> None:
    """Set each of ``timeouts`` (seconds) on every new connection of ``engine``, in one round
    trip: a ``SET`` rather than a startup parameter, which poolers refuse."""
    sql = "; ".join(f"SET {name} = {max(1, round(seconds * 1000))}"
                    for name, seconds in timeouts.items())

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.run_async(lambda conn: conn.execute(sql))


async def drop_unanswered(conn: AsyncConnection) -> None:
    """Drop ``conn`` at once, after a statement sent straight to its driver went unanswered
    (see :func:`_bound_reads`: SQLAlchemy does it for those sent through it)."""
    raw = await conn.get_raw_connection()
    raw.driver_connection.terminate()  # type: ignore[union-attr]
    await conn.invalidate()


def _check_on_checkout(engine: AsyncEngine) -> None:
    """SQLAlchemy's ``pool_pre_ping``, with a deadline. A pooled connection that sat idle may
    have been closed by the server (a restart, ``idle_session_timeout``), or forgotten without
    a word by a NAT, a firewall or a pooler: the pre-ping waits for ever for the answer of
    such a one (or as long as TCP retries, a quarter of an hour), and with it the request
    (a webhook's token check: TradingView gives up after 3 s) or the hub's tailer, and with
    that every subscriber. A connection that does not answer within :data:`PING_TIMEOUT` is
    dropped at once, and the request goes on with a new one. (Each of the others lost the same
    way costs the request that draws it as much: a pool-wide invalidation would close each
    of them gracefully as it is drawn, waiting longer for an answer that never comes.)"""

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        try:
            dbapi_connection.run_async(lambda conn: conn.fetchrow(";", timeout=PING_TIMEOUT))
        except TimeoutError as exc:
            dbapi_connection.driver_connection.terminate()  # closing would wait for an answer
            raise DisconnectionError("no answer to a ping") from exc
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise DisconnectionError(f"the connection failed a ping: {exc!r}") from exc


def _bound_writer(writer: AsyncEngine, wait: float) -> None:
    """Have PostgreSQL end what holds up the writer's session for longer than ``wait`` (the
    commit timeout, after which its callers have been answered 503): its callers' units are
    then answered as for any failed commit, and the writer goes on with the next.

    A statement of its transaction waits ``wait`` at most for a lock (``lock_timeout``):
    behind an operator's ``LOCK TABLE``, a schema change's, or another session's hold on the
    ``log_head`` row, it would otherwise wait for as long as that is held, with no other
    commit meanwhile, then commit a batch whose callers were answered long before. The
    statement fails, and with it the transaction, so nothing of the batch is written. A
    batch itself waits for nothing else: up to the writer's largest, its statements take
    milliseconds. Only waits are bounded, not the ``COMMIT``: one that waits for a
    synchronous standby must not be cancelled, or it would be seen before it is replicated
    (``statement_timeout`` would cancel it).

    And the server ends a transaction of the writer that waits longer than ``wait`` for its
    next statement, and so frees the ``log_head`` row it locked
    (``idle_in_transaction_session_timeout``): one cut off mid-commit (a network partition, a
    paused VM, a host that lost power) would otherwise stop every instance's appends until the
    server noticed (by TCP keepalive: two hours by default)."""
    _set_on_connect(writer, lock_timeout=wait, idle_in_transaction_session_timeout=wait)


def migration_engine(url: str | URL, *, wait: float = 5.0) -> AsyncEngine:
    """One connection; on SQLite with ``BEGIN IMMEDIATE`` so that DDL is transactional too.

    On PostgreSQL, for the commands that change the schema or swap the projection in: their
    sessions wait ``wait`` seconds at most (the commit timeout) for a lock
    (``lock_timeout``), and the server ends a transaction of theirs that waits longer than
    that for its next statement (``idle_in_transaction_session_timeout``). Their locks stop
    everyone: while one waits for a table's lock, every later query of that table queues
    behind it (appends give up after a commit timeout anyway); and one cut off in the middle
    of its transaction (a network partition, a host that lost power) would keep what it holds
    (the log's row, a table) until the server's TCP keepalive noticed, two hours by default.
    """
    if backend_kind(url) == "sqlite":
        return _sqlite_engine(url, writer=True)
    engine = _postgresql_engine(make_url(url), poolclass=NullPool)
    _set_on_connect(engine, lock_timeout=wait, idle_in_transaction_session_timeout=wait)
    return engine


def lock_timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is PostgreSQL's ``lock_timeout`` (lock_not_available)."""
    return sqlstate(exc) == LOCK_NOT_AVAILABLE


def sqlite_path(url: str | URL) -> Path | None:
    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    return Path(database)


def sqlite_pragmas() -> list[str]:
    """The settings of every SQLite connection of the log."""
    return [
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=FULL",
        f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
        # Type globs become LIKE patterns; keep them as case-sensitive as the in-memory match.
        "PRAGMA case_sensitive_like=ON",
    ]


def _sqlite_engine(url: str | URL, *, writer: bool, pool: int = 4) -> AsyncEngine:
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(
        url,
        pool_size=1 if writer else pool,
        max_overflow=0 if writer else pool,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in sqlite_pragmas():
            cursor.execute(pragma)
        cursor.close()

    if writer:

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
