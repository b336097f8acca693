"""Real servers for the tests: `signalbox serve` in a subprocess on 127.0.0.1, real databases.

Nothing here mocks a part of the system: the server is the installed command, the databases
are SQLite files in a temporary folder and databases created on the machine's PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import websockets
from sqlalchemy import bindparam, select
from websockets.asyncio.client import ClientConnection

from pipeline.log import EventLog, Transaction, format_time
from pipeline.log.schema import consumers, leases

PG_ADMIN_DSN = os.environ.get("SIGNALBOX_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
ADMIN_TOKEN = "sbx_test_admin_" + uuid.uuid4().hex
INGEST_TOKEN = "sbx_test_ingest_" + uuid.uuid4().hex
RUNNING = re.compile(r"Uvicorn running on http://[\d.]+:(\d+)")
# httpx makes an SSL context (reading the CA bundle: some 30 ms) for each client not given one.
# The test servers speak plain HTTP: clients made by the dozen take this one, made once.
PLAIN_HTTP = ssl.create_default_context()


async def create_pg_database() -> tuple[str, str]:
    """A new, empty PostgreSQL database: (its SQLAlchemy URL, its name)."""
    name = f"sbx_test_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}", name


async def drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


class ServerProcess:
    """`python -m pipeline serve` on a free port of 127.0.0.1."""

    def __init__(self, database_url: str, *, env: Mapping[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        self.database_url = database_url
        self.extra_env = dict(env or {})
        self.args = list(args or [])
        self.process: subprocess.Popen[str] | None = None
        self.port = 0
        self.output: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        env = {**os.environ, "SIGNALBOX_ADMIN_TOKEN": ADMIN_TOKEN,
               "SIGNALBOX_WEBHOOK_SECRET": INGEST_TOKEN, **self.extra_env}
        port = str(self.port) if self.port else "0"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "serve", "--host", "127.0.0.1", "--port", port,
             "--database-url", self.database_url, *self.args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        ready = threading.Event()  # one per process: an old process's end must not count
        threading.Thread(target=self._pump, args=(self.process, ready), daemon=True).start()
        if not ready.wait(timeout) or self.process.poll() is not None:
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.output[-50:]))
        return self

    def _pump(self, process: subprocess.Popen[str], ready: threading.Event) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.output.append(line)
            match = RUNNING.search(line)
            if match:
                self.port = int(match.group(1))
                ready.set()
        process.wait()
        ready.set()  # it ended: whoever waits for it to start need not wait any longer

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as in a crash or an OOM kill."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)

    def stop(self, timeout: float = 20.0) -> int:
        if self.process is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def restart(self) -> ServerProcess:
        """Start again on the same port (after stop or kill)."""
        return self.start()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def sqlite_only(reason: str, *, fixture: str = "database_url") -> pytest.MarkDecorator:
    """Run a test on SQLite alone, for a ``reason`` that says why the backend makes no
    difference to what it checks (argparse, settings, headers, the WebSocket protocol…).
    ``fixture`` names the backend-parametrized fixture the test uses: ``database_url`` (which
    ``server`` and ``client`` use) or ``shared_database_url`` (``shared_server``'s)."""
    assert reason.strip(), "say why the backend does not matter"
    return pytest.mark.parametrize(fixture, ["sqlite"], indirect=True)


def fresh_connections(base_url: str) -> httpx.Client:
    """One client for the many requests of a property test (making a client costs more than
    a request), each still on a new connection: it keeps none alive."""
    return httpx.Client(base_url=base_url, timeout=30,
                        limits=httpx.Limits(max_keepalive_connections=0))


def headers(token: str = ADMIN_TOKEN, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


async def read_all_events(client: httpx.AsyncClient, token: str = ADMIN_TOKEN,
                          **params: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        response = await client.get("/api/events", params={"after": after, "limit": 1000,
                                                           **params},
                                    headers=headers(token))
        response.raise_for_status()
        page = response.json()
        events.extend(page["events"])
        if not page["events"]:
            return events
        after = page["events"][-1]["position"]


async def ws_connect(server: ServerProcess, **hello: Any) -> ClientConnection:
    conn = await websockets.connect(server.ws_url, max_size=None)
    frame = {"op": "hello", "token": ADMIN_TOKEN, "cursor": None, **hello}
    await conn.send(json.dumps(frame))
    return conn


async def next_frame(conn: ClientConnection, wait: float = 10.0) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(await asyncio.wait_for(conn.recv(), wait))
    return value


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def verify_chain(events: list[dict[str, Any]]) -> None:
    """Check positions 1..N and the hash chain as docs/protocol.md defines it, independently
    of the server's code: sha256(previous hash + canonical JSON of the event)."""
    previous = "0" * 64
    for expected, event in enumerate(events, start=1):
        assert event["position"] == expected, f"gap or repeat at {expected}"
        body = {k: event[k] for k in ("data", "id", "meta", "position", "stream", "time",
                                      "type")}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False)
        digest = hashlib.sha256((previous + canonical).encode()).hexdigest()
        assert digest == event["hash"], f"hash chain broken at {expected}"
        previous = digest


class FastClient:
    """A small keep-alive HTTP/1.1 client for bulk load in tests: many requests over a few
    persistent connections, without the per-request overhead of a general-purpose client.
    A connection that fails is dropped and the next request on its slot dials again."""

    Slot = tuple[asyncio.StreamReader, asyncio.StreamWriter] | None

    def __init__(self, base_url: str, connections: int = 16) -> None:
        host, port = base_url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.size = connections
        self._free: asyncio.Queue[FastClient.Slot] = asyncio.Queue()
        self._all: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> FastClient:
        for _ in range(self.size):
            self._free.put_nowait(await self._dial())
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._all:
            writer.transport.abort()

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self._all.append(writer)
        return reader, writer

    async def post(self, path: str, payload: Any, token: str = ADMIN_TOKEN,
                   extra: Mapping[str, str] | None = None) -> tuple[int, Any]:
        body = json.dumps(payload).encode()
        lines = [f"POST {path} HTTP/1.1", f"Host: {self.host}",
                 f"Authorization: Bearer {token}", "Content-Type: application/json",
                 f"Content-Length: {len(body)}"]
        lines.extend(f"{k}: {v}" for k, v in (extra or {}).items())
        request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        slot = await self._free.get()
        try:
            if slot is None:
                slot = await self._dial()
            reader, writer = slot
            writer.write(request)
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionResetError("the server closed the connection")
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            content = await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError):
            if slot is not None:
                slot[1].transport.abort()
            slot = None
            raise
        finally:
            self._free.put_nowait(slot)
        return int(status_line.split()[1]), json.loads(content)


class TcpProxy:
    """A real TCP proxy on 127.0.0.1 in front of a server (or any port), that can cut every
    connection through it at once, refuse all of them for a while, or hold everything sent
    through them: a flaky network, a database that went down or one that hangs, made on
    demand."""

    def __init__(self, target: ServerProcess | int, *, gateway: bool = False) -> None:
        self.target = target
        self.gateway = gateway  # answer as a reverse proxy (nginx) does when its server is away
        self.bad_gateways = 0  # 502s answered
        self.port = 0
        self.cuts = 0
        self.down = False
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._links: set[asyncio.Event] = set()  # one per connection, set once it is lost
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._trap: tuple[bytes, bool] | None = None
        self._held = asyncio.Event()
        self._released = asyncio.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.thaw()
        self.cut()
        if self._server is not None:
            self._server.close()

    @property
    def target_port(self) -> int:
        return self.target if isinstance(self.target, int) else self.target.port

    def fail(self) -> None:
        """Down: every connection is cut, and new ones are refused until `recover`."""
        self.down = True
        self.cut()

    def recover(self) -> None:
        self.down = False

    def freeze(self) -> None:
        """Silent: every connection stays open, but nothing passes either way until `thaw`,
        as in a network partition."""
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()
        self._released.set()

    def hold_at(self, marker: bytes, *, answers: bool = False) -> asyncio.Event:
        """The next connection to send ``marker`` to the target is held until `thaw`: what it
        sends stops at the proxy from ``marker`` on, while what the target sends still reaches
        it, as for a client cut off just before it sent ``marker``; or, with ``answers``,
        ``marker`` reaches the target but nothing the target sends from then on reaches the
        client, as for a link lost just after. Returns an event set once that happened."""
        self._trap = (marker, answers)
        self._held.clear()
        self._released.clear()
        return self._held

    def blackhole(self) -> None:
        """Every connection open now is lost without a word: what either side sends over it
        vanishes and neither is told, as when a NAT or a firewall forgets a connection that
        sat idle. New connections pass."""
        for lost in self._links:
            lost.set()
        self._links.clear()

    def cut(self) -> None:
        self.cuts += 1
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            if self.gateway:
                await self._bad_gateway(reader, writer)
            writer.transport.abort()
            return
        self._open.update((writer, up_writer))
        answers = asyncio.Event()  # cleared while this connection's answers are held
        answers.set()
        lost = asyncio.Event()
        self._links.add(lost)
        try:
            await asyncio.gather(self._pipe(reader, up_writer, lost, answers=answers),
                                 self._pipe(up_reader, writer, lost, gate=answers))
        finally:
            self._links.discard(lost)

    async def _bad_gateway(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        """nginx's answer when nothing listens behind it: 502 with an HTML page."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await reader.readuntil(b"\r\n\r\n")
            page = b"<html><head><title>502 Bad Gateway</title></head></html>\r\n"
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nServer: nginx\r\n"
                         b"Content-Type: text/html\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(page), page))
            await writer.drain()
            self.bad_gateways += 1

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    lost: asyncio.Event, *, answers: asyncio.Event | None = None,
                    gate: asyncio.Event | None = None) -> None:
        try:
            while data := await reader.read(65536):
                if lost.is_set():
                    continue
                await self._flowing.wait()
                if gate is not None and not gate.is_set():
                    await self._released.wait()
                trap = self._trap
                if answers is not None and trap is not None and trap[0] in data:
                    self._trap = None
                    self._held.set()
                    if trap[1]:
                        answers.clear()
                    else:
                        await self._released.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._open.discard(writer)
            writer.transport.abort()


# Another instance taking a lease, whoever holds it: in a group commit, under the log's lock,
# as any instance takes or renews one.
TAKE_OVER = (leases.update().where(leases.c.name == bindparam("b_name"))
             .values(holder=bindparam("holder"), expires_at=bindparam("expires_at")))


async def take_over(event_log: EventLog, name: str, holder: str, seconds: float) -> int | None:
    """Give lease ``name`` to ``holder`` for ``seconds`` (less than 0: lapsed already, for any
    instance to take); the position of the consumer of that name (a handler's checkpoint) as
    of then, in the same transaction."""

    async def unit(tx: Transaction) -> int | None:
        expires_at = format_time(tx.now + timedelta(seconds=seconds))
        tx.stage(TAKE_OVER, {"b_name": name, "holder": holder, "expires_at": expires_at})
        row = await tx.fetch_one(select(consumers.c.position).where(consumers.c.name == name))
        return None if row is None else int(row["position"])

    return await event_log.transact(unit)
