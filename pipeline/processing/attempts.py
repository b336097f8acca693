"""What running a handler on one signal gives: the attempts, the retries and the outcome.

One definition, used by the live runner (:mod:`pipeline.processing.runner`) and by a dry-run
replay of the log (:mod:`replay.history`), so that "what the handler would have done" is worked
out exactly as the server works it out:

* each attempt gets a :class:`HandlerContext` with its number (1 for the first) and at most
  ``timeout`` seconds;
* a return value is ``processed`` with ``{"result", "attempts"}`` (a result that is not JSON is
  kept as its ``repr``);
* :class:`PermanentError` is ``failed`` at once; any other error is retried after an
  exponential backoff with full jitter, and ``failed`` once ``attempts`` are used up, with
  ``{"error", "type", "attempts"}``;
* a signal past its ``max_lag`` when processing would start is ``expired`` and not run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pipeline.log import Event
from pipeline.processing.handlers import Handler, HandlerContext, PermanentError
from pipeline.processing.projection import Status
from pipeline.signals import Signal

log = logging.getLogger("signalbox.runner")

EXPIRED_DETAIL = {"reason": "past its max_lag when processing would start"}


@dataclass(frozen=True)
class AttemptPolicy:
    """How a handler is tried: the server's ``SIGNALBOX_HANDLER_*`` settings."""

    attempts: int = 5
    backoff: float = 0.5
    backoff_cap: float = 30.0
    timeout: float = 30.0
    options: Mapping[str, Any] = field(default_factory=dict)


async def run_handler(handler: Handler, event: Event, signal: Signal,
                      policy: AttemptPolicy) -> tuple[Status, dict[str, Any]]:
    """Try ``handler`` on the signal of ``event`` (a ``signal.accepted``): its outcome."""
    signal_id = event.data["signal_id"]
    for attempt in range(1, policy.attempts + 1):
        context = HandlerContext(signal_id, event, attempt, policy.options)
        try:
            result = await asyncio.wait_for(handler(signal, context), policy.timeout)
            return Status.PROCESSED, {"result": json_safe(result), "attempts": attempt}
        except PermanentError as exc:
            return Status.FAILED, failure(exc, attempt)
        except Exception as exc:
            log.warning("handler failed on %s (attempt %d): %r", signal_id, attempt, exc)
            if attempt == policy.attempts:
                return Status.FAILED, failure(exc, attempt)
            ceiling = min(policy.backoff_cap, policy.backoff * 2 ** (attempt - 1))
            await asyncio.sleep(random.uniform(0, ceiling))
    raise AssertionError("unreachable")  # pragma: no cover


def is_expired(signal: Signal, default_max_lag: int | None, now: datetime) -> bool:
    """Whether the signal is past its ``max_lag`` (or the default one) at ``now``."""
    lag = signal.max_lag or default_max_lag
    if signal.signal_time is None or lag is None:
        return False
    return signal.signal_time + timedelta(seconds=lag) < now


def failure(exc: BaseException, attempt: int) -> dict[str, Any]:
    message = str(exc) or exc.__class__.__name__
    return {"error": message[:2000], "type": exc.__class__.__name__, "attempts": attempt}


def json_safe(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return repr(value)[:2000]
    return value
