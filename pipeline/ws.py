"""The WebSocket endpoint ``/ws``: hello, welcome, replay from the cursor, live, heartbeats.

A connection is two tasks: the *sender* pages events after the connection's cursor (from the
hub's window or the log, reading the next page while it sends this one) and goes live once it
has caught up; the connection's own task reads the client's frames. One watcher for all
connections (:class:`Connections`) pings them, closes silent clients and says goodbye at
shutdown. A send blocks while the client does not read (TCP back-pressure), which stalls only
this connection's cursor: nothing is queued for it, so a slow reader costs no more memory than
the page it is being sent and the one read ahead, each bounded in bytes when read from the log
(:data:`pipeline.hub.PAGE_BYTES`). The client's frames are read by :mod:`pipeline.wsframes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.types import Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from pipeline.auth import Scope, Token, TokenStore, bearer_token, hash_secret
from pipeline.budget import FrameBudget
from pipeline.errors import BadRequest, LogUnavailable, NotFound, SignalboxError, TooManyRequests
from pipeline.guard import Guard
from pipeline.hub import Frames, Hub
from pipeline.instruments import PAGED_EVENTS, WEBSOCKET_CLOSES
from pipeline.log import EventLog
from pipeline.log.backends import DATABASE_ERRORS
from pipeline.processing.consumers import acknowledge, stored_position
from pipeline.processing.status import StatusReport, report_status
from pipeline.tasks import cancel_all
from pipeline.wsframes import CloseCode, Closing, Hello, decode_frame, is_int, parse_hello
from pipeline.wsprotocol import ABORT, SEND_MANY

log = logging.getLogger("signalbox.ws")

MAX_BATCH_BYTES = 1 << 20
LOOKS_PER_BEAT = 4  # how often per heartbeat the watcher looks for silent clients
CLOSE_TIMEOUT = 5.0  # seconds to write the error frame and the close; then the link is dropped
UNAVAILABLE: tuple[type[Exception], ...] = (LogUnavailable, *DATABASE_ERRORS)  # closed 1013
MAX_SIGNAL_ID = 36  # a signal's id is a UUID: a longer one is no signal's


@dataclass(frozen=True)
class StreamSettings:
    heartbeat: float
    hello_timeout: float
    max_message: int
    frame_rate: float = 2000.0  # frames a client may send per second, and at once


class Connections:
    """The open connections of this process, and the one task that watches them all.

    Every heartbeat interval the watcher pings each session; four times as often it closes
    those whose client has been silent for two intervals, so that one is closed within a
    quarter of an interval of that, not up to a whole one late. At shutdown it closes every
    session with 1001. One timer for all instead of one per connection keeps an idle
    subscriber cheap.
    """

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.open = 0
        self.sessions: set[Session] = set()
        self.tokens: TokenStore | None = None  # set when serving: tokens are checked again
        self._chores: set[asyncio.Task[None]] = set()
        self._rechecking = False

    async def watch(self, interval: float) -> None:
        for look in itertools.count(1):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval / LOOKS_PER_BEAT):
                    await self.stopping.wait()
                    for session in list(self.sessions):
                        session.end(Closing(CloseCode.GOING_AWAY,
                                            "the server is shutting down: reconnect shortly"))
                    return
            now = time.monotonic()
            beat = look % LOOKS_PER_BEAT == 0
            for session in list(self.sessions):
                session.look(now, interval, ping=beat)
            if beat and self.tokens is not None and not self._rechecking:
                self._rechecking = True
                self.spawn(self._recheck_tokens(self.tokens))

    async def _recheck_tokens(self, tokens: TokenStore) -> None:
        """Close the sessions whose token was revoked or has expired since their hello: one
        database lookup per heartbeat for all the distinct tokens in use."""
        try:
            sessions = [s for s in self.sessions if s.token_digest is not None]
            if not sessions:
                return
            valid = await tokens.still_valid(s.token_digest for s in sessions
                                             if s.token_digest is not None)
            for session in sessions:
                if session.token_digest not in valid:
                    session.end(Closing(CloseCode.UNAUTHORIZED,
                                        "the token was revoked or has expired: reconnect with "
                                        "a valid one"))
        except Exception:  # the database is away: check again at the next heartbeat
            log.warning("could not check the tokens of open connections", exc_info=True)
        finally:
            self._rechecking = False

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a short chore (a ping, a close) without waiting for it."""
        task = asyncio.create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)


class Session:
    """One client connection."""

    def __init__(self, websocket: WebSocket, *, event_log: EventLog, hub: Hub,
                 token_store: TokenStore, connections: Connections,
                 settings: StreamSettings, page_size: int, send: Send | None = None) -> None:
        self.ws = websocket
        # The ASGI send, when the server takes a page of messages at once (SEND_MANY), and
        # when it can drop a connection whose socket stays full (ABORT).
        extensions = websocket.scope.get("extensions", {})
        self._send_many = send if SEND_MANY in extensions else None
        self._send_abort = send if ABORT in extensions else None
        self._stream_task: asyncio.Task[None] | None = None
        self.log = event_log
        self.hub = hub
        self.tokens = token_store
        self.connections = connections
        self.settings = settings
        self.page_size = page_size
        self.last_heard = time.monotonic()
        self.budget = FrameBudget(settings.frame_rate, self.last_heard)
        self._send_lock = asyncio.Lock()
        self._ending = False
        self.token: Token | None = None
        self.token_digest: str | None = None
        self.consumer: str | None = None
        self.cursor = 0  # how far the stream has delivered (for /metrics: paging or not)
        self.live = False
        self.close_code: int | None = None

    async def run(self) -> None:
        await self.ws.accept()
        self.connections.open += 1
        try:
            await self._ending_with(self._serve())
        finally:
            self.connections.open -= 1
            WEBSOCKET_CLOSES.inc(str(self.close_code or 1006))

    async def _serve(self) -> None:
        hello = await self._receive_hello()
        cursor = await self._authorize(hello)
        await self._send_text(json.dumps({
            "op": "welcome", "epoch": self.log.epoch, "head": self.hub.head,
            "cursor": cursor, "heartbeat": self.settings.heartbeat,
        }))
        # The stream runs beside the receive loop; whoever ends first closes the connection,
        # and the receive loop ends when the connection does.
        stream = asyncio.create_task(self._ending_with(self._stream(cursor, hello)))
        self._stream_task = stream
        self.connections.sessions.add(self)
        try:
            await self._receive_loop()
        finally:
            self.connections.sessions.discard(self)
            await cancel_all(stream)
            self._stream_task = None  # the task holds the session: no cycle left behind

    async def _ending_with(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work``; however it ends, end the connection the way the protocol says."""
        try:
            await work
        except Closing as closing:
            await self._close(closing.code, closing.message, **closing.extra)
        except WebSocketDisconnect:
            pass
        except UNAVAILABLE as exc:
            # As HTTP's 503: the database is away (a read, a commit, a token's lookup), which
            # is nothing the client did and will pass.
            log.warning("websocket session ended, the log is unavailable: %r", exc)
            await self._close(CloseCode.OVERLOADED,
                              "the log is unavailable right now: reconnect later")
        except Exception:
            log.exception("websocket session failed")
            await self._close(CloseCode.INTERNAL_ERROR, "internal error: reconnect")

    def look(self, now: float, interval: float, *, ping: bool) -> None:
        """The watcher's visit: close a client silent for two intervals, else ping it if it
        is time to."""
        silent = now - self.last_heard
        if silent > 2 * interval:
            self.end(Closing(CloseCode.TIMEOUT,
                             f"no frame from the client for {silent:.0f} s: answer pings "
                             'with {"op": "pong"}'))
        elif ping and not self._send_lock.locked():  # a blocked sender already keeps the link busy
            self.connections.spawn(self._send_quietly(f'{{"op":"ping","head":{self.hub.head}}}'))

    def end(self, closing: Closing) -> None:
        if not self._ending:
            self._ending = True
            self.connections.spawn(self._close(closing.code, closing.message, **closing.extra))

    async def _send_quietly(self, text: str) -> None:
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
            await self._send_text(text)

    async def _receive_hello(self) -> Hello:
        try:
            text = await asyncio.wait_for(self._receive_text(), self.settings.hello_timeout)
        except TimeoutError:
            raise Closing(CloseCode.TIMEOUT,
                          f"no hello within {self.settings.hello_timeout:g} s") from None
        return parse_hello(text)

    async def _authorize(self, hello: Hello) -> int:
        secret = hello.token or bearer_token(self.ws.headers)
        guard: Guard = self.ws.app.state.guard
        try:
            token = await guard.authenticate(self.tokens, secret, guard.address(self.ws.scope))
            token.require(Scope.READ)
        except LogUnavailable:
            raise  # not the client's token: closed 1013 as everywhere (_ending_with)
        except SignalboxError as exc:
            codes = {401: CloseCode.UNAUTHORIZED, 403: CloseCode.FORBIDDEN,
                     429: CloseCode.TOO_MANY_REQUESTS}
            extra = {"retry_after": exc.retry_after} if isinstance(exc, TooManyRequests) else {}
            raise Closing(codes.get(exc.status, CloseCode.OVERLOADED), exc.message,
                          **extra) from None
        self.token = token
        self.token_digest = hash_secret(secret) if secret else None
        self.consumer = hello.consumer
        if hello.epoch is not None and hello.epoch != self.log.epoch:
            raise Closing(CloseCode.CONFLICT,
                          "epoch mismatch: this log was created anew; the cursor belongs to "
                          "another log. Start again from cursor 0 with the new epoch",
                          epoch=self.log.epoch)
        if hello.cursor is None and hello.consumer is not None:
            # A consumer resumes after its last ack; one never seen before starts live, so
            # that a new bot does not act on every signal of the past.
            stored = await stored_position(self.log.engines.reader, hello.consumer)
            return self.hub.head if stored is None else stored
        if hello.cursor is None:
            return self.hub.head
        if hello.cursor > self.hub.head and hello.cursor > await self.log.head():
            raise Closing(CloseCode.CONFLICT,
                          f"cursor {hello.cursor} is ahead of the head of the log "
                          f"({self.hub.head}): it belongs to another log or epoch",
                          epoch=self.log.epoch, head=self.hub.head)
        return hello.cursor

    async def _stream(self, cursor: int, hello: Hello) -> None:
        replaying = True
        self.cursor = cursor
        ahead: asyncio.Task[Frames] | None = None  # the next page, read while this one is sent
        try:
            while True:
                changed = self.hub.changed
                if ahead is None:
                    page = await self.hub.frames(cursor, hello.filter, self.page_size)
                else:
                    page, ahead = await ahead, None
                cursor = max(cursor, page.covered)
                if page.frames and cursor < self.hub.head:
                    ahead = asyncio.create_task(
                        self.hub.frames(cursor, hello.filter, self.page_size))
                if page.frames:
                    if page.from_log:
                        PAGED_EVENTS.inc(amount=len(page.frames))
                    await self._send_events(page.frames, hello.batch)
                self.cursor = cursor  # delivered: a reader stalled in a send keeps its place
                if cursor < self.hub.head:
                    continue
                if replaying:
                    replaying, self.live = False, True
                    await self._send_text(f'{{"op":"live","position":{cursor}}}')
                await changed.wait()
        finally:
            await cancel_all(ahead)

    async def _send_events(self, frames: Sequence[str], batch: bool) -> None:
        if not batch:
            async with self._send_lock:  # once per page, not once per frame
                await self._send_each(frames)
            return
        chunk: list[str] = []
        size = 0
        for frame in frames:
            if chunk and size + len(frame) > MAX_BATCH_BYTES:
                await self._send_text("\n".join(chunk))
                chunk, size = [], 0
            chunk.append(frame)
            size += len(frame) + 1
        if chunk:
            await self._send_text("\n".join(chunk))

    async def _send_each(self, texts: Sequence[str]) -> None:
        """Each text a message of its own; in one ASGI message when the server can."""
        if self._send_many is None:
            for text in texts:
                await self.ws.send_text(text)
            return
        try:
            await self._send_many({"type": SEND_MANY, "texts": texts})
        except OSError:  # as Starlette's send: the client has gone
            raise WebSocketDisconnect(1006) from None

    async def _receive_loop(self) -> None:
        while True:
            frame = decode_frame(await self._receive_text())
            self.last_heard = time.monotonic()
            if not self.budget.take(self.last_heard):
                raise Closing(CloseCode.POLICY_VIOLATION,
                              f"more than {self.settings.frame_rate:g} frames a second: "
                              "send pongs, acks and reports only as the protocol needs them")
            op = frame["op"]
            if op == "pong":
                continue
            if op == "ping":
                await self._send_text('{"op":"pong"}')
            elif op == "ack":
                await self._ack(frame)
            elif op == "status":
                await self._status(frame)
            elif op == "hello":
                raise Closing(CloseCode.MALFORMED, "hello was already received")
            else:
                raise Closing(CloseCode.MALFORMED,
                              f"unknown op {op!r}: clients send hello, ack and pong")

    async def _ack(self, frame: dict[str, Any]) -> None:
        position = frame.get("position")
        if not is_int(position) or position < 0:
            raise Closing(CloseCode.MALFORMED, "ack needs a position (integer >= 0)")
        if self.consumer is None:
            raise Closing(CloseCode.MALFORMED,
                          "ack needs a consumer: name one in hello to have positions stored")
        if position > self.hub.head and position > await self.log.head():
            raise Closing(CloseCode.MALFORMED, f"ack of {position}, beyond the head of the log")
        await acknowledge(self.log, self.consumer, position)

    async def _status(self, frame: dict[str, Any]) -> None:
        """A status report over the socket; answered, never closing the connection."""
        ref = frame.get("ref")
        signal_id = frame.get("signal_id")
        try:
            if not isinstance(signal_id, str) or not signal_id:
                raise BadRequest("status needs a signal_id")
            # Answered as over HTTP, before the database, which may refuse such text (NUL, on
            # PostgreSQL) or be asked to look up an id as long as the frame.
            if "\x00" in signal_id:
                raise BadRequest("the signal_id holds a NUL character, which no id can "
                                 "contain: remove it")
            if len(signal_id) > MAX_SIGNAL_ID:
                raise NotFound(f"no signal has an id of {len(signal_id)} characters: check "
                               "the id you were given")
            assert self.token is not None
            self.token.require(Scope.REPORT)
            report = StatusReport.parse(
                signal_id, {**frame, "consumer": frame.get("consumer") or self.consumer})
            outcome = await report_status(self.log, report, self.token.name)
        except SignalboxError as exc:
            await self._send_text(json.dumps({
                "op": "status_error", "ref": ref, "signal_id": signal_id, "error": exc.code,
                "message": exc.message,
            }))
            return
        await self._send_text(json.dumps({"op": "status_ok", "ref": ref, **outcome.to_body()}))

    async def _receive_text(self) -> str:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            # The client's close code, as received (a send that failed says nothing of it).
            self.close_code = self.close_code or int(message.get("code", 1005))
            raise WebSocketDisconnect(message.get("code", 1000))
        text = message.get("text")
        if text is None:
            raise Closing(CloseCode.MALFORMED, "binary frames are not part of the protocol: "
                                               "send JSON text frames")
        limit = self.settings.max_message
        # The limit is in bytes of UTF-8, as received (a character takes up to 4); only a
        # text that could be over it is encoded to count them.
        if len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit:
            raise Closing(CloseCode.MALFORMED,
                          f"message over {limit} bytes: send smaller frames")
        return str(text)

    async def _send_text(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send_text(text)

    async def _close(self, code: CloseCode, message: str, **extra: Any) -> None:
        self.close_code = self.close_code or int(code)
        frame = json.dumps({"op": "error", "code": int(code), "message": message, **extra})
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                with contextlib.suppress(Exception):  # the client may be gone: close all the same
                    await self._send_text(frame)
                await self.ws.close(int(code), close_reason(message))
        except TimeoutError:
            await self._abort()
        except Exception:  # the connection had ended already
            pass

    async def _abort(self) -> None:
        """Drop a connection that cannot be closed: a client that reads nothing leaves its
        socket full, so the stream waits for ever to write, and so would the close frame and
        the close of the socket (which waits for the buffer to drain). Its session, pages and
        socket are let go at once; the receive loop ends on the disconnect that follows."""
        if self._stream_task is not None and self._stream_task is not asyncio.current_task():
            self._stream_task.cancel()
        if self._send_abort is not None:
            with contextlib.suppress(Exception):
                await self._send_abort({"type": ABORT})


def close_reason(message: str) -> str:
    """``message`` cut to the 123 bytes of UTF-8 a close frame has room for (RFC 6455, 5.5),
    between two characters: the error frame before it carries the whole message."""
    return message.encode(errors="replace")[:123].decode(errors="ignore")
