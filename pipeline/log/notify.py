"""PostgreSQL LISTEN/NOTIFY as a wake-up for readers in other instances.

Every group commit on PostgreSQL sends ``NOTIFY signalbox_log`` in its transaction, so the
notification is delivered exactly when the events become visible. Each instance listens on a
dedicated connection (a pooled one would be handed to others), re-LISTENs after it drops or
stops answering, and wakes its hub, which re-reads the log from its own cursor: a notification
is only a hint, and a lost one costs at most one poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from pipeline.log.backends import (
    ADAPTER_OPTIONS,
    PING_TIMEOUT,
    open_connection,
    server_settings,
)
from pipeline.tasks import cancel_all

CHANNEL = "signalbox_log"
# Seconds between checks that the LISTEN connection still answers (see Wakeups._listen_once).
CHECK_EVERY = 5.0
log = logging.getLogger("signalbox.notify")


def asyncpg_connect_args(url: str) -> dict[str, Any]:
    """The keyword arguments of ``asyncpg.connect`` for the URL, read as the engines read it:
    ``?ssl=require`` or ``?command_timeout=30`` are connection options, other keys server
    settings (:func:`pipeline.log.backends.server_settings`)."""
    parsed, settings = server_settings(url)
    _, options = parsed.get_dialect()().create_connect_args(parsed)
    options = {k: v for k, v in options.items() if k not in ADAPTER_OPTIONS}
    if settings:
        options["server_settings"] = settings
    return options


class Wakeups:
    """Calls ``wake(head)`` on each notification (the committed head it announced), and
    ``wake(None)`` after every (re)connection."""

    def __init__(self, url: str, wake: Callable[[int | None], None], *,
                 retry: float = 1.0, check_every: float = CHECK_EVERY) -> None:
        self.connect_args = asyncpg_connect_args(url)
        self.wake = wake
        self.retry = retry
        self.check_every = check_every
        self.connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="signalbox-listen")

    async def stop(self) -> None:
        await cancel_all(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self._listen_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("LISTEN connection failed (%r); polling until it is back", exc)
            self.connected.clear()
            await asyncio.sleep(self.retry)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.wake(int(payload) if payload.isdigit() else None)

    async def _listen_once(self) -> None:
        """Listen until the connection is lost. Closed by the server, it says so; forgotten
        by a NAT, a firewall or a pooler, it never would (it only receives): so it is asked
        for an answer every ``check_every`` seconds, which also keeps it from sitting idle
        long enough for a NAT to forget it."""
        conn = await open_connection(self.connect_args)
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(CHANNEL, self._notified)
            self.connected.set()
            self.wake(None)  # whatever committed while we were not listening
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), self.check_every)
                    return
                try:
                    await conn.fetchrow(";", timeout=PING_TIMEOUT)
                except TimeoutError:
                    conn.terminate()  # closing would wait for an answer too
                    raise
        finally:
            try:
                await asyncio.wait_for(conn.close(), 2)
            except Exception:  # a connection that cannot even say goodbye is just dropped
                conn.terminate()
