"""Answers that the HTTP layer writes by itself, outside the application.

uvicorn answers a request its parser refuses (400) and a server at ``limit_concurrency`` (503)
in plain text, and the WebSocket layer (websockets, under uvicorn) answers the upgrades it
refuses (400, 403, 405, 414, 426, 431, 500) the same way: no error code, no security headers. The
protocols of :mod:`pipeline.slowclients` and :class:`WebSocketProtocol` below write these
answers as the application would: JSON ``{"error": code, "message": …}`` with the security
headers of :mod:`pipeline.headers`, an ``X-Request-Id``, no ``Server`` banner, and
``Retry-After`` on a 503. Each such answer closes its connection.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from websockets.datastructures import Headers
from websockets.http11 import Response
from websockets.server import ServerProtocol

from pipeline.context import RequestIdMiddleware, new_request_id
from pipeline.headers import ERROR_HEADERS, HSTS
from pipeline.wsprotocol import ServerWebSocketProtocol


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    retry_after: int | None = None

    def body(self) -> bytes:
        return json.dumps({"error": self.code, "message": self.message},
                          separators=(",", ":")).encode()


MALFORMED = Refusal(
    400, "malformed_request",
    "the request is not valid HTTP/1.1 (its request line, a header or a chunked body): fix "
    "the client that sent it")
BUSY = Refusal(
    503, "server_busy",
    "the server is serving as many connections and requests as it may at once "
    "(SIGNALBOX_LIMIT_CONCURRENCY): retry in Retry-After seconds", retry_after=1)

# The WebSocket layer's refusals, by status: websockets says why in plain text.
UPGRADE_CODES = {
    400: ("bad_websocket_upgrade", "open /ws with a WebSocket client (RFC 6455, version 13)"),
    403: ("forbidden", "the stream is at /ws: open it with a WebSocket client"),
    405: ("method_not_allowed", "a WebSocket upgrade is a GET request"),
    414: ("url_too_long", "send a shorter URL"),
    426: ("upgrade_required", "open /ws with a WebSocket client"),
    431: ("headers_too_large", "send fewer or shorter headers"),
    500: ("internal_error", "an internal error occurred: connect again"),
}


def answer_headers(refusal: Refusal, *, behind_tls: bool) -> list[tuple[str, str]]:
    """Every header of the answer but ``Date`` (which uvicorn and websockets add)."""
    headers = [("Content-Type", "application/json"),
               ("Content-Length", str(len(refusal.body()))), ("Connection", "close")]
    if refusal.retry_after is not None:
        headers.append(("Retry-After", str(refusal.retry_after)))
    return headers + security_headers(behind_tls)


def security_headers(behind_tls: bool) -> list[tuple[str, str]]:
    """What the application's middleware puts on its answers (pipeline.headers)."""
    found = [*ERROR_HEADERS.items(), ("X-Request-Id", new_request_id())]
    if behind_tls:
        found.append(("Strict-Transport-Security", HSTS))
    return found


def http_answer(refusal: Refusal, *, behind_tls: bool) -> bytes:
    """The whole answer, as written on a connection about to be closed."""
    lines = [f"HTTP/1.1 {refusal.status} {HTTPStatus(refusal.status).phrase}",
             f"Date: {email.utils.formatdate(usegmt=True)}",
             *(f"{name}: {value}" for name, value in answer_headers(refusal,
                                                                     behind_tls=behind_tls))]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + refusal.body()


def asgi_answer(refusal: Refusal, *, behind_tls: bool) -> ASGIApp:
    """An ASGI application that answers every request with ``refusal`` (and its id)."""
    headers = [(name.lower().encode(), value.encode())
               for name, value in answer_headers(refusal, behind_tls=behind_tls)
               if name != "X-Request-Id"]

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": refusal.status,
                    "headers": headers})
        await send({"type": "http.response.body", "body": refusal.body()})

    return RequestIdMiddleware(answer)


# -- the WebSocket upgrade ----------------------------------------------------------------


class RefusingServerProtocol(ServerProtocol):
    """websockets' handshake, whose every answer but the 101 is written as the application's:
    every refusal of the WebSocket layer, and the application's own (an Origin not allowed)
    passes through `send_response`."""

    behind_tls = False

    def send_response(self, response: Response) -> None:
        if response.status_code != 101:
            response = self._as_json(response)
        super().send_response(response)

    def _as_json(self, response: Response) -> Response:
        status = response.status_code
        if response.headers.get("Content-Type", "").startswith("application/json"):
            body = bytes(response.body)  # the application's: its code and message stand
        else:
            code, advice = UPGRADE_CODES.get(status, (f"http_{status}", "connect again"))
            body = Refusal(status, code, _reason(response) + advice).body()
        headers = Headers(
            [(name, value) for name, value in response.headers.raw_items()
             if name.lower() in ("date", "allow", "upgrade", "retry-after")])
        headers.update([("Content-Type", "application/json"),
                        ("Content-Length", str(len(body))), ("Connection", "close"),
                        *security_headers(self.behind_tls)])
        return Response(status, response.reason_phrase, headers, body)


def _reason(response: Response) -> str:
    """What websockets said was wrong with a request ("invalid Sec-WebSocket-Version header:
    8"), to go before the advice; nothing for a 5xx, which is no fault of the request."""
    if response.status_code >= 500:
        return ""
    said = bytes(response.body).decode(errors="replace").split("\n", 1)[0]
    said = said.removeprefix("Failed to open a WebSocket connection").strip(" :.")
    return f"{said}; " if said else ""


class WebSocketProtocol(ServerWebSocketProtocol):
    """uvicorn's WebSocket protocol over websockets, with `RefusingServerProtocol`, and with
    the answers websockets makes while it parses the upgrade (a line or a header over its
    own limits) actually sent: uvicorn sends answers only for requests it has been given, so
    the client of such a request was left waiting on an open connection."""

    behind_tls = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        given = self.conn
        conn = RefusingServerProtocol(extensions=given.available_extensions,
                                      max_size=self.config.ws_max_size, logger=given.logger)
        conn.behind_tls = self.behind_tls
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()


def websocket_protocol(*, behind_tls: bool) -> type[asyncio.Protocol]:
    """The protocol class for uvicorn's ``ws`` option."""
    return type("SignalboxWebSocketProtocol", (WebSocketProtocol,), {"behind_tls": behind_tls})
