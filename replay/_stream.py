"""The resumable WebSocket subscriber and the cursor stores it saves its position to.

Private: import these names from ``replay``. See docs/clients.md for how to use them and
docs/protocol.md for the frames.

Two positions are kept apart on purpose. The *resume cursor* is what the next hello sends: the
last event handed to the caller (or the ``live`` frame's position, when larger). The
*checkpoint* is what the caller has handled: it moves only when the caller asks for the next
event (or calls `Subscriber.commit`), and only it is saved and acknowledged. A crash between
the two redelivers at most the events in hand: at-least-once, never a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import websockets
from websockets.asyncio.client import ClientConnection

from replay._files import write_atomically
from replay._http import (
    Backoff,
    Conflict,
    EpochChanged,
    Event,
    Forbidden,
    ProtocolError,
    SignalboxClientError,
    Unauthorized,
    retry_after_seconds,
)

MAX_MESSAGE = 16 * 1024 * 1024
PONG = '{"op":"pong"}'

# -- cursor stores -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A handled position and the epoch of the log it belongs to."""

    epoch: str | None
    position: int


class CursorStore(Protocol):
    """Where a subscriber keeps its checkpoint between runs."""

    async def load(self) -> Checkpoint | None: ...

    async def save(self, checkpoint: Checkpoint) -> None: ...


class MemoryCursorStore:
    """Keeps the checkpoint in this process only (the default)."""

    def __init__(self, checkpoint: Checkpoint | None = None) -> None:
        self.checkpoint = checkpoint

    async def load(self) -> Checkpoint | None:
        return self.checkpoint

    async def save(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint


class FileCursorStore:
    """A JSON file, replaced atomically: written to a temporary file in the same folder,
    fsynced, renamed over the old one, and the folder fsynced, so that a crash leaves either
    the old checkpoint or the new one, never a torn file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    async def load(self) -> Checkpoint | None:
        return await asyncio.to_thread(self.read)

    async def save(self, checkpoint: Checkpoint) -> None:
        await asyncio.to_thread(self.write, checkpoint)

    def read(self) -> Checkpoint | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            value = json.loads(text)
            position, epoch = value["position"], value.get("epoch")
            if not isinstance(position, int) or not isinstance(epoch, str | None):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{self.path} is not a cursor file: remove it to start over"
                             ) from None
        return Checkpoint(epoch, position)

    def write(self, checkpoint: Checkpoint) -> None:
        write_atomically(self.path, json.dumps({"epoch": checkpoint.epoch,
                                                "position": checkpoint.position}),
                         make_folder=True)


# -- the subscriber ------------------------------------------------------------------------


class SubscriberState(StrEnum):
    CONNECTING = "connecting"  #: before the first welcome
    REPLAYING = "replaying"  #: welcomed, catching up from the cursor
    LIVE = "live"  #: caught up: events arrive as they commit
    RECONNECTING = "reconnecting"  #: the link was lost; waiting out the backoff or dialling
    CLOSED = "closed"  #: closed by the caller or by an error that a reconnect cannot fix


class Group(NamedTuple):
    """A consumer group member: receives the signals whose ticker hashes to ``member``."""

    name: str
    member: int
    size: int


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events to receive: lists combine with AND; within one, any value matches."""

    types: Sequence[str] = ()
    streams: Sequence[str] = ()
    tickers: Sequence[str] = ()
    strategies: Sequence[str] = ()

    def to_json(self) -> dict[str, list[str]]:
        found = {"types": self.types, "streams": self.streams, "tickers": self.tickers,
                 "strategies": self.strategies}
        return {key: list(values) for key, values in found.items() if values}


@dataclass(frozen=True, slots=True)
class Covered:
    """Replay has looked up to ``position`` (a ``live`` frame): a filtered cursor may skip."""

    position: int


@dataclass(frozen=True, slots=True)
class Restarted:
    """The log's epoch changed and the subscriber starts again from 0 in ``epoch``."""

    epoch: str


Item = Event | Covered | Restarted


class Closed(Exception):
    """The subscriber was closed: iteration ends."""


def websocket_url(url: str) -> str:
    """``http://host:port`` (or an explicit ``ws://…/ws``) → the stream's URL."""
    base = url.rstrip("/")
    for plain, secure in (("http://", "ws://"), ("https://", "wss://")):
        if base.startswith(plain):
            return secure + base.removeprefix(plain) + "/ws"
    if base.startswith(("ws://", "wss://")):
        return base
    raise ValueError(f"not an http(s) or ws(s) URL: {url!r}")


class Subscriber:
    """``async for event in Subscriber(url, token, …)``: every matching event once, in order,
    across disconnects and restarts (see the module docstring for the cursor rules).

    With ``autocommit=False`` the iterator never saves by itself: call `commit` when the events
    handed out so far are handled, e.g. every few hundred events when each save costs an
    fsync (`FileCursorStore`).
    """

    def __init__(self, url: str, token: str, *,
                 filter: Filter | Mapping[str, Sequence[str]] | None = None,
                 consumer: str | None = None, cursor: int | None = None,
                 epoch: str | None = None, store: CursorStore | None = None,
                 on_epoch_change: Literal["raise", "restart"] = "raise",
                 group: Group | tuple[str, int, int] | None = None,
                 backoff: Backoff | None = None, ack_interval: float = 0.2,
                 connect_timeout: float = 10.0, batch: bool = True,
                 autocommit: bool = True) -> None:
        if cursor is not None and cursor < 0:
            raise ValueError("cursor must be >= 0 (0: from the beginning) or None (live)")
        if on_epoch_change not in ("raise", "restart"):
            raise ValueError('on_epoch_change must be "raise" or "restart"')
        self.url = websocket_url(url)
        self._token = token
        self._filter = filter if isinstance(filter, Filter) else Filter(**(filter or {}))
        self._consumer = consumer
        self._group = Group(*group) if group is not None else None
        self._store: CursorStore = store if store is not None else MemoryCursorStore()
        self._on_epoch_change = on_epoch_change
        self._backoff = backoff or Backoff()
        self._ack_interval = ack_interval
        self._connect_timeout = connect_timeout
        self._batch = batch
        self._cursor, self._epoch = cursor, epoch
        self._checkpoint: Checkpoint | None = None  # handled; saved by _save
        self._saved: Checkpoint | None = None
        self._loaded = False
        self._pending: Item | None = None  # handed out, not yet known to be handled
        self._autocommit = autocommit
        self._restart: Restarted | None = None
        self._conn: ClientConnection | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._frames: deque[dict[str, Any]] = deque()
        self._error_frame: dict[str, Any] = {}
        self._heartbeat: float | None = None
        self._failures = 0
        self._retry_after: float | None = None  # the wait the server asked for, if any
        self._state = SubscriberState.CONNECTING
        self._closing = asyncio.Event()
        self._save_lock = asyncio.Lock()
        self._last_sent = 0.0
        self._ack_due: int | None = None
        self._ack_sent: int | None = None
        self._last_ack = 0.0
        self.connections = 0  #: welcomes received so far: 1 + the number of reconnects

    # -- the public surface ----------------------------------------------------------------

    @property
    def state(self) -> SubscriberState:
        return self._state

    @property
    def cursor(self) -> int | None:
        """Where the next connection resumes: the last event handed out, or the live frame's
        position when larger (None: not connected yet and no start given)."""
        return self._cursor

    @property
    def epoch(self) -> str | None:
        return self._epoch

    @property
    def committed(self) -> Checkpoint | None:
        """The checkpoint last saved to the store."""
        return self._saved

    def __aiter__(self) -> Subscriber:
        return self

    async def __anext__(self) -> Event:
        if self._autocommit:
            await self.commit()  # asked for the next event: the one handed out is handled
        try:
            while True:
                item = await self.next_item()
                if isinstance(item, Event):
                    self._pending = item
                    return item
                if self._autocommit or isinstance(item, Restarted):
                    self._pending = None  # a restart makes the old epoch's positions moot
                    await self.mark_handled(item)
                else:
                    self._pending = item  # covers the events handed out before it
        except Closed:
            raise StopAsyncIteration from None

    async def commit(self) -> None:
        """Everything handed out so far is handled: save the checkpoint now (and ack it)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._advance(pending)
        await self._save()

    async def close(self) -> None:
        """Close the link (after acknowledging what was committed). Events handed out but not
        committed are not saved: they come again next time."""
        if self._state is SubscriberState.CLOSED:
            return
        self._state = SubscriberState.CLOSED
        self._closing.set()
        conn, self._conn = self._conn, None
        self._stop_keepalive()
        if conn is not None:
            await self._send_ack(conn)
            with contextlib.suppress(Exception):
                await conn.close()

    async def __aenter__(self) -> Subscriber:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- items and checkpoints: the low-level driver, also used by the sync facade ------------

    async def next_item(self) -> Item:
        """The next event or cursor mark, connecting and reconnecting as needed; unlike
        iteration, it does not mark anything handled: call `mark_handled` for that."""
        try:
            return await self._next_item()
        except SignalboxClientError:
            await self.close()
            raise

    async def mark_handled(self, item: Item) -> None:
        """``item`` (and everything before it) is handled: move the checkpoint and save it."""
        self._advance(item)
        await self._save()

    def _advance(self, item: Item) -> None:
        if isinstance(item, Restarted):
            self._checkpoint = Checkpoint(item.epoch, 0)
            return
        epoch = self._checkpoint.epoch if self._checkpoint else self._epoch
        current = self._checkpoint.position if self._checkpoint else 0
        self._checkpoint = Checkpoint(epoch, max(current, item.position))

    async def _save(self) -> None:
        async with self._save_lock:
            checkpoint = self._checkpoint
            if checkpoint is None or checkpoint == self._saved:
                return
            await self._store.save(checkpoint)
            self._saved = checkpoint
            if self._acks and checkpoint.epoch == self._epoch:
                self._ack_due = checkpoint.position

    @property
    def _acks(self) -> bool:
        return self._consumer is not None or self._group is not None

    # -- reading ---------------------------------------------------------------------------

    async def _next_item(self) -> Item:
        await self._load()
        while True:
            if self._closing.is_set():
                raise Closed
            if self._restart is not None:
                item, self._restart = self._restart, None
                return item
            if self._frames:
                found = await self._on_frame(self._frames.popleft())
                if found is not None:
                    return found
            elif self._conn is None:
                await self._connect()
            else:
                await self._receive(self._conn)

    async def _load(self) -> None:
        if self._loaded:
            return
        saved = await self._store.load()
        self._loaded = True
        if saved is not None:  # a stored checkpoint wins over the cursor given to start with
            self._cursor, self._epoch = saved.position, saved.epoch
            self._checkpoint = self._saved = saved

    async def _receive(self, conn: ClientConnection) -> None:
        silence = 2 * self._heartbeat if self._heartbeat else self._connect_timeout
        try:
            message = await asyncio.wait_for(conn.recv(), silence)
        except TimeoutError:
            await self._drop()  # nothing for 2 x heartbeat: the link is dead
            return
        except websockets.ConnectionClosed as closed:
            self._raise_if_fatal(closed)
            wait = self._error_frame.get("retry_after")  # 4429: this address is refused
            if isinstance(wait, int | float) and not isinstance(wait, bool):
                self._retry_after = float(wait)
            await self._drop()
            return
        if isinstance(message, bytes):
            raise ProtocolError("the server sent a binary frame", code="bad_frame")
        for line in message.split("\n"):
            try:
                frame = json.loads(line)
            except ValueError:
                raise ProtocolError(f"the server sent a frame that is not JSON: {line[:80]!r}",
                                    code="bad_frame") from None
            if not isinstance(frame, dict):
                raise ProtocolError("the server sent a frame that is not an object",
                                    code="bad_frame")
            self._frames.append(frame)

    async def _on_frame(self, frame: dict[str, Any]) -> Item | None:
        op = frame.get("op")
        if op == "event":
            event = Event.from_json(frame)
            if self._cursor is not None and event.position <= self._cursor:
                return None  # already handed out: the protocol forbids this; stay safe
            self._cursor = event.position
            return event
        if op == "live":
            position = frame.get("position")
            self._state = SubscriberState.LIVE
            if isinstance(position, int) and position > (self._cursor or 0):
                self._cursor = position
            return Covered(self._cursor or 0)
        if op == "ping" and self._conn is not None:
            await self._send(self._conn, PONG)
        elif op == "welcome":
            await self._on_welcome(frame)
        elif op == "error":
            self._error_frame = frame
        return None  # pong, status answers and ops of newer servers

    async def _on_welcome(self, frame: dict[str, Any]) -> None:
        epoch, cursor, heartbeat = frame.get("epoch"), frame.get("cursor"), frame.get("heartbeat")
        if (not isinstance(epoch, str) or not isinstance(cursor, int)
                or not isinstance(heartbeat, int | float) or heartbeat <= 0):
            raise ProtocolError(f"malformed welcome: {frame}", code="bad_frame")
        if self._epoch is not None and epoch != self._epoch:
            self._epoch_changed(epoch, "the server welcomed us into another log")
        if self._cursor is not None and cursor != self._cursor:
            raise ProtocolError(f"asked to resume after {self._cursor}, the server offers "
                                f"{cursor}: events would be lost or repeated", code="bad_frame")
        self._epoch, self._cursor, self._heartbeat = epoch, cursor, float(heartbeat)
        self._failures = 0
        self.connections += 1
        self._state = SubscriberState.REPLAYING
        if self._checkpoint is None or self._checkpoint.epoch is None:
            # The first anchor: a live-only start must resume here after a restart.
            position = cursor if self._checkpoint is None else self._checkpoint.position
            self._checkpoint = Checkpoint(epoch, position)
            await self._save()
        if self._conn is not None:
            self._keepalive = asyncio.create_task(self._keep_alive(self._conn, heartbeat))

    # -- connecting and closing --------------------------------------------------------------

    def _hello(self) -> dict[str, Any]:
        hello: dict[str, Any] = {"op": "hello", "token": self._token, "cursor": self._cursor,
                                 "epoch": self._epoch, "filter": self._filter.to_json(),
                                 "batch": self._batch}
        if self._group is not None:
            hello["group"] = {"name": self._group.name, "member": self._group.member,
                              "size": self._group.size}
        else:
            hello["consumer"] = self._consumer
        return hello

    async def _connect(self) -> None:
        if self._failures:  # 1 after a lost link, more after failed attempts
            await self._pause(self._reconnect_delay())
        self._error_frame = {}
        try:
            conn = await websockets.connect(
                self.url, ping_interval=None, open_timeout=self._connect_timeout,
                close_timeout=2, max_size=MAX_MESSAGE)
        except websockets.InvalidStatus as exc:
            self._raise_for_upgrade(exc.response.status_code)
            headers = exc.response.headers
            self._retry_after = retry_after_seconds(headers.get("Retry-After"),
                                                    headers.get("Date"))
            self._failures += 1
            return
        except (OSError, TimeoutError, websockets.InvalidHandshake):
            self._failures += 1
            return
        if self._closing.is_set():  # closed while dialling
            await conn.close()
            raise Closed
        self._conn = conn
        await self._send(conn, json.dumps(self._hello()))

    def _reconnect_delay(self) -> float:
        """The backoff's delay, or the wait the server asked for (a 4429 close's
        ``retry_after``, an upgrade refused with ``Retry-After``) when that is longer, up to
        the backoff's cap: dialling again sooner would only be refused again."""
        delay = self._backoff.delay(self._failures - 1)
        asked, self._retry_after = self._retry_after, None
        if asked is not None:
            delay = max(delay, min(asked, self._backoff.cap))
        return delay

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)
        if self._closing.is_set():
            raise Closed

    async def _drop(self) -> None:
        """Forget a dead or closed link; the next read reconnects."""
        conn, self._conn = self._conn, None
        self._stop_keepalive()
        self._heartbeat = None
        if self._closing.is_set():
            raise Closed
        self._failures += 1
        self._state = SubscriberState.RECONNECTING
        if conn is not None:
            conn.transport.abort()

    def _raise_if_fatal(self, closed: websockets.ConnectionClosed) -> None:
        """Errors that a reconnect cannot fix; every other close reconnects."""
        if self._closing.is_set():
            raise Closed
        frame = self._error_frame
        code = closed.rcvd.code if closed.rcvd else frame.get("code", 1006)
        message = str(frame.get("message") or (closed.rcvd.reason if closed.rcvd else "")
                      or f"closed with {code}")
        if code == 4401:
            raise Unauthorized(message, code="unauthorized", status=code)
        if code == 4403:
            raise Forbidden(message, code="forbidden", status=code)
        if code == 4400:
            raise ProtocolError(message, code="malformed", status=code)
        if code == 4409:
            epoch = frame.get("epoch")
            if isinstance(epoch, str) and self._epoch is not None and epoch != self._epoch:
                self._epoch_changed(epoch, message)
                return
            raise Conflict(message, code="cursor_ahead", status=code)

    def _raise_for_upgrade(self, status: int) -> None:
        if status == 401:
            raise Unauthorized("the upgrade was refused with 401", code="unauthorized",
                               status=status)
        if status == 403:
            raise Forbidden("the upgrade was refused with 403", code="forbidden", status=status)

    def _epoch_changed(self, epoch: str, message: str) -> None:
        if self._on_epoch_change == "raise":
            raise EpochChanged(self._epoch, epoch, message)
        self._epoch, self._cursor = epoch, 0
        self._restart = Restarted(epoch)
        self._failures = 0

    # -- writing ---------------------------------------------------------------------------

    async def _send(self, conn: ClientConnection, text: str) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await conn.send(text)
            self._last_sent = time.monotonic()

    async def _send_ack(self, conn: ClientConnection) -> None:
        due = self._ack_due
        if due is not None and due != self._ack_sent:
            await self._send(conn, json.dumps({"op": "ack", "position": due}))
            self._ack_sent, self._last_ack = due, time.monotonic()

    async def _keep_alive(self, conn: ClientConnection, heartbeat: float) -> None:
        """Acks (at most one per ack_interval) and, while the caller is busy with an event and
        nobody reads pings, a pong every heartbeat, so the server never finds us silent."""
        tick = min(self._ack_interval, heartbeat / 2) if self._acks else heartbeat / 2
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if self._ack_due != self._ack_sent and now - self._last_ack >= self._ack_interval:
                await self._send_ack(conn)
            elif time.monotonic() - self._last_sent >= heartbeat:
                await self._send(conn, PONG)

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
