"""The audit report over the signals received in a window: what became of them, how long it took.

One computation, used by ``GET /api/audit/report`` and by ``signalbox audit report`` on a
database, so that both give the same JSON. Its memory does not depend on the window: counts and
maxima are aggregated in SQL; each percentile is read in SQL as the value at its rank among the
durations sorted by the database (the *nearest-rank* definition: p95 of n durations is the
``ceil(0.95 n)``-th smallest), so the figures are exact and only a handful of rows ever reach
Python. Rejection reasons are counted from the ``signal.rejected`` events read in pages; there
are only as many counters as there are error codes. All queries read one snapshot.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    TIMESTAMP,
    BigInteger,
    ColumnElement,
    Integer,
    String,
    case,
    cast,
    distinct,
    extract,
    func,
    literal,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from pipeline.log import format_time
from pipeline.log.schema import events, signals
from pipeline.processing.projection import FINAL, REPORTABLE, STEP_COLUMN, EventType, Status
from pipeline.processing.window import Window, parse_span

PERCENTILES = (50, 95, 99)
STUCK_LISTED = 100
"""At most this many stuck signals are listed (oldest first); ``total`` counts them all."""
PAGE = 1000
NOT_FINAL = tuple(s.value for s in Status if s not in FINAL)


@dataclass(frozen=True)
class ReportQuery:
    window: Window
    stuck_after: timedelta
    now: datetime


async def build_report(engine: AsyncEngine, query: ReportQuery) -> dict[str, Any]:
    """The report as the JSON object that the route answers and ``--json`` prints."""
    async with engine.connect() as conn:
        # Every query of the report reads one snapshot of the log, whatever commits meanwhile.
        if conn.dialect.name == "postgresql":
            await conn.execution_options(isolation_level="REPEATABLE READ")
        else:
            await conn.exec_driver_sql("BEGIN")  # a WAL read transaction: one snapshot
        in_window = _in_window(query.window)
        statuses = await _statuses(conn, in_window)
        return {
            "since": format_time(query.window.since),
            "until": format_time(query.window.until),
            "generated_at": format_time(query.now),
            "signals": sum(statuses.values()),
            "statuses": statuses,
            "rejections": await _rejections(conn, query.window),
            "duplicates": await _duplicates(conn, in_window),
            "timings": await _timings(conn, in_window),
            "stuck": await _stuck(conn, in_window, query),
        }


def _in_window(window: Window) -> list[ColumnElement[bool]]:
    # Times are stored as fixed-width UTC text: text order is time order.
    return [signals.c.received_at >= format_time(window.since),
            signals.c.received_at < format_time(window.until)]


async def _statuses(conn: AsyncConnection, in_window: list[ColumnElement[bool]]) -> dict[str, int]:
    rows = (await conn.execute(select(signals.c.status, func.count())
                               .where(*in_window).group_by(signals.c.status))).all()
    counts = dict.fromkeys((s.value for s in Status), 0)
    counts.update({str(status): int(n) for status, n in rows})
    return counts


async def _rejections(conn: AsyncConnection, window: Window) -> dict[str, Any]:
    """Signals rejected, by error code. A ``signal.rejected`` is committed with its
    ``signal.received``, at the same time: the window applies to its time as it is."""
    reasons: Counter[str] = Counter()
    after, rejected = 0, 0
    while True:
        rows = (await conn.execute(
            select(events.c.position, events.c.data)
            .where(events.c.type == EventType.REJECTED, events.c.position > after,
                   events.c.time >= format_time(window.since),
                   events.c.time < format_time(window.until))
            .order_by(events.c.position).limit(PAGE))).all()
        for _, data in rows:
            errors = json.loads(data).get("errors") or []
            rejected += 1
            reasons.update({str(e.get("code")) for e in errors if isinstance(e, dict)})
        if len(rows) < PAGE:
            return {"signals": rejected, "reasons": dict(reasons.most_common())}
        after = rows[-1][0]


async def _duplicates(conn: AsyncConnection,
                      in_window: list[ColumnElement[bool]]) -> dict[str, int]:
    """Repeats of the signals received in the window (recorded on the original's stream)."""
    streams = select(literal("signal-", String) + signals.c.signal_id).where(*in_window)
    count, repeated = (await conn.execute(
        select(func.count(), func.count(distinct(events.c.stream)))
        .where(events.c.type == EventType.DUPLICATE, events.c.stream.in_(streams)))).one()
    return {"events": int(count), "signals": int(repeated)}


def _micros(moment: ColumnElement[Any], dialect: str) -> ColumnElement[int]:
    """Microseconds since received, exactly, from the stored text times."""
    start = signals.c.received_at
    if dialect == "postgresql":
        interval = cast(moment, TIMESTAMP(timezone=True)) - cast(start, TIMESTAMP(timezone=True))
        return cast(extract("epoch", interval) * 1_000_000, BigInteger)

    def whole_seconds(text: ColumnElement[Any]) -> ColumnElement[int]:
        return cast(func.strftime("%s", func.substr(text, 1, 19)), Integer)

    def fraction(text: ColumnElement[Any]) -> ColumnElement[int]:
        return cast(func.substr(text, 21, 6), Integer)

    return ((whole_seconds(moment) - whole_seconds(start)) * 1_000_000
            + fraction(moment) - fraction(start))


async def _timings(conn: AsyncConnection,
                   in_window: list[ColumnElement[bool]]) -> dict[str, dict[str, Any]]:
    dialect = conn.dialect.name
    steps = [(status.value, signals.c[STEP_COLUMN[status]]) for status in REPORTABLE]
    aggregates = [f(arg) for _, column in steps
                  for f, arg in ((func.count, column), (func.max, _micros(column, dialect)))]
    row = (await conn.execute(select(*aggregates).where(*in_window))).one()
    timings: dict[str, dict[str, Any]] = {}
    for i, (name, column) in enumerate(steps):
        count, longest = int(row[2 * i]), row[2 * i + 1]
        figures: dict[str, Any] = {"count": count}
        ranks = {p: max(1, (p * count + 99) // 100) for p in PERCENTILES}
        at_rank = await _at_ranks(conn, _micros(column, dialect),
                                  [*in_window, column.is_not(None)], set(ranks.values()))
        for p, rank in ranks.items():
            figures[f"p{p}"] = _seconds(at_rank.get(rank))
        figures["max"] = _seconds(longest)
        timings[name] = figures
    return timings


async def _at_ranks(conn: AsyncConnection, duration: ColumnElement[int],
                    where: list[ColumnElement[bool]], ranks: set[int]) -> dict[int, int]:
    """The durations at the given ranks (1 = the shortest), sorted by the database."""
    durations = select(duration.label("d")).where(*where).subquery()
    ranked = select(durations.c.d,
                    func.row_number().over(order_by=durations.c.d).label("rn")).subquery()
    rows = (await conn.execute(select(ranked.c.rn, ranked.c.d)
                               .where(ranked.c.rn.in_(sorted(ranks))))).all()
    return {int(rank): int(value) for rank, value in rows}


def _seconds(micros: Any) -> float | None:
    return None if micros is None else int(micros) / 1_000_000


async def _stuck(conn: AsyncConnection, in_window: list[ColumnElement[bool]],
                 query: ReportQuery) -> dict[str, Any]:
    """Signals still in a non-final status entered longer than ``stuck_after`` ago."""
    since = case((signals.c.status == Status.DISPATCHED, signals.c.dispatched_at),
                 (signals.c.status == Status.PROCESSING, signals.c.processing_at),
                 else_=signals.c.received_at)
    where = [*in_window, signals.c.status.in_(NOT_FINAL),
             since < format_time(query.now - query.stuck_after)]
    total = (await conn.execute(select(func.count()).where(*where)
                                .select_from(signals))).scalar_one()
    rows = (await conn.execute(
        select(signals.c.signal_id, signals.c.status, since.label("since"), signals.c.ticker,
               signals.c.claimed_by)
        .where(*where).order_by(since, signals.c.first_position).limit(STUCK_LISTED))).all()
    return {
        "after_seconds": query.stuck_after.total_seconds(),
        "total": int(total),
        "signals": [{"signal_id": r.signal_id, "status": r.status, "since": r.since,
                     "ticker": r.ticker, "claimed_by": r.claimed_by} for r in rows],
    }


DEFAULT_SPAN = timedelta(hours=24)
"""The window when ``since`` is not given: the day before ``until``."""


def report_query(since: str | None, until: str | None, stuck_after: str | None,
                 default_stuck_after: float, now: datetime) -> ReportQuery:
    """The query from its parameters as given (HTTP or the command line); BadRequest if bad."""
    stuck = (parse_span(stuck_after, "stuck_after") if stuck_after
             else timedelta(seconds=default_stuck_after))
    return ReportQuery(Window.parse(since, until, now, DEFAULT_SPAN), stuck, now)
