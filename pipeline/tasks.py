"""Stopping background tasks, the one way every component does it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_all(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel every task given (None is skipped), then wait until each has finished."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await task
