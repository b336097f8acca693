"""Handlers for the runner's tests: the server loads them as ``tests.handler_fixture:NAME``.

Each call appends one JSON line to the file named by SIGNALBOX_TEST_RECORD, so that a test can
see what ran, in which order and how often; a call cancelled while it sleeps appends another,
with ``"cancelled": true``. The signal's comment steers the outcome.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
from typing import Any

from pipeline.processing.handlers import HandlerContext, PermanentError
from pipeline.signals import Signal


async def record(signal: Signal, context: HandlerContext) -> dict[str, Any]:
    call = {"signal_id": context.signal_id, "ticker": signal.ticker, "pid": os.getpid(),
            "position": context.event.position, "attempt": context.attempt,
            "comment": signal.comment}
    append(call)
    comment = signal.comment or ""
    if comment.startswith("sleep:"):
        try:
            await asyncio.sleep(float(comment.removeprefix("sleep:")))
        except asyncio.CancelledError:
            append({**call, "cancelled": True})
            raise
    if comment == "fail-once" and context.attempt == 1:
        raise RuntimeError("broker timed out")
    if comment == "fail-twice" and context.attempt <= 2:
        raise RuntimeError(f"flaky broker (attempt {context.attempt})")
    if comment == "permanent":
        raise PermanentError("unknown symbol")
    if comment == "always":
        raise RuntimeError("broker down")
    return {"ok": True, "attempt": context.attempt}


def append(line: dict[str, Any]) -> None:
    with open(os.environ["SIGNALBOX_TEST_RECORD"], "a") as file:
        file.write(json.dumps(line) + "\n")


def __getattr__(name: str) -> Any:
    # ``unloadable_in_workers``: found by the supervisor (which checks --handler before it
    # starts anything), not by its workers, whose start then fails.
    if name == "unloadable_in_workers" and multiprocessing.parent_process() is None:
        return record
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
