"""The application under uvicorn, for ``signalbox serve`` (see pipeline/cli.py): in this
process, or in ``--workers`` processes that share one listening socket."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from types import FrameType

import uvicorn

from pipeline.answers import websocket_protocol
from pipeline.app import QuietFrames, RedactTokens, create_app
from pipeline.config import Settings
from pipeline.logs import configure_logging
from pipeline.siblings import Worker
from pipeline.slowclients import Limits, http_protocol

log = logging.getLogger("uvicorn.error")


class _Server(uvicorn.Server):
    """Closes WebSocket subscribers with 1001 before uvicorn tears connections down; as a
    worker, says when it serves, and stops when its supervisor is gone."""

    def __init__(self, config: uvicorn.Config, stopping: asyncio.Event,
                 ready: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.stopping = stopping
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.ready is not None:
            parent = multiprocessing.parent_process()
            if parent is not None:  # killed, the supervisor cannot stop it: stop by itself
                asyncio.get_running_loop().add_reader(
                    parent.sentinel, self.handle_exit, signal.SIGTERM, None)
            self.ready()

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


def run_server(settings: Settings, sockets: list[socket.socket] | None = None,
               ready: Callable[[], None] | None = None, worker: Worker | None = None) -> int:
    """Serve until stopped, on a log whose schema the caller has checked: 0 after a graceful
    stop, 1 when the server could not start. A worker is given the supervisor's socket, a
    ``ready`` to call once it serves, and where it meets the other workers."""
    app = create_app(settings, worker)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        # The protocol's own heartbeat (ping/pong frames) watches the link; no second one.
        ws=websocket_protocol(behind_tls=settings.behind_tls), ws_max_size=1 << 20,
        ws_per_message_deflate=settings.ws_compression,  # docs/performance.md#websocket-compression
        ws_ping_interval=None, server_header=False, access_log=settings.access_log,
        # The client's address is the TCP peer unless that is one of SIGNALBOX_TRUSTED_PROXIES
        # (SourcePolicy.client_address): uvicorn's own X-Forwarded-For handling, which
        # believes any local peer, would let a local process choose its address.
        proxy_headers=False,
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
    if ready is not None:  # the supervisor says where it serves, once every worker does
        logging.getLogger("uvicorn.error").addFilter(NotRunningYet())
    server = _Server(config, app.state.connections.stopping, ready)
    server.run(sockets)
    return 0 if server.started else 1


class NotRunningYet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Uvicorn running on"))


# -- workers -------------------------------------------------------------------------------

SPAWN = multiprocessing.get_context("spawn")
RESTART_DELAY = 1.0  # seconds between restarts of a worker that keeps dying


def _worker(settings: Settings, sock: socket.socket, ready: ProcessEvent,
            worker: Worker) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C: the supervisor stops us
    raise SystemExit(run_server(settings, [sock], ready.set, worker))


class WorkerProcess:
    def __init__(self, settings: Settings, sock: socket.socket, place: Path,
                 number: int) -> None:
        self.ready = SPAWN.Event()
        self.process: SpawnProcess = SPAWN.Process(
            target=_worker, args=(settings, sock, self.ready, Worker(place, number)),
            name=f"signalbox-worker-{number}", daemon=False)
        self.number = number
        self.started_at = time.monotonic()
        self.process.start()


def listen(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_workers(settings: Settings) -> int:
    """``--workers N``: N processes serve one listening socket, each a whole server with its
    own writer, hub and subscribers, all on the one log (the kernel hands each connection to
    one of them). This process only supervises: it says where they serve once all of them do,
    starts a worker again when one dies, and stops them all on SIGTERM or SIGINT (0 when they
    stopped gracefully; a worker's own exit code when one could not start)."""
    uvicorn.Config("pipeline.app:create_app", log_level=settings.log_level)  # its log handlers
    configure_logging(settings.log_level, settings.log_format)
    try:
        sock = listen(settings)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", settings.host, settings.port, exc)
        return 1
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    place = Path(tempfile.mkdtemp(prefix="signalbox-workers-"))  # mode 0700
    workers = [WorkerProcess(settings, sock, place, n) for n in range(1, settings.workers + 1)]
    try:
        while not stopping and not all(w.ready.is_set() for w in workers):
            failed = [w for w in workers if w.process.exitcode is not None
                      and not w.ready.is_set()]
            if failed:
                log.error("worker %d could not start; stopping", failed[0].number)
                return failed[0].process.exitcode or 1
            wait([w.process.sentinel for w in workers], 0.05)
        if stopping:
            return 0
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        log.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", host,
                 sock.getsockname()[1])
        log.info("%d workers serving, pids %s", len(workers),
                 " ".join(str(w.process.pid) for w in workers))
        while not stopping:
            wait([w.process.sentinel for w in workers], 0.5)
            for index, worker in enumerate(workers):
                if worker.process.exitcode is None or stopping:
                    continue
                log.warning("worker %d (pid %s) ended with %s; starting it again",
                            worker.number, worker.process.pid, worker.process.exitcode)
                time.sleep(max(0.0, worker.started_at + RESTART_DELAY - time.monotonic()))
                workers[index] = WorkerProcess(settings, sock, place, worker.number)
        return 0
    finally:
        _stop_all(workers, timeout=15.0)
        sock.close()
        shutil.rmtree(place, ignore_errors=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop_all(workers: list[WorkerProcess], timeout: float) -> None:
    """SIGTERM to each (each closes its subscribers with 1001 and drains), then SIGKILL to any
    still there after ``timeout``."""
    for worker in workers:
        if worker.process.exitcode is None and worker.process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))
        if worker.process.exitcode is None:
            log.warning("worker %d did not stop in %.0f s; killing it", worker.number, timeout)
            worker.process.kill()
            worker.process.join(5)
