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
"""

from __future__ import annotations

import traceback

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.server import ServerProtocol


class ReleasingWebSocketProtocol(WebSocketsSansIOProtocol):
    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        release(self.conn)


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
