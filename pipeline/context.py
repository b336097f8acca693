"""What the code running for one HTTP request knows about it without being told: its id.

The request-id middleware (:mod:`pipeline.logs`) sets it; log lines and the events that the
request appends (``meta.request_id``) read it. Each request runs in a task of its own, so the
value never leaks from one request into another.
"""

from __future__ import annotations

from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("signalbox_request_id", default=None)
