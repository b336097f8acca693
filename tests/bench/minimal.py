"""The limits: what the same stack does when it does nothing else.

``python -m tests.bench.minimal serve`` runs a minimal Starlette app under uvicorn with the
settings ``signalbox serve`` uses: ``POST /api/signals`` parses the JSON body and answers;
``POST /publish`` does the same and sends the body to every WebSocket subscriber of ``/ws``
(one encoding, one send per subscriber, as a hand-written broadcast would). ``/ws`` speaks
just enough of the protocol for the load generator: hello, welcome, live; a hello with a
cursor gets ``?count=N`` ready-made event frames first, one per message or batched like
Signalbox's ``batch`` option: what a catch-up costs when nothing has to be read or encoded.

``python -m tests.bench.minimal sqlite`` prints the raw commit rate of SQLite on this disk
with the settings of the log (WAL, ``synchronous=FULL``): one small row per transaction.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import tempfile
import time
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

ACCEPTED = b'{"status":"accepted"}'
subscribers: set[WebSocket] = set()


async def ingest(request: Request) -> Response:
    json.loads(await request.body())
    return Response(ACCEPTED, 202, media_type="application/json")


async def publish(request: Request) -> Response:
    body = await request.body()
    json.loads(body)
    text = body.decode()
    for ws in list(subscribers):
        try:
            await ws.send_text(text)
        except (WebSocketDisconnect, RuntimeError):
            subscribers.discard(ws)
    return Response(ACCEPTED, 202, media_type="application/json")


async def stream(ws: WebSocket) -> None:
    await ws.accept()
    hello = json.loads(await ws.receive_text())
    if hello.get("cursor") is not None:  # a catch-up: as many frames as asked for, then live
        await replay(ws, int(ws.query_params.get("count", "100000")), bool(hello.get("batch")))
        return
    await ws.send_text('{"op":"welcome","head":0,"cursor":0}')
    await ws.send_text('{"op":"live","position":0}')
    subscribers.add(ws)
    try:
        while True:
            await ws.receive_text()
    except WebSocketDisconnect:
        pass
    finally:
        subscribers.discard(ws)


async def replay(ws: WebSocket, count: int, batch: bool) -> None:
    """What a catch-up costs when the frames need no reading or encoding: the same frame,
    ``count`` times, one per message or joined into messages of up to 1 MiB."""
    await ws.send_text(json.dumps({"op": "welcome", "head": count, "cursor": 0}))
    per_message = max(1, (1 << 20) // (len(FRAME) + 1)) if batch else 1
    sent = 0
    while sent < count:
        n = min(per_message, count - sent)
        await ws.send_text("\n".join([FRAME] * n))
        sent += n
    await ws.send_text(f'{{"op":"live","position":{count}}}')
    with contextlib.suppress(WebSocketDisconnect):
        while True:  # until the client has read everything and closes
            await ws.receive_text()


FRAME = json.dumps({"op": "event", "position": 1, "pad": "x" * 500})
app = Starlette(routes=[
    Route("/api/signals", ingest, methods=["POST"]),
    Route("/publish", publish, methods=["POST"]),
    WebSocketRoute("/ws", stream),
])


def serve(port: int) -> None:
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                ws="websockets-sansio", ws_max_size=1 << 20, ws_per_message_deflate=False,
                ws_ping_interval=None, server_header=False)


ROW = json.dumps({"ticker": "BTCUSDT", "action": "buy", "quantity": "0.015",
                  "price": "67432.5", "strategy": "bench-trend", "pad": "x" * 400})


def sqlite_commits(seconds: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder:
        db = sqlite3.connect(Path(folder) / "raw.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE events (position INTEGER PRIMARY KEY, data TEXT NOT NULL)")
        commits = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            db.execute("BEGIN")
            db.execute("INSERT INTO events (data) VALUES (?)", (ROW,))
            db.execute("COMMIT")
            commits += 1
        db.close()
    return {"rate": commits / elapsed, "unit": "commits/s"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.minimal")
    parser.add_argument("what", choices=["serve", "sqlite"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    if args.what == "serve":
        serve(args.port)
    else:
        print(json.dumps(sqlite_commits(args.seconds)), flush=True)


if __name__ == "__main__":
    main()
