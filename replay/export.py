"""``signalbox audit export``: the events (or the signals projection) as JSON lines or CSV.

Read in pages from a database (SELECTs only) or a server's HTTP API, and written out page by
page: the memory used does not grow with the log. ``data`` and ``meta`` are written in their
canonical JSON encoding (the one the hash covers), as JSON in a JSON line and as a JSON string
in a CSV cell.
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator, Sequence
from typing import Any, TextIO

import httpx
import orjson

from pipeline.log.model import canonical_json
from pipeline.log.schema import events, signals
from pipeline.processing.projection import STEP_COLUMN
from replay.sources import Selection, get_patiently, keyset_pages, reader_engines

SERVER_EVENTS_PAGE = 1000
SERVER_SIGNALS_PAGE = 500

EVENT_COLUMNS = ("position", "id", "stream", "type", "time", "hash", "ticker", "strategy",
                 "data", "meta")
SIGNAL_COLUMNS = ("signal_id", "status", "source", "ticker", "strategy", "action",
                  "received_at", "updated_at", "first_position", "last_position", "claimed_by",
                  "attempts", "last_error", *STEP_COLUMN.values())

Row = tuple[Any, ...]


# -- sources -------------------------------------------------------------------------------
# A Selection's time range applies to the events' time, or to the signals' received_at.


async def database_events(url: str, selection: Selection) -> AsyncIterator[list[Row]]:
    """Rows in EVENT_COLUMNS order, ``data`` and ``meta`` as stored (canonical JSON).

    ``ticker`` and ``strategy`` are read from ``meta``: the table's columns of those names are
    copies made for filtering, cut to their width (100 and 200 characters) and without NUL."""
    stored = [name for name in EVENT_COLUMNS if name not in ("ticker", "strategy")]
    columns = [events.c[name] for name in stored]
    async for page in _pages(url, columns, events.c.position, selection.clauses()):
        yield [(*row[:6], *_copies(orjson.loads(row[7])), *row[6:]) for row in page]


def _copies(meta: dict[str, Any]) -> list[str | None]:
    """The ``ticker`` and ``strategy`` columns: those of ``meta`` when they are text."""
    return [value if isinstance(value := meta.get(k), str) else None
            for k in ("ticker", "strategy")]


async def database_signals(url: str, selection: Selection) -> AsyncIterator[list[Row]]:
    """Rows in SIGNAL_COLUMNS order, oldest first."""
    columns = [signals.c[name] for name in SIGNAL_COLUMNS]
    where = selection.window(signals.c.received_at)
    async for page in _pages(url, columns, signals.c.first_position, where):
        yield page


async def _pages(url: str, columns: Sequence[Any], key: Any,
                 where: list[Any]) -> AsyncIterator[list[Row]]:
    engines = reader_engines(url)
    try:
        async for rows in keyset_pages(engines.reader, columns, key, where):
            yield [tuple(row) for row in rows]
    finally:
        await engines.dispose()


async def server_events(http: httpx.AsyncClient,
                        selection: Selection) -> AsyncIterator[list[Row]]:
    """``GET /api/events`` page by page; the time window is applied here, the rest by the
    server."""
    after = 0
    while True:
        params: dict[str, Any] = {"after": after, "limit": SERVER_EVENTS_PAGE}
        if selection.filter.types:
            params["type"] = ",".join(selection.filter.types)
        if selection.filter.streams:
            params["stream"] = ",".join(selection.filter.streams)
        page = await _get(http, "/api/events", params)
        found = page["events"]
        yield [_event_row(e) for e in found if selection.within(e["time"])]
        if len(found) < SERVER_EVENTS_PAGE:
            return
        after = page["next"]


def _event_row(event: dict[str, Any]) -> Row:
    meta = event["meta"]
    return (event["position"], event["id"], event["stream"], event["type"], event["time"],
            event["hash"], *_copies(meta), canonical_json(event["data"]), canonical_json(meta))


async def server_signals(http: httpx.AsyncClient,
                         selection: Selection) -> AsyncIterator[list[Row]]:
    """``GET /api/signals`` page by page: newest first, the API's order."""
    before = 0
    while True:
        params: dict[str, Any] = {"limit": SERVER_SIGNALS_PAGE}
        if before:
            params["before"] = before
        page = await _get(http, "/api/signals", params)
        yield [_signal_row(s) for s in page["signals"] if selection.within(s["received_at"])]
        if page["next_before"] is None:
            return
        before = page["next_before"]


def _signal_row(summary: dict[str, Any]) -> Row:
    steps = summary.get("steps") or {}
    values = {**summary, "first_position": summary["position"],
              **{f"{status}_at": time for status, time in steps.items()}}
    return tuple(values.get(name) for name in SIGNAL_COLUMNS)


class ServerError(Exception):
    """The server answered with an error: the message is its code and message."""


async def _get(http: httpx.AsyncClient, path: str, params: dict[str, Any]) -> dict[str, Any]:
    response = await get_patiently(http, path, params)
    if response.status_code != 200:
        raise ServerError(error_text(response))
    body: dict[str, Any] = response.json()
    return body


def error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{body['error']}: {body['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code} from {response.request.url}"


# -- writers -------------------------------------------------------------------------------


def event_line(row: Row) -> str:
    """One event as a JSON object; ``data`` and ``meta`` inserted as stored."""
    fields = dict(zip(EVENT_COLUMNS[:8], row, strict=False))
    fields["data"], fields["meta"] = orjson.Fragment(row[8]), orjson.Fragment(row[9])
    return orjson.dumps(fields).decode()


def signal_line(row: Row) -> str:
    return orjson.dumps(dict(zip(SIGNAL_COLUMNS, row, strict=True))).decode()


async def write(pages: AsyncIterator[list[Row]], out: TextIO, fmt: str,
                columns: Sequence[str]) -> int:
    """Write every row of every page; the number of rows written."""
    count = 0
    line = event_line if columns is EVENT_COLUMNS else signal_line
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(columns)
    async for page in pages:
        if writer is not None:
            writer.writerows(["" if v is None else v for v in row] for row in page)
        else:
            out.writelines(line(row) + "\n" for row in page)
        count += len(page)
    return count
