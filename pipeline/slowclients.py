"""The HTTP/1.1 protocol of the server, with limits on what a client may make it hold.

uvicorn's parser (httptools) keeps a connection open for as long as its client keeps sending
part of a request, and keeps every header it is sent: a client that sends its headers a byte
at a time (slowloris), or without end, ties up a connection and memory. This subclass gives
each request a deadline for its line and headers, counted from the connection's start (first
request) or from the request's first byte (later ones on a keep-alive connection), and a
limit on their size and number: past the deadline the connection is closed; over a limit it
is answered 431 and closed. Idle keep-alive connections are closed by uvicorn after
``timeout_keep_alive``; a slow body is bounded by the routes (``http.read_body``).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class HeaderLimits:
    size: int
    count: int
    timeout: float


class HeadersTooLarge(Exception):
    pass


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits = HeaderLimits(16 * 1024, 100, 10.0)

    _deadline: asyncio.TimerHandle | None = None
    _awaiting_headers = True
    _header_bytes = 0  # received while a request's headers are incomplete
    _header_lines = 0
    _header_size = 0  # of the line and headers parsed so far
    _too_large = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.limits.timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._too_large:
            return
        super().data_received(data)
        # The parser keeps an incomplete header until it ends: bound what it may keep.
        if not self._awaiting_headers or self.transport.is_closing():
            self._header_bytes = 0
            return
        self._header_bytes += len(data)
        if self._header_bytes > self.limits.size:
            self._too_large = True
            self.send_400_response("")

    def on_message_begin(self) -> None:
        self._awaiting_headers = True
        self._header_lines = self._header_size = 0
        self._arm()
        super().on_message_begin()

    def _count(self, size: int, lines: int) -> None:
        self._header_size += size
        self._header_lines += lines
        if self._header_size > self.limits.size or self._header_lines > self.limits.count:
            self._too_large = True
            raise HeadersTooLarge  # the parser stops; uvicorn answers through send_400_response

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._disarm()
        super().on_headers_complete()

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        # The connection is the WebSocket protocol's now, and this one is never told that it
        # ended (its connection_lost, which drops the parser, does not come): without this its
        # parser, whose callbacks point back at it, would hold it and the connection's
        # transport in a cycle until a full garbage collection.
        self.parser = None  # type: ignore[assignment]

    def send_400_response(self, msg: str) -> None:
        if not self._too_large:
            super().send_400_response(msg)
            return
        body = json.dumps({
            "error": "headers_too_large",
            "message": f"the request line and headers are over {self.limits.size} bytes or "
                       f"{self.limits.count} lines: send fewer or shorter headers",
        }).encode()
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()


def protocol_with(limits: HeaderLimits) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn's ``http`` option, with these limits."""
    return type("SignalboxHttpProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})
