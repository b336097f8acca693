"""What the code serving one HTTP request knows about it without being told: its id, and
whether its client is still there.

Every HTTP request gets an id: the client's ``X-Request-Id`` when it is a sensible one (1-128
letters, digits and ``. _ : - + = / @``), otherwise a new random one. The id is echoed in the
response's ``X-Request-Id``, attached to the log lines written while the request is served
(:mod:`pipeline.logs`), and recorded as ``meta.request_id`` in the events the request appends
(:class:`pipeline.log.store.Transaction`), so one id leads from a client's retry to the
server's log and to the log of events. Each request runs in a task of its own, so the value
never leaks from one request into another.

Whether the client has gone (closed its connection: a sender that gave up waiting) is asked
of the connection itself, which the server's protocol puts in the request's scope
(:mod:`pipeline.slowclients`): the log drops a unit whose caller it answers "not recorded"
only if the caller can hear it (:meth:`pipeline.log.store.EventLog.transact`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID: ContextVar[str | None] = ContextVar("signalbox_request_id", default=None)
# Whether the request's client has closed its connection; None outside an HTTP request.
CLIENT_GONE: ContextVar[Callable[[], bool] | None] = ContextVar("signalbox_client_gone",
                                                                default=None)
CLIENT_GONE_KEY = "signalbox.client_gone"  # in the scope: the connection's ``is_closing``
HEADER = b"x-request-id"
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-+=/@]{1,128}")


def new_request_id() -> str:
    return os.urandom(12).hex()


def incoming_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == HEADER:
            text = value.decode("latin-1")
            return text if VALID_REQUEST_ID.fullmatch(text) else None
    return None


NUL_IN_URL = (b'{"error":"bad_request","message":"the URL holds a NUL character '
              b'(%00), which no name, id or filter value can contain: remove it"}')


class RequestIdMiddleware:
    """Gives each HTTP request its id and its client's presence (see the module's docstring);
    WebSockets pass through.

    The id stays set for the rest of the request's task (it is not reset on the way out), so
    that the error handlers outside this middleware still log it. A URL with a NUL character
    is refused here, on every route: no id, name or filter value holds one, and PostgreSQL
    cannot even compare text with it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = incoming_request_id(scope["headers"]) or new_request_id()
        REQUEST_ID.set(request_id)
        CLIENT_GONE.set(scope.get(CLIENT_GONE_KEY))
        header = (HEADER, request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        if "\x00" in scope["path"] or b"%00" in scope["query_string"]:
            await send_with_id({"type": "http.response.start", "status": 400, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(NUL_IN_URL)).encode())]})
            await send_with_id({"type": "http.response.body", "body": NUL_IN_URL})
            return
        await self.app(scope, receive, send_with_id)
