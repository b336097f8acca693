"""Where replay and audit read the log: a database (SELECTs only) or a server's HTTP API.

Both read in pages, oldest first, so that memory does not grow with the log. A
:class:`Selection` (a position range, a time range, an event filter) is pushed down where the
source can apply it (SQL conditions; the API's ``type``/``ticker``/``strategy`` parameters) and
checked again on every event read, so both sources select exactly the same events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from sqlalchemy import ColumnElement, Row, select
from sqlalchemy.ext.asyncio import AsyncEngine

from pipeline.errors import SignalboxError
from pipeline.log.backends import Engines, backend_kind, create_engines, sqlite_path
from pipeline.log.model import Event, EventFilter, canonical_json
from pipeline.log.schema import events, log_head
from pipeline.log.store import EVENT_COLUMNS, filter_clauses
from replay._http import UNAVAILABLE, USER_AGENT, Backoff, retry_after

PAGE = 2000
SERVER_PAGE = 1000  # the most the API gives at once
READ_RETRIES = 8
READ_BACKOFF = Backoff(base=0.5, cap=5.0)  # 8 tries wait some 14 s in all: a restart's time
STATUS_TYPES = ("signal.dispatched", "signal.processing", "signal.processed", "signal.failed",
                "signal.expired")


class SourceError(SignalboxError):
    """The log could not be read: unreachable server, refused token, no log there."""

    code = "source_failed"


@dataclass(frozen=True)
class Selection:
    """Which events to read: positions ``first..last`` (both included), times ``since`` (included)
    to ``until`` (excluded) as RFC 3339 text in the log's own format, and an event filter."""

    first: int = 1
    last: int | None = None
    since: str | None = None
    until: str | None = None
    filter: EventFilter = field(default_factory=EventFilter)

    def matches(self, event: Event) -> bool:
        return (event.position >= self.first
                and (self.last is None or event.position <= self.last)
                and self.within(event.time)
                and self.filter.matches(event))

    def within(self, time: str) -> bool:
        """Whether ``time`` (in the log's format) is in ``since..until``."""
        return ((self.since is None or time >= self.since)
                and (self.until is None or time < self.until))

    def clauses(self) -> list[ColumnElement[bool]]:
        found = filter_clauses(self.filter)
        if self.last is not None:
            found.append(events.c.position <= self.last)
        return found + self.window(events.c.time)

    def window(self, column: Any) -> list[ColumnElement[bool]]:
        """``since..until`` as SQL conditions on a time column of the log's tables."""
        # The log's times are fixed-width UTC text: text order is time order.
        found: list[ColumnElement[bool]] = []
        if self.since is not None:
            found.append(column >= self.since)
        if self.until is not None:
            found.append(column < self.until)
        return found


EVERYTHING = Selection()


class Source(Protocol):
    async def epoch(self) -> str:
        """The log's epoch: positions mean something only together with it."""

    async def recorded_head(self) -> int | None:
        """The head position the log itself records (None when the source cannot tell)."""

    def after(self, position: int,
              selection: Selection = EVERYTHING) -> AsyncIterator[list[Event]]:
        """Pages of the selected events after ``position``, oldest first, until the end."""

    async def statuses(self, signals: Mapping[str, int]) -> dict[str, Event]:
        """The last status event (``signal.processing``, ``processed``, …) of each signal, given
        as ``{signal_id: position of its signal.accepted}``; signals without one are left out."""

    async def close(self) -> None: ...


def reader_engines(url: str) -> Engines:
    """Engines that read the log at ``url``: a mistyped SQLite path is told, not created as an
    empty database (these commands only read)."""
    path = sqlite_path(url) if backend_kind(url) == "sqlite" else None
    if path is not None and not path.exists():
        raise SourceError(f"there is no database at {path}: check --database-url")
    return create_engines(url, reader_pool=1)


async def keyset_pages(engine: AsyncEngine, columns: Sequence[Any], key: Any,
                       where: Sequence[ColumnElement[bool]],
                       after: Any = 0) -> AsyncIterator[Sequence[Row[Any]]]:
    """The rows of ``columns`` (``key`` among them) that meet ``where``, in ``key`` order after
    ``after``, a page at a time: each page a query of its own after the last key seen, whose
    connection goes back to the pool before the page is handed on (the caller may need it)."""
    key_index = list(columns).index(key)
    while True:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(*columns).where(key > after, *where)
                                       .order_by(key).limit(PAGE))).all()
        if not rows:
            return
        yield rows
        after = rows[-1][key_index]


def _last_status(found: dict[str, Event], page: Iterable[Event]) -> None:
    for event in page:
        signal_id = event.data.get("signal_id")
        if isinstance(signal_id, str):
            found[signal_id] = event


class DatabaseSource:
    """The log's tables, read with SELECTs only (safe while a server writes to them)."""

    def __init__(self, url: str) -> None:
        self.engines = reader_engines(url)

    async def epoch(self) -> str:
        async with self.engines.reader.connect() as conn:
            value = (await conn.execute(select(log_head.c.epoch))).scalar_one_or_none()
        if value is None:
            raise SourceError("the database holds no log: check --database-url")
        return str(value)

    async def recorded_head(self) -> int | None:
        async with self.engines.reader.connect() as conn:
            value = (await conn.execute(select(log_head.c.position))).scalar_one_or_none()
        return None if value is None else int(value)

    async def after(self, position: int,
                    selection: Selection = EVERYTHING) -> AsyncIterator[list[Event]]:
        async for rows in keyset_pages(self.engines.reader, EVENT_COLUMNS, events.c.position,
                                       selection.clauses(),
                                       after=max(position, selection.first - 1)):
            selected = [e for e in (Event(*row) for row in rows) if selection.matches(e)]
            if selected:
                yield selected

    async def statuses(self, signals: Mapping[str, int]) -> dict[str, Event]:
        found: dict[str, Event] = {}
        ids = list(signals)
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            async with self.engines.reader.connect() as conn:
                rows = (await conn.execute(
                    select(*EVENT_COLUMNS).where(
                        events.c.stream.in_([f"signal-{i}" for i in chunk]),
                        events.c.type.in_(STATUS_TYPES),
                        events.c.position > min(signals[i] for i in chunk))
                    .order_by(events.c.position))).all()
            _last_status(found, (Event(*row) for row in rows))
        return found

    async def close(self) -> None:
        await self.engines.dispose()


async def get_patiently(http: httpx.AsyncClient, path: str, params: Any, *,
                        retries: int = READ_RETRIES) -> httpx.Response:
    """``GET path``, tried again after a lost connection, a 503 or a reverse proxy's 502 or
    504 (a server restarting behind it), after the answer's ``Retry-After`` when it has one:
    a long read should not fail for a moment's absence. The last answer is returned (the
    caller reads its error); the last lost connection is raised."""
    for attempt in range(retries + 1):
        try:
            response = await http.get(path, params=params)
        except httpx.TransportError:
            if attempt == retries:
                raise
            wait = READ_BACKOFF.delay(attempt)
        else:
            if response.status_code not in UNAVAILABLE or attempt == retries:
                return response
            asked = retry_after(response)
            wait = READ_BACKOFF.delay(attempt) if asked is None else min(asked, 30.0)
        await asyncio.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


class ServerSource:
    """A server's ``GET /api/events`` (scope read). Its events come decoded; their canonical
    encoding, which the hash covers, is computed again."""

    def __init__(self, url: str, token: str, *, retries: int = READ_RETRIES) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, timeout=30, headers={
            "Authorization": f"Bearer {token}", "User-Agent": USER_AGENT})
        self.retries = retries
        self._epoch: str | None = None
        self._head: int | None = None

    async def epoch(self) -> str:
        if self._epoch is None:
            await self._page([("after", 0), ("limit", 1)])
        assert self._epoch is not None
        return self._epoch

    async def recorded_head(self) -> int | None:
        return self._head

    async def after(self, position: int,
                    selection: Selection = EVERYTHING) -> AsyncIterator[list[Event]]:
        position = max(position, selection.first - 1)
        wanted = selection.filter
        params = [("type", t) for t in wanted.types] + [("stream", s) for s in wanted.streams]
        params += [("ticker", t) for t in wanted.tickers]
        params += [("strategy", s) for s in wanted.strategies]
        while selection.last is None or position < selection.last:
            page = await self._page([("after", position), ("limit", SERVER_PAGE), *params])
            if not page["events"]:
                return
            found = [_event(e) for e in page["events"]]
            selected = [e for e in found if selection.matches(e)]
            if selected:
                yield selected
            position = int(page["next"])

    async def statuses(self, signals: Mapping[str, int]) -> dict[str, Event]:
        found: dict[str, Event] = {}
        ids = list(signals)
        for start in range(0, len(ids), 40):  # 40 streams keep the URL short
            chunk = ids[start:start + 40]
            after = min(signals[i] for i in chunk)
            params = [("type", ",".join(STATUS_TYPES)),
                      ("stream", ",".join(f"signal-{i}" for i in chunk))]
            while True:
                page = await self._page([("after", after), ("limit", SERVER_PAGE), *params])
                if not page["events"]:
                    break
                _last_status(found, (_event(e) for e in page["events"]))
                after = int(page["next"])
        return found

    async def _page(self, params: list[tuple[str, Any]]) -> dict[str, Any]:
        """One ``GET /api/events`` (see `get_patiently` for what is tried again)."""
        try:
            response = await get_patiently(self.http, "/api/events", params,
                                           retries=self.retries)
        except httpx.TransportError as exc:
            raise SourceError(f"could not reach {self.url}: {exc!r}") from exc
        if response.status_code != 200:
            raise _refusal(self.url, response)
        return self._read(response.json())

    def _read(self, page: dict[str, Any]) -> dict[str, Any]:
        epoch = str(page["epoch"])
        if self._epoch is not None and epoch != self._epoch:
            raise SourceError(f"the log at {self.url} changed its epoch from {self._epoch} to "
                              f"{epoch} while it was read: it is another log now")
        self._epoch = epoch
        self._head = int(page["head"])
        return page

    async def close(self) -> None:
        await self.http.aclose()


def _event(e: dict[str, Any]) -> Event:
    return Event.decoded(e["position"], e["id"], e["stream"], e["type"],
                         canonical_json(e["data"]), canonical_json(e["meta"]), e["time"],
                         e["hash"], e["data"], e["meta"])


def _refusal(url: str, response: httpx.Response) -> SourceError:
    try:
        body = response.json()
        code, message = str(body["error"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code, message = f"http_{response.status_code}", response.text[:200]
    hint = ""
    if response.status_code in (401, 403):
        hint = ": set SIGNALBOX_TOKEN to a token with scope read"
    return SourceError(f"{url} refused to give its events (HTTP {response.status_code} "
                       f"{code}: {message}){hint}")
