"""``signalbox replay``: the recorded log, read again, without touching it.

The events are read in pages (memory does not grow with the log) from a database (SELECTs only,
safe while a server runs) or from a server's HTTP API, selected by position, time, ticker,
strategy and type, and go to one *mode*:

* ``emit`` (the default): JSON lines, one event per line as the API gives it, to stdout or
  ``--output FILE``;
* ``post``: each event POSTed to ``--post URL`` (see :class:`replay._sinks.Post`);
* ``handler``: each ``signal.accepted`` through ``--handler`` in a dry run, exactly as the live
  runner would run it (:mod:`pipeline.processing.attempts`), the outcome of each signal beside
  what the live log recorded in ``--report FILE``, and a summary on stdout;
* ``renormalize``: each ``signal.received`` body read again with today's parsers beside its
  recorded verdict (:mod:`replay.renormalize`).

A mode is a sink (:mod:`replay._sinks`) made by :func:`make_sink`; a new mode adds its flags in
:func:`add_commands` and its sink there.

``--speed X`` keeps the recorded gaps between the events' times, divided by X, on a monotonic
clock measured from the start of the run (so delays do not add up). ``--checkpoint FILE`` keeps
the last position done, the log's epoch and the options, the output file's absolute path among
them (written atomically after every page and at exit, Ctrl-C included); a run with the same
file goes on after it, in the same output file. Outputs contain no
wall-clock time: the same log and options give the same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.errors import SignalboxError
from pipeline.log.model import EventFilter, format_time
from pipeline.processing.attempts import AttemptPolicy
from pipeline.processing.handlers import Handler, load_handler
from replay._files import write_atomically
from replay._sinks import DryRun, Emit, LineFile, Post, ReplayError, Sink
from replay.renormalize import TYPES, Applier, Renormalize
from replay.sources import DatabaseSource, Selection, ServerSource, Source

# The server's settings that --handler runs may override: (name, type, what it is).
HANDLER_SETTINGS = (("handler_attempts", int, "tries before a signal fails"),
                    ("handler_backoff", float, "first retry delay in seconds"),
                    ("handler_timeout", float, "seconds one call may take"))


def add_commands(commands: Any) -> None:
    """Register ``replay`` on the ``signalbox`` command's subparsers."""
    replay = commands.add_parser(
        "replay", help="read the recorded log again: as JSON lines, POSTed, or through a "
                       "handler in a dry run")
    where = replay.add_mutually_exclusive_group()
    where.add_argument("--database-url", metavar="URL",
                       help="read the database directly, SELECTs only (default: "
                            "SIGNALBOX_DATABASE_URL)")
    where.add_argument("--url", metavar="SERVER",
                       help="read a server's HTTP API instead (token from SIGNALBOX_TOKEN, "
                            "scope read)")
    chosen = replay.add_argument_group("selection (all must hold)")
    chosen.add_argument("--from-position", type=int, default=1, metavar="N",
                        help="the first position (included)")
    chosen.add_argument("--to-position", type=int, metavar="N",
                        help="the last position (included)")
    chosen.add_argument("--since", metavar="TIME",
                        help="recorded at or after this time, ISO 8601 (UTC without offset)")
    chosen.add_argument("--until", metavar="TIME", help="recorded before this time")
    chosen.add_argument("--ticker", action="append", default=[], dest="tickers", metavar="T",
                        help="repeatable: any of them")
    chosen.add_argument("--strategy", action="append", default=[], dest="strategies",
                        metavar="S",
                        help="repeatable: any of them")
    chosen.add_argument("--type", action="append", default=[], dest="types", metavar="GLOB",
                        help="event type glob, e.g. signal.* (repeatable)")
    modes = replay.add_argument_group("where the events go (default: JSON lines on stdout)")
    mode = modes.add_mutually_exclusive_group()
    mode.add_argument("--output", type=Path, metavar="FILE", help="JSON lines to this file")
    mode.add_argument("--post", metavar="URL", help="POST each event here as JSON")
    mode.add_argument("--handler", metavar="SPEC",
                      help="dry run: each signal.accepted through this handler "
                           "(module:function or a name such as log)")
    mode.add_argument("--renormalize", action="store_true",
                      help="read every signal.received body again with today's parsers and "
                           "name the signals they read differently")
    modes.add_argument("--report", type=Path, metavar="FILE",
                       help="with --handler: the outcome of each signal; with --renormalize: "
                            "each change; JSON lines")
    modes.add_argument("--apply", action="store_true",
                       help="with --renormalize and --url: the server records each change as "
                            "a signal.renormalized event (token scope admin)")
    modes.add_argument("--max-lag", type=int, metavar="N",
                       help="with --renormalize: the server's max_lag when the signals came "
                            "(default: SIGNALBOX_MAX_LAG)")
    for name, kind, text in HANDLER_SETTINGS:
        modes.add_argument("--" + name.replace("_", "-"), type=kind, dest=name, metavar="N",
                           help=f"with --handler: {text} (default: as the server, "
                                f"SIGNALBOX_{name.upper()})")
    replay.add_argument("--speed", type=float, metavar="X",
                        help="keep the recorded pacing, X times faster (default: as fast as "
                             "possible; 1: real time)")
    replay.add_argument("--checkpoint", type=Path, metavar="FILE",
                        help="resume from, and save progress to, this file")
    replay.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def mode_of(args: argparse.Namespace) -> str:
    if args.handler:
        return "handler"
    if args.renormalize:
        return "renormalize"
    return "post" if args.post else "emit"


def run(args: argparse.Namespace, database_url: str) -> int:
    """``signalbox replay``: 0 done, 1 an error, 2 bad usage, 130 interrupted (Ctrl-C)."""
    # Failed attempts are in the report; the runner's warnings about them would be noise here.
    logging.getLogger("signalbox.runner").setLevel(logging.ERROR)
    try:
        return asyncio.run(_replay(args, database_url))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `| head`: whoever read stdout stopped
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("signalbox replay: stdout was closed before the end", file=sys.stderr)
        return 1
    except ReplayError as exc:
        print(f"signalbox replay: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.filename is None:
            raise  # the database's (a refused connection): the caller says so
        # A file of ours (--output, --report, --checkpoint), not the database.
        print(f"signalbox replay: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def selection_of(args: argparse.Namespace) -> Selection:
    if args.from_position < 1:
        raise ReplayError("--from-position must be 1 or more", 2)
    if args.to_position is not None and args.to_position < args.from_position:
        raise ReplayError("--to-position must not be before --from-position", 2)
    if args.speed is not None and not args.speed > 0:
        raise ReplayError("--speed must be more than 0 (1: real time)", 2)
    since, until = _time(args.since, "--since"), _time(args.until, "--until")
    if since is not None and until is not None and until <= since:
        raise ReplayError("--until must be after --since", 2)
    types = _mode_types(args)
    return Selection(args.from_position, args.to_position, since, until,
                     EventFilter.build(types, (), args.tickers, args.strategies))


def _mode_types(args: argparse.Namespace) -> tuple[str, ...]:
    """The event types the mode reads (the --type globs unless it fixes them); bad usage raises."""
    types = tuple(args.types)
    if args.handler:
        if types:
            raise ReplayError("--type does not go with --handler, which runs the "
                              "signal.accepted events", 2)
        types = ("signal.accepted",)
    if args.renormalize:
        if types:
            raise ReplayError("--type does not go with --renormalize, which reads the "
                              "signal.received events and their verdicts", 2)
        types = TYPES
    if args.apply and not (args.renormalize and args.url):
        raise ReplayError("--apply goes with --renormalize and --url: the server records the "
                          "changes (token scope admin)", 2)
    if args.max_lag is not None and (not args.renormalize or args.max_lag <= 0):
        raise ReplayError("--max-lag goes with --renormalize and is a number of seconds", 2)
    if args.report is not None and not (args.handler or args.renormalize):
        raise ReplayError("--report goes with --handler or --renormalize", 2)
    if args.handler and args.report is None:
        raise ReplayError("--handler needs --report FILE for the outcome of each signal", 2)
    return types


def _time(value: str | None, flag: str) -> str | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
        return format_time(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    except ValueError:
        raise ReplayError(f"{flag} {value!r} is not an ISO 8601 time, e.g. "
                          "2025-01-15T14:45:00Z", 2) from None
    except OverflowError:  # before year 1 or after 9999, once in UTC
        raise ReplayError(f"{flag} {value!r} is out of range: give a time between the years "
                          "1 and 9999 in UTC", 2) from None


def identity(args: argparse.Namespace, selection: Selection) -> dict[str, Any]:
    """What a checkpoint is valid for: the mode, the file it writes (--output or --report, by
    its absolute path: a relative one names another file in another folder) and the
    selection."""
    written = args.output or args.report
    return {"mode": mode_of(args), "output": str(written.resolve()) if written else None,
            "handler": args.handler, "apply": args.apply,
            "from_position": selection.first,
            "to_position": selection.last, "since": selection.since, "until": selection.until,
            "types": sorted(args.types), "tickers": sorted(args.tickers),
            "strategies": sorted(args.strategies)}


class Checkpoint:
    """The last position done and the sink's state, for one epoch and one set of options."""

    def __init__(self, path: Path | None, epoch: str, options: dict[str, Any]) -> None:
        self.path = path
        self.epoch = epoch
        self.options = options
        self.position = 0
        self.resumed: dict[str, Any] | None = None  # the sink's state, when resuming

    def load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            saved = json.loads(self.path.read_text())
            epoch, options, position = saved["epoch"], saved["options"], int(saved["position"])
            # Checkpoints made before the output was an option kept its path with the sink's.
            options.setdefault("output", (saved.get("sink") or {}).get("path"))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ReplayError(f"{self.path} is not a replay checkpoint: give another "
                              "--checkpoint file") from None
        if epoch != self.epoch:
            raise ReplayError(f"the checkpoint {self.path} belongs to another log (epoch "
                              f"{epoch}, this one is {self.epoch}): give another --checkpoint "
                              "file")
        if options["output"] != self.options["output"]:
            raise ReplayError(f"the checkpoint {self.path} goes on writing "
                              f"{options['output'] or 'stdout'}, not "
                              f"{self.options['output'] or 'stdout'}: give that file (a "
                              "relative path is taken from the folder the command runs in), or "
                              "another --checkpoint file", 2)
        if options != self.options:
            differ = ", ".join(f"{k}: {options.get(k)!r} then, {v!r} now"
                               for k, v in self.options.items() if options.get(k) != v)
            raise ReplayError(f"the checkpoint {self.path} was made with other options "
                              f"({differ}): run with the same options, or give another "
                              "--checkpoint file", 2)
        self.position = position
        self.resumed = dict(saved.get("sink") or {})

    def save(self, sink: Sink) -> None:
        if self.path is None:
            return
        body = {"epoch": self.epoch, "options": self.options, "position": self.position,
                "sink": sink.state()}
        write_atomically(self.path, json.dumps(body, indent=1) + "\n")


def open_source(args: argparse.Namespace, database_url: str) -> Source:
    if args.url:
        token = os.environ.get("SIGNALBOX_TOKEN", "").strip()
        if not token:
            raise ReplayError("set SIGNALBOX_TOKEN to a token with scope read to use --url", 2)
        return ServerSource(args.url, token)
    return DatabaseSource(args.database_url or database_url)


def handler_of(args: argparse.Namespace) -> Handler | None:
    if not args.handler:
        return None
    try:
        return load_handler(args.handler)
    except ValueError as exc:
        raise ReplayError(str(exc), 2) from None


def make_sink(args: argparse.Namespace, source: Source, resume: dict[str, Any] | None,
              handler: Handler | None) -> Sink:
    """The sink of the mode the options ask for."""
    state = resume or {}
    paced = args.speed is not None
    mode = mode_of(args)

    def lines_to(path: Path | None) -> LineFile:
        return LineFile(path, resume, flush_each=paced, checkpoint=args.checkpoint)

    if mode == "handler":
        assert handler is not None
        settings = Settings(**{n: getattr(args, n) for n, _, _ in HANDLER_SETTINGS
                               if getattr(args, n) is not None})
        secret = settings.forward_secret.get_secret_value() if settings.forward_secret else None
        policy = AttemptPolicy(
            settings.handler_attempts, settings.handler_backoff, timeout=settings.handler_timeout,
            options={"forward_url": settings.forward_url, "forward_secret": secret,
                     "forward_timeout": settings.forward_timeout})
        report = lines_to(args.report)
        return DryRun(args.handler, handler, policy, default_max_lag=settings.max_lag,
                      source=source, report=report, resume=state)
    if mode == "renormalize":
        applier = None
        if args.apply:
            applier = Applier(args.url, os.environ.get("SIGNALBOX_TOKEN", "").strip())
        max_lag = args.max_lag if args.max_lag is not None else Settings().max_lag
        changes = lines_to(args.report) if args.report else None
        return Renormalize(changes, state, default_max_lag=max_lag, applier=applier)
    if mode == "post":
        return Post(args.post, state)
    return Emit(lines_to(args.output), state)


async def _replay(args: argparse.Namespace, database_url: str) -> int:
    selection = selection_of(args)
    handler = handler_of(args)  # bad usage is told before anything is read
    source = open_source(args, database_url)
    try:
        checkpoint = Checkpoint(args.checkpoint, await source.epoch(), identity(args, selection))
        checkpoint.load()
        head = await source.recorded_head()
        sink = make_sink(args, source, checkpoint.resumed, handler)
        progress = Progress(not args.quiet and sys.stderr.isatty(), selection, head,
                            checkpoint.position)
        try:
            await _run(source, selection, sink, checkpoint=checkpoint, pacer=Pacer(args.speed),
                       progress=progress)
        finally:
            progress.close()
            try:
                checkpoint.save(sink)  # what is flushed: a broken pipe leaves the last one
            finally:
                await sink.close()
        summary = sink.summary()
        if summary:
            print(summary, flush=True)
        return 0
    except SignalboxError as exc:
        raise ReplayError(exc.message) from None
    finally:
        await source.close()


async def _run(source: Source, selection: Selection, sink: Sink, *, checkpoint: Checkpoint,
               pacer: Pacer, progress: Progress) -> None:
    async for page in source.after(checkpoint.position, selection):
        await sink.prepare(page)
        for event in page:
            await pacer.wait(event.time)
            await sink.put(event)
            checkpoint.position = event.position
            progress.step(event.position)
        checkpoint.save(sink)


class Pacer:
    """Sleeps so that event k goes out at start + (time_k - time_first) / speed."""

    def __init__(self, speed: float | None) -> None:
        self.speed = speed
        self.origin: tuple[float, float] | None = None  # (monotonic, recorded) of the first

    async def wait(self, recorded: str) -> None:
        if self.speed is None:
            return
        moment = datetime.fromisoformat(recorded).timestamp()
        if self.origin is None:
            self.origin = (time.monotonic(), moment)
            return
        due = self.origin[0] + (moment - self.origin[1]) / self.speed
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


class Progress:
    """One line on a terminal: a bar, the count, the rate and (when the range's end is known)
    the time left, estimated from the share of the position range covered."""

    WIDTH = 24

    def __init__(self, enabled: bool, selection: Selection, head: int | None,
                 done: int) -> None:
        self.enabled = enabled
        self.first = max(selection.first, done + 1)
        ends = [p for p in (selection.last, head) if p is not None]
        self.last = min(ends) if ends else None
        self.count = 0
        self.position = done
        self.started = self.shown = time.monotonic()

    def step(self, position: int) -> None:
        self.count += 1
        self.position = position
        now = time.monotonic()
        if self.enabled and now - self.shown >= 0.1:
            self.shown = now
            self._show(position, now - self.started)

    def _show(self, position: int, elapsed: float) -> None:
        rate = self.count / max(elapsed, 1e-9)
        line = f"{self.count:,} events  {rate:,.0f}/s"
        if self.last is not None and self.last >= self.first:
            share = min(1.0, (position - self.first + 1) / (self.last - self.first + 1))
            filled = round(share * self.WIDTH)
            left = elapsed * (1 - share) / share if share > 0 else 0.0
            line = (f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {share:4.0%}  {line}  "
                    f"ETA {int(left) // 60}:{int(left) % 60:02d}")
        sys.stderr.write(f"\r{line}\x1b[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.count:
            self._show(self.position, time.monotonic() - self.started)
            sys.stderr.write("\n")
            sys.stderr.flush()
