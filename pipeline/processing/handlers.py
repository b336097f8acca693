"""In-process handlers: ``async def handle(signal, context)``, run by the server itself.

A handler is named by configuration, ``SIGNALBOX_HANDLER``: either ``module:function`` or the
name of an entry point in the group ``signalbox.handlers`` (the built-ins ``log`` and
``forward`` are registered there). It receives each accepted signal once (see
:mod:`pipeline.processing.runner` for the guarantees) and returns a JSON-able result, or
raises: :class:`PermanentError` fails the signal at once, anything else is retried.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from pipeline.log import Event
from pipeline.signals import Signal

ENTRY_POINT_GROUP = "signalbox.handlers"
HANDLER_LOG = logging.getLogger("signalbox.handler")
SIGNATURE_HEADER = "X-Signalbox-Signature"


class PermanentError(Exception):
    """Raised by a handler for an error that retrying cannot fix: the signal fails at once."""


@dataclass(frozen=True)
class HandlerContext:
    signal_id: str
    event: Event  # the signal.accepted event
    attempt: int  # 1 for the first try
    options: Mapping[str, Any] = field(default_factory=dict)
    logger: logging.Logger = HANDLER_LOG


Handler = Callable[[Signal, HandlerContext], Awaitable[Any]]


def load_handler(spec: str) -> Handler:
    """The handler that ``spec`` names (``module:function`` or an entry point's name)."""
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load handler {spec!r}: {exc}") from exc
    else:
        found = [e for e in entry_points(group=ENTRY_POINT_GROUP) if e.name == spec]
        if not found:
            known = sorted(e.name for e in entry_points(group=ENTRY_POINT_GROUP))
            raise ValueError(f"no handler named {spec!r}: use module:function or one of {known}")
        target = found[0].load()
    if not callable(target):
        raise ValueError(f"handler {spec!r} is not callable")
    handler: Handler = target
    return handler


async def log_signal(signal: Signal, context: HandlerContext) -> dict[str, Any]:
    """Built-in ``log``: write the signal to the server's log and call it processed."""
    context.logger.info("signal %s: %s", context.signal_id, json.dumps(signal.to_data()))
    return {"logged": True}


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` + hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def forward(signal: Signal, context: HandlerContext) -> dict[str, Any]:
    """Built-in ``forward``: POST the normalized signal to ``forward_url``.

    The body is ``{"signal_id", "position", "signal"}``; with ``forward_secret`` set it is
    signed in ``X-Signalbox-Signature``. ``Idempotency-Key`` carries the signal id, so that a
    receiver can drop the repeat of a retry. A 4xx other than 408 and 429 is permanent.
    """
    url = context.options.get("forward_url")
    if not url:
        raise PermanentError("forward needs SIGNALBOX_FORWARD_URL")
    body = json.dumps({"signal_id": context.signal_id, "position": context.event.position,
                       "signal": signal.to_data()}).encode()
    headers = {"Content-Type": "application/json", "Idempotency-Key": context.signal_id}
    secret = context.options.get("forward_secret")
    if secret:
        headers[SIGNATURE_HEADER] = sign(str(secret), body)
    timeout = float(context.options.get("forward_timeout", 5.0))
    import httpx  # noqa: PLC0415 - the servers that do not forward never load it

    async with httpx.AsyncClient(timeout=timeout) as client:
        response = await client.post(str(url), content=body, headers=headers)
    if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
        raise PermanentError(f"{url} refused the signal: HTTP {response.status_code}")
    response.raise_for_status()
    return {"status_code": response.status_code}
