"""The application under uvicorn, for ``signalbox serve`` (see pipeline/cli.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
from types import FrameType

import uvicorn

from pipeline.answers import websocket_protocol
from pipeline.app import QuietFrames, RedactTokens, create_app
from pipeline.config import Settings
from pipeline.logs import configure_logging
from pipeline.slowclients import Limits, http_protocol


class _Server(uvicorn.Server):
    """Closes WebSocket subscribers with 1001 before uvicorn tears connections down."""

    def __init__(self, config: uvicorn.Config, stopping: asyncio.Event) -> None:
        super().__init__(config)
        self.stopping = stopping

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stopping.set()
        super().handle_exit(sig, frame)
        # uvicorn would re-raise the signal after shutting down; a graceful stop exits 0.
        self._captured_signals.clear()


def tune_garbage_collector() -> None:
    """Collect cycles less often than CPython's default (every 700 allocations).

    Serving allocates fast and keeps a window of recent events alive: with the default
    thresholds the cyclic collector took a fifth of the server's time under load. What was
    loaded at start (modules, settings) is frozen out of collections altogether. Memory is
    still freed by reference counting as soon as it is unused; only cycles wait longer, for
    a full collection if they outlive a young one, and for ever once the server is idle: what
    is made per connection or per request must not be left in a cycle (see
    :mod:`pipeline.wsprotocol`).
    """
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


def run_server(settings: Settings) -> int:
    """Serve until stopped, on a log whose schema the caller has checked: 0 after a graceful
    stop, 1 when the server could not start."""
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        # The protocol's own heartbeat (ping/pong frames) watches the link; no second one.
        ws=websocket_protocol(behind_tls=settings.behind_tls), ws_max_size=1 << 20,
        ws_ping_interval=None, server_header=False, access_log=settings.access_log,
        timeout_graceful_shutdown=10, lifespan="on",
        # The protocols write their own answers (400, 431, 503) as the application would;
        # the concurrency limit is theirs, not uvicorn's, which would answer in plain text.
        http=http_protocol(Limits(settings.header_limit, settings.header_count,
                                  settings.header_timeout, settings.limit_concurrency),
                           behind_tls=settings.behind_tls),
        h11_max_incomplete_event_size=settings.header_limit,
        timeout_keep_alive=settings.keep_alive_timeout,
    )
    logging.getLogger("uvicorn.access").addFilter(RedactTokens())
    logging.getLogger("uvicorn.error").addFilter(QuietFrames())
    configure_logging(settings.log_level, settings.log_format)
    tune_garbage_collector()
    server = _Server(config, app.state.connections.stopping)
    server.run()
    return 0 if server.started else 1
