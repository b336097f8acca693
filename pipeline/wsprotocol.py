"""The WebSocket protocol of the server: uvicorn's, over the sans-I/O ``websockets``, made to
let go of a connection as soon as the connection is lost.

``websockets``' protocol object parses what arrives with a generator that refers back to it
(and an error that ended a parse keeps that generator's frames in its traceback), so the
protocol of an ended connection is a reference cycle, holding what the connection held: its
handshake's headers, its buffers and, when the client negotiated permessage-deflate
(``websockets`` clients and browsers offer it), a zlib compressor and decompressor, some 30 KiB
of C memory. Only the cyclic garbage collector frees a cycle, and this server runs it seldom
(:func:`pipeline.serving.tune_garbage_collector`), never while idle: in a disconnect storm the
server grew by some 135 MiB every 2,000 connections, and kept it after they had gone until a
``gc.collect()`` freed it. Closing the generator (and clearing the frames of its error) when
the connection is lost breaks the cycle: reference counting frees the connection at once, as it
does the rest of its session. The HTTP protocol that hands a connection over to this one is
released likewise (:mod:`pipeline.slowclients`).

It also takes a page of events in one ASGI message (:data:`SEND_MANY`, offered in the scope's
``extensions``): each text is still a WebSocket message of its own, but the page costs one trip
through the ASGI layers and one write per 64 KiB instead of one of each per event, and on a
connection without permessage-deflate the frames are built here, a two-byte header for most.
Between writes it waits for the transport's flow control as uvicorn's ``send`` does, so a
client that does not read still holds at most one chunk beyond the transport's high-water mark.

Such a client cannot be closed politely: neither an error frame nor a close frame gets through
a socket it leaves full, and ``transport.close()`` waits for the buffer to drain, for ever. The
session drops it with :data:`ABORT` when its close cannot be written in time, and the close
timer (the client did not answer a close within ``close_timeout``) aborts the transport
instead of closing it, so that the socket and everything it holds are let go.
"""

from __future__ import annotations

import struct
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, cast

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

SEND_MANY = "signalbox.websocket.send_many"  # {"type": SEND_MANY, "texts": [str, ...]}
ABORT = "signalbox.websocket.abort"  # {"type": ABORT}: drop the connection, unsent data too
FLUSH_BYTES = 64 * 1024


class ServerWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, releasing ended connections and offering
    :data:`SEND_MANY` and :data:`ABORT`."""

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        release(self.conn)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:  # the application was given this scope
            self.scope["extensions"][SEND_MANY] = {}
            self.scope["extensions"][ABORT] = {}

    async def send(self, message: ASGISendEvent) -> None:
        kind: str = message["type"]
        if kind == ABORT:  # not after the writable wait: it is for a socket that stays full
            self.transport.abort()
            return
        if kind != SEND_MANY:
            await super().send(message)
            if kind == "websocket.close" and self.close_timer is not None:
                # uvicorn's timer would close, and a close waits for the buffer to drain.
                self.close_timer.cancel()
                self.close_timer = self.loop.call_later(self.close_timeout,
                                                        self.transport.abort)
            return
        texts: Sequence[str] = cast(Mapping[str, Any], message)["texts"]
        plain = not self.conn.extensions
        chunk: list[bytes] = []
        size = 0
        for text in texts:
            data = text.encode()
            if plain:
                chunk += (text_frame_header(len(data)), data)
            else:
                try:
                    self.conn.send_text(data)  # compressed, in order, by the extension
                except InvalidState:
                    raise ClientDisconnected() from None
                chunk += self.conn.data_to_send()
            size += len(data)
            if size >= FLUSH_BYTES:
                await self._write(chunk)
                chunk, size = [], 0
        if chunk:
            await self._write(chunk)

    async def _write(self, chunk: list[bytes]) -> None:
        await self.writable.wait()  # cleared while the transport is over its high-water mark
        if self.disconnected or self.close_sent or self.conn.state is not State.OPEN:
            raise ClientDisconnected()
        self.transport.write(b"".join(chunk))


def release(conn: ServerProtocol) -> None:
    """Break the cycles of an ended connection's protocol: nothing reads from it any more
    (uvicorn answers a send after the connection is lost with a disconnect)."""
    conn.parser.close()  # its frame refers to ``conn``; a closed generator has none
    for error in (conn.parser_exc, conn.handshake_exc):
        forget_frames(error)


def forget_frames(error: BaseException | None) -> None:
    """Drop the locals of the frames in ``error``'s traceback, and in those of its causes."""
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def text_frame_header(length: int) -> bytes:
    """An unmasked, final text frame's header (RFC 6455, section 5.2)."""
    if length < 126:
        return bytes((0x81, length))
    if length < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, length)
    return struct.pack("!BBQ", 0x81, 127, length)
