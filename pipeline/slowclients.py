"""The HTTP/1.1 protocol of the server, with limits on what a client may make it hold.

uvicorn's parser (httptools) keeps a connection open for as long as its client keeps sending
part of a request, and keeps every header it is sent: a client that sends its headers a byte
at a time (slowloris), or without end, ties up a connection and memory. This subclass gives
each request a deadline for its line and headers, counted from the connection's start (first
request) or from the request's first byte (later ones on a keep-alive connection), and a
limit on their size and number: past the deadline the connection is closed; over a limit it
is answered 431 and closed. Idle keep-alive connections are closed by uvicorn after
``timeout_keep_alive``; a slow body is bounded by the routes (``http.read_body``).

It also holds the limit on connections and requests at once (``concurrency``), WebSocket
upgrades included, and writes every answer of its own (400, 431, 503) as the application
would: see :mod:`pipeline.answers`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pipeline.answers import BUSY, MALFORMED, Refusal, asgi_answer, http_answer
from pipeline.context import CLIENT_GONE_KEY


@dataclass(frozen=True)
class Limits:
    header_size: int
    header_count: int
    header_timeout: float
    concurrency: int | None = None  # connections and requests at once; more get 503


class Refused(Exception):
    """Stops the parser: the request is answered with the protocol's refusal."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits = Limits(16 * 1024, 100, 10.0)
    behind_tls = False

    _deadline: asyncio.TimerHandle | None = None
    _awaiting_headers = True
    _header_bytes = 0  # received while a request's headers are incomplete
    _header_lines = 0
    _header_size = 0  # of the line and headers parsed so far
    _refusal: Refusal | None = None  # once set, nothing more is read from the connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.limits.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return
        super().data_received(data)
        # The parser keeps an incomplete header until it ends: bound what it may keep.
        if not self._awaiting_headers or self.transport.is_closing():
            self._header_bytes = 0
            return
        self._header_bytes += len(data)
        if self._header_bytes > self.limits.header_size:
            self._refuse(self._headers_too_large())

    def on_message_begin(self) -> None:
        self._awaiting_headers = True
        self._header_lines = self._header_size = 0
        self._arm()
        super().on_message_begin()

    def _count(self, size: int, lines: int) -> None:
        self._header_size += size
        self._header_lines += lines
        if (self._header_size > self.limits.header_size
                or self._header_lines > self.limits.header_count):
            self._refusal = self._headers_too_large()
            raise Refused  # the parser stops; uvicorn answers through send_400_response

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 0)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._disarm()
        # uvicorn's own concurrency check (off: its limit is not given to it) answers in
        # plain text; the request's application is chosen here instead (an upgrade's, in
        # handle_websocket_upgrade).
        busy = self._at_capacity()
        if busy:
            self.logger.warning("over the concurrency limit: answered 503")
        self.app = (asgi_answer(BUSY, behind_tls=self.behind_tls) if busy
                    else self.config.loaded_app)
        # Whether the client is still there to be answered, for the application to ask.
        self.scope[CLIENT_GONE_KEY] = self.transport.is_closing  # type: ignore[literal-required]
        super().on_headers_complete()

    def _at_capacity(self) -> bool:
        """Whether N (the limit) other connections are open, or N other requests in flight.
        `connections` holds this request's own too: counted, a limit of 1 would refuse a
        lone client on an idle server."""
        limit = self.limits.concurrency
        return limit is not None and (len(self.connections) - 1 >= limit
                                      or len(self.tasks) >= limit)

    def handle_websocket_upgrade(self) -> None:
        if self._at_capacity():  # a subscriber holds a connection for long: it counts too
            self._refuse(BUSY)  # (on_headers_complete has logged it)
            return
        super().handle_websocket_upgrade()
        # The connection is the WebSocket protocol's now, and this one is never told that it
        # ended (its connection_lost, which drops the parser, does not come): without this its
        # parser, whose callbacks point back at it, would hold it and the connection's
        # transport in a cycle until a full garbage collection.
        self.parser = None  # type: ignore[assignment]

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request its parser refused (or that `_count` stopped)."""
        self._refuse(self._refusal or MALFORMED)

    def _refuse(self, refusal: Refusal) -> None:
        self._refusal = refusal
        self.transport.write(http_answer(refusal, behind_tls=self.behind_tls))
        self.transport.close()

    def _headers_too_large(self) -> Refusal:
        return Refusal(431, "headers_too_large",
                       f"the request line and headers are over {self.limits.header_size} "
                       f"bytes or {self.limits.header_count} lines: send fewer or shorter "
                       "headers")


def http_protocol(limits: Limits, *, behind_tls: bool) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn's ``http`` option, with these limits."""
    return type("SignalboxHttpProtocol", (LimitedHttpToolsProtocol,),
                {"limits": limits, "behind_tls": behind_tls})
