"""``signalbox send`` and ``signalbox tail``: the client library from the command line.

The server URL comes from ``--url`` or ``SIGNALBOX_URL`` (default http://127.0.0.1:8000), the
token from ``SIGNALBOX_TOKEN`` (never a flag: command lines are visible to every user).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import httpx

from replay.client import (
    Checkpoint,
    Client,
    CursorStore,
    EpochChanged,
    Event,
    FileCursorStore,
    Filter,
    MemoryCursorStore,
    Rejected,
    SignalboxClientError,
    Subscriber,
)

DEFAULT_URL = "http://127.0.0.1:8000"
SIGNAL_FLAGS = ("ticker", "exchange", "action", "quantity", "quantity_type", "order_type",
                "limit_price", "stop_price", "price", "take_profit", "stop_loss",
                "time_in_force", "interval", "strategy", "order_id", "comment")


def add_commands(commands: Any) -> None:
    """Register ``send`` and ``tail`` on the ``signalbox`` command's subparsers."""
    send = commands.add_parser("send", help="send a signal (from flags or a JSON file)")
    _connection_flags(send)
    for name in SIGNAL_FLAGS:
        send.add_argument("--" + name.replace("_", "-"), dest=name)
    send.add_argument("--max-lag", type=int, dest="max_lag")
    send.add_argument("--file", type=Path, help="a JSON file holding the signal ('-': stdin)")
    send.add_argument("--idempotency-key", help="default: a new random key, kept for retries")

    tail = commands.add_parser("tail", help="print events as JSON lines")
    _connection_flags(tail)
    tail.add_argument("--cursor", type=int,
                      help="print events after this position (rather than after the one in "
                           "--cursor-file)")
    tail.add_argument("--cursor-file", type=Path,
                      help="resume from, and save the position to, this file")
    tail.add_argument("--consumer", help="with --follow: a durable consumer name (the server "
                                         "keeps its position)")
    tail.add_argument("--type", action="append", default=[], dest="types",
                      help="event type glob, e.g. signal.* (repeatable)")
    for name in ("ticker", "strategy", "stream"):
        tail.add_argument("--" + name, action="append", default=[], dest=name + "s")
    tail.add_argument("--follow", "-f", action="store_true",
                      help="keep printing new events as they come (reconnecting as needed)")


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("SIGNALBOX_URL", DEFAULT_URL),
                        help="the server (default $SIGNALBOX_URL or http://127.0.0.1:8000)")


def token() -> str:
    value = os.environ.get("SIGNALBOX_TOKEN", "").strip()
    if not value:
        raise SystemExit("signalbox: set SIGNALBOX_TOKEN to a token (scope ingest or read)")
    return value


class CommandError(Exception):
    """A one-line reason for ``send`` or ``tail`` to exit with 1."""


def run(args: argparse.Namespace) -> int:
    try:
        if not args.url.startswith(("http://", "https://")):
            raise CommandError(f"--url {args.url!r} is not an http(s) URL: give the server's "
                               f"address, e.g. {DEFAULT_URL}")
        if args.command == "send":
            return asyncio.run(send(args))
        return asyncio.run(tail(args, sys.stdout))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and let nothing flush to it at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (SignalboxClientError, CommandError) as exc:
        print(f"signalbox: {exc}", file=sys.stderr)
        return 1
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # what no retry can mend
        print(f"signalbox: the server at {args.url} cannot be asked: {exc}", file=sys.stderr)
        return 1


def read_signal(args: argparse.Namespace) -> dict[str, Any]:
    signal: dict[str, Any] = {}
    if args.file is not None:
        try:
            text = sys.stdin.read() if str(args.file) == "-" else args.file.read_text()
        except OSError as exc:
            raise CommandError(f"cannot read {args.file}: {exc.strerror or exc}") from None
        try:
            loaded = json.loads(text)
        except ValueError as exc:
            raise CommandError(f"{args.file} is not JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise SystemExit("signalbox: the file must hold one JSON object")
        signal.update(loaded)
    for name in (*SIGNAL_FLAGS, "max_lag"):
        value = getattr(args, name)
        if value is not None:
            signal[name] = value
    return signal


async def send(args: argparse.Namespace) -> int:
    async with Client(args.url, token()) as client:
        try:
            receipt = await client.send_signal(read_signal(args), args.idempotency_key)
        except Rejected as exc:
            print(json.dumps({"signal_id": exc.signal_id, "position": exc.position,
                              "status": "rejected", "errors": exc.errors}))
            return 1
    print(json.dumps({"signal_id": receipt.signal_id, "position": receipt.position,
                      "status": receipt.status, "duplicate": receipt.duplicate}))
    return 0


def event_line(event: Event) -> str:
    return json.dumps({
        "position": event.position, "id": event.id, "stream": event.stream,
        "type": event.type, "data": event.data, "meta": event.meta,
        "time": event.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "hash": event.hash,
    }, ensure_ascii=False)


async def tail(args: argparse.Namespace, out: TextIO) -> int:
    if args.consumer is not None and not args.follow:
        # The server keeps a consumer's position over the stream alone: without --follow the
        # name would be ignored, the events printed from the beginning and nothing stored.
        print("signalbox: --consumer needs --follow (the server keeps a consumer's position "
              "for a stream that follows the log); without it, use --cursor-file",
              file=sys.stderr)
        return 2
    store: CursorStore = (FileCursorStore(args.cursor_file) if args.cursor_file
                          else MemoryCursorStore())
    try:
        saved = await store.load()
    except ValueError as exc:  # not a cursor file: what to do is in the message
        raise CommandError(str(exc)) from None
    cursor = args.cursor if args.cursor is not None else (saved.position if saved else None)
    epoch = saved.epoch if saved else None
    event_filter = Filter(types=args.types, streams=args.streams, tickers=args.tickers,
                          strategies=args.strategys)
    if not args.follow:
        return await _print_until_head(args, cursor or 0, epoch=epoch,
                                       event_filter=event_filter, store=store, out=out)
    if args.cursor is not None:  # asked for: it wins over the file, as without --follow
        store = _StartingAt(Checkpoint(epoch, args.cursor), store)
    subscriber = Subscriber(args.url, token(), filter=event_filter, consumer=args.consumer,
                            cursor=cursor, epoch=epoch, store=store)
    try:
        async with subscriber:
            async for event in subscriber:
                print(event_line(event), file=out, flush=True)
    except EpochChanged as exc:
        print(f"signalbox: {exc}; delete the cursor file to start again from 0",
              file=sys.stderr)
        return 1
    return 0


class _StartingAt:
    """A cursor store whose first checkpoint is the --cursor given; saved to ``store``."""

    def __init__(self, start: Checkpoint, store: CursorStore) -> None:
        self.start = start
        self.store = store

    async def load(self) -> Checkpoint | None:
        return self.start

    async def save(self, checkpoint: Checkpoint) -> None:
        await self.store.save(checkpoint)


async def _print_until_head(args: argparse.Namespace, cursor: int, *, epoch: str | None,
                            event_filter: Filter, store: Any, out: TextIO) -> int:
    page_size = 1000
    async with Client(args.url, token()) as client:
        while True:
            page = await client.events(cursor, page_size, types=event_filter.types,
                                       streams=event_filter.streams,
                                       tickers=event_filter.tickers,
                                       strategies=event_filter.strategies)
            if epoch is not None and page.epoch != epoch:
                print(f"signalbox: the log's epoch changed from {epoch} to {page.epoch}; "
                      "delete the cursor file to start again from 0", file=sys.stderr)
                return 1
            for event in page.events:
                print(event_line(event), file=out)
            out.flush()
            if page.next > cursor:
                cursor = page.next
                await store.save(Checkpoint(page.epoch, cursor))
            if len(page.events) < page_size:
                return 0
