"""The load generator: a process of its own that drives a server and prints what it measured.

``python -m tests.bench.loadgen MODE --url http://127.0.0.1:PORT [options]`` prints one JSON
object on its last line. The same modes drive Signalbox and the minimal limit servers, so a
ratio compares the servers, not two clients.

- ``post``: N keep-alive connections, each sending one request after the other, for a fixed
  time after a warm-up: requests answered per second, by status (``--keyed``: each with an
  ``Idempotency-Key`` of its own).
- ``latency``: signals at a steady rate, each with its own ``order_id``; one WebSocket
  subscriber times the arrival of each ``signal.accepted``: p50/p99/max from send to receipt.
- ``fanout``: K live subscribers; then M messages posted as fast as 8 connections allow; the
  time until every subscriber holds every event: events delivered per second, in total.
- ``catchup``: one subscriber from cursor 0 until the head: events per second.
- ``idle``: K subscribers that connect, go live and stay open until stdin closes.

The client is a minimal HTTP/1.1 keep-alive client and the ``websockets`` library; uvloop
when installed, as under ``signalbox serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

SIGNAL = (
    '{{"ticker":"BINANCE:BTCUSDT","action":"{action}","quantity":"0.015","price":"67432.5",'
    '"order_type":"market","strategy":"bench-trend","interval":"5","order_id":"{order_id}",'
    '"comment":"benchmark signal {order_id}"}}'
)


def signal_body(n: int) -> bytes:
    return SIGNAL.format(action="buy" if n % 2 else "sell", order_id=f"b-{n}").encode()


class Connection:
    """One keep-alive HTTP/1.1 connection that sends one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").rstrip("/").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, f"{host}:{port}")

    async def post(self, path: str, body: bytes, headers: str = "") -> tuple[int, bytes]:
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"{headers}Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.transport.abort()


def auth_header(token: str | None) -> str:
    return f"Authorization: Bearer {token}\r\n" if token else ""


async def post_load(url: str, path: str, token: str | None, *, clients: int, seconds: float,
                    warmup: float, keyed: bool = False) -> dict[str, Any]:
    """``keyed``: each request with an ``Idempotency-Key`` of its own, as the Python client
    sends them."""
    connections = [await Connection.open(url) for _ in range(clients)]
    statuses: Counter[int] = Counter()
    counter = iter(range(1, 1 << 62))
    phase = {"counting": False, "stop": False}
    headers = auth_header(token)
    run = uuid.uuid4().hex

    async def drive(conn: Connection) -> None:
        while not phase["stop"]:
            n = next(counter)
            key = f"Idempotency-Key: bench-{run}-{n}\r\n" if keyed else ""
            status, _ = await conn.post(path, signal_body(n), headers + key)
            if phase["counting"]:
                statuses[status] += 1

    tasks = [asyncio.create_task(drive(c)) for c in connections]
    await asyncio.sleep(warmup)
    phase["counting"] = True
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    phase["counting"] = False
    elapsed = time.perf_counter() - started
    phase["stop"] = True
    await asyncio.gather(*tasks)
    for conn in connections:
        conn.close()
    ok = sum(n for status, n in statuses.items() if 200 <= status < 300)
    return {"rate": ok / elapsed, "unit": "requests/s", "clients": clients,
            "statuses": {str(k): v for k, v in sorted(statuses.items())}}


async def subscribe(ws_url: str, token: str | None, cursor: int | None = None,
                    **hello: Any) -> tuple[ClientConnection, dict[str, Any]]:
    """Connect, say hello and return the connection and its welcome."""
    # permessage-deflate offered, as by browsers and Signalbox's client: the server declines
    conn = await websockets.connect(ws_url, max_size=None, ping_interval=None, open_timeout=60)
    await conn.send(json.dumps({"op": "hello", "token": token, "cursor": cursor, **hello}))
    welcome = json.loads(await conn.recv())
    if welcome.get("op") != "welcome":
        raise RuntimeError(f"expected a welcome, got {welcome}")
    return conn, welcome


async def wait_live(conn: ClientConnection) -> None:
    while json.loads(await conn.recv())["op"] != "live":
        pass


def ws_url_of(url: str) -> str:
    return url.replace("http://", "ws://").rstrip("/") + "/ws"


async def latency(url: str, path: str, token: str | None, *, rate: float, seconds: float,
                  warmup: float) -> dict[str, Any]:
    conn, _ = await subscribe(ws_url_of(url), token, None,
                              filter={"types": ["signal.accepted"]})
    await wait_live(conn)
    sent: dict[str, float] = {}
    received: dict[str, float] = {}
    total = int(rate * (seconds + warmup))

    async def listen() -> None:
        while len(received) < total:
            frame = json.loads(await conn.recv())
            if frame["op"] == "event":
                received[frame["data"]["signal"]["order_id"]] = time.perf_counter()
            elif frame["op"] == "ping":
                await conn.send('{"op":"pong"}')

    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(16):
        pool.put_nowait(await Connection.open(url))
    headers = auth_header(token)

    async def send(n: int) -> None:
        client = await pool.get()
        try:
            sent[f"b-{n}"] = time.perf_counter()
            status, body = await client.post(path, signal_body(n), headers)
            if status != 202:
                raise RuntimeError(f"signal {n} answered {status}: {body!r}")
        finally:
            pool.put_nowait(client)

    listener = asyncio.create_task(listen())
    # Only the sends in flight are kept (gathering all 11,000 at the end stalled this process
    # for 15 ms), and the cycle collector does not run while measuring: one full collection
    # here, over what the run had made, stalled it for 30 ms, and either stall was counted as
    # the server's latency.
    in_flight: set[asyncio.Task[None]] = set()
    gc.freeze()
    gc.disable()
    try:
        start = time.perf_counter()
        for n in range(total):  # open loop: each send at its own time, whatever the answers do
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send(n))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)
        await asyncio.wait_for(listener, 30)
    finally:
        gc.enable()
    await conn.close()
    skip = int(rate * warmup)
    samples = sorted((received[f"b-{n}"] - sent[f"b-{n}"]) * 1000 for n in range(skip, total))
    return {"rate": rate, "unit": "ms", "samples": len(samples),
            "p50": statistics.median(samples), "p99": percentile(samples, 0.99),
            "max": samples[-1]}


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def fanout(url: str, path: str, token: str | None, *, subscribers: int, messages: int,
                 per_message: int) -> dict[str, Any]:
    """``per_message``: events each posted message produces (Signalbox: received + accepted)."""
    ws_url = ws_url_of(url)
    conns: list[ClientConnection] = []
    for _ in range(subscribers):
        conn, _ = await subscribe(ws_url, token)
        conns.append(conn)
    await asyncio.gather(*(wait_live(c) for c in conns))
    expected = messages * per_message
    first = asyncio.get_running_loop().create_future()

    async def count(conn: ClientConnection) -> float:
        got = 0
        while got < expected:
            message = await conn.recv(decode=False)
            if b'"op":"ping"' in message[:20]:
                await conn.send('{"op":"pong"}')
                continue
            if not first.done():
                first.set_result(time.perf_counter())
            got += 1
        return time.perf_counter()

    counters = [asyncio.create_task(count(c)) for c in conns]
    headers = auth_header(token)
    posters = [await Connection.open(url) for _ in range(8)]
    numbers = iter(range(messages))
    started = time.perf_counter()

    async def post(client: Connection) -> None:
        for n in numbers:
            status, body = await client.post(path, signal_body(n), headers)
            if status >= 300:
                raise RuntimeError(f"publish answered {status}: {body!r}")

    await asyncio.gather(*(post(p) for p in posters))
    finished = max(await asyncio.wait_for(asyncio.gather(*counters), 300))
    elapsed = finished - started
    for conn in conns:
        await conn.close()
    return {"rate": expected * subscribers / elapsed, "unit": "events/s",
            "subscribers": subscribers, "events": expected, "seconds": elapsed}


async def catchup(url: str, token: str | None, batch: bool, count: int) -> dict[str, Any]:
    """``count``: the events the minimal server should send (Signalbox sends its log)."""
    started = time.perf_counter()
    query = f"?count={count}" if count else ""
    conn, welcome = await subscribe(ws_url_of(url) + query, token, 0, batch=batch)
    head = welcome["head"]
    got = 0
    while True:
        message = await conn.recv(decode=False)
        if message.startswith(b'{"op":"live"'):
            break
        if message.startswith(b'{"op":"ping"'):
            await conn.send('{"op":"pong"}')
            continue
        got += message.count(b"\n") + 1
    elapsed = time.perf_counter() - started
    await conn.close()
    if got != head:
        raise RuntimeError(f"caught up {got} events, expected {head}")
    return {"rate": got / elapsed, "unit": "events/s", "events": got, "batch": batch,
            "seconds": elapsed}


async def idle(url: str, token: str | None, subscribers: int) -> dict[str, Any]:
    """Hold K live subscribers until stdin closes; print a line once they are all live."""
    ws_url = ws_url_of(url)
    conns: list[ClientConnection] = []
    started = time.perf_counter()
    for _ in range(subscribers // 100):
        batch = await asyncio.gather(*(subscribe(ws_url, token) for _ in range(100)))
        conns.extend(c for c, _ in batch)
        await asyncio.gather(*(wait_live(c) for c, _ in batch))
    print(json.dumps({"live": len(conns), "seconds": time.perf_counter() - started}),
          flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for conn in conns:
        conn.transport.abort()
    return {"subscribers": len(conns)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.loadgen")
    parser.add_argument("mode", choices=["post", "latency", "fanout", "catchup", "idle"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--path", default="/api/signals")
    parser.add_argument("--token")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--subscribers", type=int, default=1)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--per-message", type=int, default=2)
    parser.add_argument("--batch", action="store_true")
    parser.add_argument("--keyed", action="store_true")
    parser.add_argument("--count", type=int, default=0)
    args = parser.parse_args()
    modes: dict[str, Callable[[], Coroutine[Any, Any, dict[str, Any]]]] = {
        "post": lambda: post_load(args.url, args.path, args.token, clients=args.clients,
                                  seconds=args.seconds, warmup=args.warmup, keyed=args.keyed),
        "latency": lambda: latency(args.url, args.path, args.token, rate=args.rate,
                                   seconds=args.seconds, warmup=args.warmup),
        "fanout": lambda: fanout(args.url, args.path, args.token, subscribers=args.subscribers,
                                 messages=args.messages, per_message=args.per_message),
        "catchup": lambda: catchup(args.url, args.token, args.batch, args.count),
        "idle": lambda: idle(args.url, args.token, args.subscribers),
    }
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        print(json.dumps(runner.run(modes[args.mode]())), flush=True)


if __name__ == "__main__":
    main()
