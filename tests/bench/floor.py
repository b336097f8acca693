"""The floor: what a durable signal costs on this stack with nothing but its storage.

``python -m tests.bench.floor --port P --database PATH`` serves, under uvicorn with the
settings of the minimal endpoint (``tests.bench.minimal``), a ``POST /api/signals`` that
parses the JSON body, as the minimal endpoint does, and answers 202 only once the rows a
signal takes in Signalbox's log are committed: its ``signal.received`` and
``signal.accepted`` events, its row in the ``signals`` table and the log's head, in the real
schema (every table and index of :mod:`pipeline.log.schema`), group-committed with the log's
SQLite settings (WAL, ``synchronous=FULL``), WAL checkpoints on a thread of their own.

Everything else a signal needs is left out: no token, no validation or normalization (the
accepted event holds the body again), no canonical encoding, no hash chain (a constant), no
projection fold, no fan-out. Ids are a counter. And it is the fastest such server found on
this stack: a bare ASGI application, without Starlette's routing, request and response
objects (the minimal endpoint is a Starlette app, as the issue's limit is), and the rows
written on the event loop's thread but the ``COMMIT``, which waits for the disk, on a thread
of its own, so that the loop reads the next requests meanwhile (each of these two choices was
worth about a fifth more signals a second; Signalbox's writer, whose loop has far more to do
per signal, gained nothing from the second). So it measures the least that a server on
uvicorn and SQLite can do per durable signal of this schema: a limit that no implementation
of the contract in Python on this stack, storing what this log stores, goes past. ``make
bench`` prints it beside the minimal endpoint and the peers.

With ``--workers N`` it is N such processes on one socket (uvicorn's own workers) and one
file, each reading the head in its transaction, as Signalbox's workers do: SQLite's write
lock takes the group commits in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn
from sqlalchemy import create_engine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.log.backends import sqlite_pragmas
from pipeline.log.schema import metadata

ACCEPTED = b'{"status":"accepted"}'
ANSWER: Message = {"type": "http.response.start", "status": 202, "headers": [
    (b"content-type", b"application/json"), (b"content-length", str(len(ACCEPTED)).encode())]}
HASH = "0" * 64
EVENTS = ("INSERT INTO events (position, id, stream, type, data, meta, time, hash, ticker, "
          "strategy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
SIGNALS = ("INSERT INTO signals (signal_id, status, source, token_name, ticker, strategy, "
           "action, idempotency_key, content_hash, received_at, updated_at, first_position, "
           "last_position, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)")
DATABASE = "SIGNALBOX_FLOOR_DATABASE"
HEAD_POSITION = "SELECT position FROM log_head WHERE id = 1"
HEAD = "UPDATE log_head SET position = ?, hash = ? WHERE id = 1"


class Writer:
    """Group commit: every signal waiting when a commit ends goes into the next one."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in sqlite_pragmas():
            self.db.execute(pragma)
        self.db.execute("PRAGMA wal_autocheckpoint=0")
        self.checkpoints = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.checkpointer = ThreadPoolExecutor(1)
        self.committer = ThreadPoolExecutor(1)
        self.waiting: list[tuple[dict[str, Any], str, asyncio.Future[None]]] = []
        self.wake = asyncio.Event()
        self.ids = itertools.count(1)
        self.prefix = f"{os.getpid():08x}"  # workers share the file

    async def append(self, body: dict[str, Any], raw: str) -> None:
        done = asyncio.get_running_loop().create_future()
        self.waiting.append((body, raw, done))
        self.wake.set()
        await done

    async def run(self) -> None:
        last_checkpoint = time.monotonic()
        checkpoint: asyncio.Future[Any] | None = None
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.waiting = self.waiting, []
            try:
                self.write(batch)
                await asyncio.get_running_loop().run_in_executor(
                    self.committer, self.db.execute, "COMMIT")
            except sqlite3.Error as exc:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, _, done in batch:
                    if not done.done():
                        done.set_result(None)
            if (checkpoint is None or checkpoint.done()) and time.monotonic() - last_checkpoint > 1:
                last_checkpoint = time.monotonic()
                checkpoint = asyncio.get_running_loop().run_in_executor(
                    self.checkpointer, self.checkpoints.execute, "PRAGMA wal_checkpoint(PASSIVE)")
            await asyncio.sleep(0)  # let the answers go out and the next requests arrive

    def write(self, batch: list[tuple[dict[str, Any], str, asyncio.Future[None]]]) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        self.db.execute("BEGIN IMMEDIATE")
        (position,) = self.db.execute(HEAD_POSITION).fetchone()
        events: list[tuple[Any, ...]] = []
        rows: list[tuple[Any, ...]] = []
        for body, raw, _ in batch:
            n = next(self.ids)
            signal_id = f"{self.prefix}{n:024x}"
            stream = f"signal-{signal_id}"
            ticker, strategy = body.get("ticker"), body.get("strategy")
            first = position + 1
            position += 2
            events.append((first, f"{self.prefix}{2 * n:024x}", stream, "signal.received", raw,
                           "{}", now, HASH, ticker, strategy))
            events.append((first + 1, f"{self.prefix}{2 * n + 1:024x}", stream,
                           "signal.accepted", raw, "{}", now, HASH, ticker, strategy))
            rows.append((signal_id, "accepted", "api", "bench", ticker, strategy,
                         body.get("action"), None, None, now, now, first, first + 1))
        self.db.executemany(EVENTS, events)
        self.db.executemany(SIGNALS, rows)
        self.db.execute(HEAD, (position, HASH))


def create(path: Path) -> None:
    engine = create_engine(f"sqlite:///{path}")
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO log_head (id, epoch, position, hash, created_at) "
                             "VALUES (1, 'floor', 0, ?, '')", (HASH,))
    engine.dispose()


def app(path: Path) -> ASGIApp:
    """``POST /api/signals`` (whatever the method and path: the load generator sends nothing
    else), answered once committed, as a bare ASGI application."""
    writer: Writer | None = None

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal writer
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            writer = Writer(path)
            task = asyncio.create_task(writer.run())
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            task.cancel()
            await send({"type": "lifespan.shutdown.complete"})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks).decode()
        assert writer is not None
        await writer.append(json.loads(raw), raw)
        await send(ANSWER)
        await send({"type": "http.response.body", "body": ACCEPTED})

    return serve


def from_environment() -> ASGIApp:
    """The app of a worker: uvicorn's workers import it by name."""
    return app(Path(os.environ[DATABASE]))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.floor")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--database", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    create(args.database)
    os.environ[DATABASE] = str(args.database)
    uvicorn.run("tests.bench.floor:from_environment",
                factory=True, workers=args.workers, host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False, server_header=False)


if __name__ == "__main__":
    main()
