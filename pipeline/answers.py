"""Answers that the HTTP layer writes by itself, outside the application.

uvicorn answers a request its parser refuses (400) and a server at ``limit_concurrency`` (503)
in plain text: no error code, no security headers. The protocol of :mod:`pipeline.slowclients`
writes these answers as the application would: JSON ``{"error": code, "message": …}`` with
the security headers of :mod:`pipeline.headers`, an ``X-Request-Id``, no ``Server`` banner,
and ``Retry-After`` on a 503. Each such answer closes its connection.
"""

from __future__ import annotations

import email.utils
import json
from dataclasses import dataclass
from http import HTTPStatus

from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.context import RequestIdMiddleware, new_request_id
from pipeline.headers import ERROR_HEADERS, HSTS


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
