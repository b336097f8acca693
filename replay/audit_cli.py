"""``signalbox audit``: verify the log, a signal's timeline, the report, the export.

Each reads a database directly (SELECTs only; the server's ``SIGNALBOX_DATABASE_URL`` unless
``--database-url``) or, with ``--url``, a server's HTTP API with the token in
``SIGNALBOX_TOKEN`` (scope read). ``signalbox audit SIGNAL_ID`` is short for ``signalbox audit
timeline SIGNAL_ID``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import httpx

from pipeline.log import EventFilter, format_time, utc_now
from pipeline.processing.report import build_report, report_query
from pipeline.processing.window import parse_moment
from replay import export
from replay.audit import AuditError, run_verify
from replay.report_text import render_report
from replay.sources import Selection, get_patiently, reader_engines
from replay.timeline import build_timeline, from_database, render

COMMANDS = ("verify", "timeline", "report", "export")


def rewrite_argv(argv: Sequence[str]) -> list[str]:
    """``audit SIGNAL_ID …`` → ``audit timeline SIGNAL_ID …``; everything else as it is."""
    words = list(argv)
    if len(words) >= 2 and words[0] == "audit" and words[1] not in COMMANDS and (
            not words[1].startswith("-")):
        words.insert(1, "timeline")
    return words


def _source_flags(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--database-url", help="read the database directly (default: the "
                                              "server's SIGNALBOX_DATABASE_URL)")
    where.add_argument("--url", help="read a server's HTTP API instead (token from "
                                     "SIGNALBOX_TOKEN, scope read)")


def add_commands(commands: Any) -> None:
    """Register ``audit verify|timeline|report|export`` on the ``signalbox`` subparsers."""
    audit = commands.add_parser(
        "audit", help="check the log, follow a signal, report, export",
        description="signalbox audit SIGNAL_ID is short for signalbox audit timeline SIGNAL_ID")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    check = audit_commands.add_parser(
        "verify", help="walk the hash chain and the positions; name the first tampered one")
    _source_flags(check)
    check.add_argument("--from", dest="start", type=Path,
                       help="a verified head saved by an earlier run: check it, go on from it")
    check.add_argument("--save", type=Path, help="save the verified head to this file")
    check.add_argument("--json", action="store_true", help="print the report as JSON")

    timeline = audit_commands.add_parser(
        "timeline", help="everything that happened to one signal, with the time between steps")
    timeline.add_argument("signal_id")
    _source_flags(timeline)
    timeline.add_argument("--json", action="store_true", help="print the timeline as JSON")

    report = audit_commands.add_parser(
        "report", help="outcomes, rejections, duplicates, timings and stuck signals in a window")
    _source_flags(report)
    report.add_argument("--since", help="ISO 8601 or a span before now such as 24h, 7d "
                                        "(default: 24h before --until)")
    report.add_argument("--until", help="ISO 8601 or a span before now (default: now)")
    report.add_argument("--stuck-after", help="a signal in a non-final status for longer is "
                                              "stuck: 90s, 15m, 2h, 7d (default: the claim "
                                              "lease, SIGNALBOX_CLAIM_LEASE)")
    report.add_argument("--json", action="store_true",
                        help="print the JSON of GET /api/audit/report")

    dump = audit_commands.add_parser("export", help="events (or signals) as JSON lines or CSV")
    _source_flags(dump)
    dump.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    dump.add_argument("--since", help="ISO 8601 or a span before now (events: their time; "
                                      "signals: when received)")
    dump.add_argument("--until", help="ISO 8601 or a span before now (excluded)")
    dump.add_argument("--type", action="append", default=[], dest="types",
                      help="event type glob, e.g. signal.* (repeatable)")
    dump.add_argument("--stream", action="append", default=[], dest="streams",
                      help="a stream such as signal-ID (repeatable)")
    dump.add_argument("--signals", action="store_true",
                      help="the signals projection instead: one row per signal")
    dump.add_argument("--output", "-o", type=Path, help="write to this file (default: stdout)")


async def run(args: argparse.Namespace, database_url: str, claim_lease: float) -> int:
    """Run one ``audit`` command; 1 with one line on stderr when it cannot."""
    url = args.database_url or database_url
    try:
        if args.audit_command == "verify":
            return await run_verify(args, database_url)
        if args.audit_command == "timeline":
            return await run_timeline(args, url)
        if args.audit_command == "report":
            return await run_report(args, url, claim_lease)
        return await run_export(args, url)
    except (AuditError, export.ServerError) as exc:
        print(f"signalbox: {exc}", file=sys.stderr)
    except httpx.HTTPError as exc:
        print(f"signalbox: the server at {args.url} cannot be read: {exc!r}", file=sys.stderr)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and let nothing flush to it at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as exc:
        if exc.filename is None:
            raise  # the database's (a refused connection): the caller says so
        print(f"signalbox: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
    return 1


@asynccontextmanager
async def server(url: str) -> AsyncIterator[httpx.AsyncClient]:
    token = os.environ.get("SIGNALBOX_TOKEN", "").strip()
    if not token:
        raise AuditError("set SIGNALBOX_TOKEN to a token with scope read to use --url")
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        yield http


async def run_timeline(args: argparse.Namespace, url: str) -> int:
    signal_id = args.signal_id
    if args.url:
        async with server(args.url) as http:
            response = await get_patiently(http, f"/api/signals/{quote(signal_id, safe='')}",
                                           None)
        if response.status_code == 404:
            raise AuditError(f"no signal {signal_id!r} on {args.url}: check the id (the "
                             "signal_id a POST answered with)")
        if response.status_code != 200:
            raise AuditError(export.error_text(response))
        body = response.json()
        status, found, truncated = body["status"], body["events"], body.get("truncated") is True
    else:
        status, found, truncated = await from_database(url, signal_id)
        if not found:
            raise AuditError(f"no signal {signal_id!r} in the log: check the id (the "
                             "signal_id a POST answered with) and --database-url")
    timeline = build_timeline(signal_id, status, found, truncated)
    print(json.dumps(timeline, ensure_ascii=False) if args.json else render(timeline))
    return 0


async def run_report(args: argparse.Namespace, url: str, claim_lease: float) -> int:
    if args.url:
        params = {k: v for k, v in (("since", args.since), ("until", args.until),
                                    ("stuck_after", args.stuck_after)) if v}
        async with server(args.url) as http:
            response = await get_patiently(http, "/api/audit/report", params)
        if response.status_code != 200:
            raise AuditError(export.error_text(response))
        report: dict[str, Any] = response.json()
    else:
        query = report_query(args.since, args.until, args.stuck_after, claim_lease, utc_now())
        engines = reader_engines(url)
        try:
            report = await build_report(engines.reader, query)
        finally:
            await engines.dispose()
    print(json.dumps(report, ensure_ascii=False) if args.json else render_report(report))
    return 0


def _selection(args: argparse.Namespace) -> Selection:
    now = utc_now()
    since = parse_moment(args.since, "--since", now) if args.since else None
    until = parse_moment(args.until, "--until", now) if args.until else None
    if since is not None and until is not None and since >= until:
        raise AuditError("--since must be before --until")
    return Selection(since=None if since is None else format_time(since),
                     until=None if until is None else format_time(until),
                     filter=EventFilter.build(types=args.types, streams=args.streams))


async def run_export(args: argparse.Namespace, url: str) -> int:
    selection = _selection(args)
    if args.signals and not selection.filter.is_empty:
        raise AuditError("--type and --stream select events: leave them out with --signals")
    columns = export.SIGNAL_COLUMNS if args.signals else export.EVENT_COLUMNS
    out: TextIO = (args.output.open("w", encoding="utf-8", newline="") if args.output
                   else sys.stdout)
    try:
        if args.url:
            async with server(args.url) as http:
                pages = (export.server_signals(http, selection) if args.signals
                         else export.server_events(http, selection))
                count = await export.write(pages, out, args.format, columns)
        else:
            pages = (export.database_signals(url, selection) if args.signals
                     else export.database_events(url, selection))
            count = await export.write(pages, out, args.format, columns)
    finally:
        if args.output:
            out.close()
        else:
            out.flush()
    what = "signal" if args.signals else "event"
    print(f"exported {count:,} {what}{'s' * (count != 1)}", file=sys.stderr)
    return 0
