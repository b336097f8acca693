"""A signal's timeline: every event of its stream, oldest first, with the time each step took.

Built from the events as ``GET /api/signals/{id}`` returns them or as read from the database,
so both sources give the same timeline.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy import select

from pipeline.log import Event
from pipeline.log.schema import events, signals
from pipeline.log.store import EVENT_COLUMNS
from pipeline.processing.projection import EventType, stream_of
from replay.sources import reader_engines

MAX_EVENTS = 10_000
"""As many events of one signal as the API returns (a signal has a handful)."""

_RECEIVED_FACTS = ("source", "format", "token", "remote_addr", "idempotency_key")
_STATUS_FACTS = ("consumer", "attempt", "detail")


def essentials(event: dict[str, Any]) -> dict[str, Any]:
    """What matters in an event of this type (the whole event stays in the log)."""
    data = event.get("data") or {}
    kind = event.get("type")
    if kind == EventType.ACCEPTED:
        return {"signal": data.get("signal")}
    if kind == EventType.REJECTED:
        return {"errors": data.get("errors")}
    names = _RECEIVED_FACTS if kind in (EventType.RECEIVED, EventType.DUPLICATE) else (
        _STATUS_FACTS)
    return {name: data[name] for name in names if data.get(name) not in (None, {}, "")}


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


def build_timeline(signal_id: str, status: str | None, found: list[dict[str, Any]],
                   truncated: bool = False) -> dict[str, Any]:
    """The timeline as ``--json`` prints it; times between steps in seconds. ``truncated``:
    ``found`` is the signal's first :data:`MAX_EVENTS` events, not all of them."""
    received = next((e for e in found if e["type"] == EventType.RECEIVED), found[0])
    start = _moment(received["time"])
    previous: datetime | None = None
    steps = []
    for event in found:
        moment = _moment(event["time"])
        steps.append({
            "position": event["position"],
            "time": event["time"],
            "type": event["type"],
            "since_previous": None if previous is None else (moment - previous).total_seconds(),
            "since_received": (moment - start).total_seconds(),
            "details": essentials(event),
        })
        previous = moment
    return {"signal_id": signal_id, "status": status, "received_at": received["time"],
            "events": steps, "truncated": truncated}


def human(seconds: float) -> str:
    """A span in the unit that suits it: 340 µs, 12.5 ms, 4.21 s, 3 min 12 s, 2 h 5 min, 3 d 4 h."""
    sign, value = ("-" if seconds < 0 else ""), abs(seconds)
    if value < 1e-3:
        text = f"{value * 1e6:.0f} µs"
    elif value < 1:
        text = f"{value * 1e3:.1f} ms"
    elif value < 60:
        text = f"{value:.2f} s"
    elif value < 3600:
        text = _two(int(value // 60), "min", int(value % 60), "s")
    elif value < 86400:
        text = _two(int(value // 3600), "h", int(value % 3600 // 60), "min")
    else:
        text = _two(int(value // 86400), "d", int(value % 86400 // 3600), "h")
    return sign + text


def _two(whole: int, unit: str, part: int, part_unit: str) -> str:
    return f"{whole} {unit}" + (f" {part} {part_unit}" if part else "")


def render(timeline: dict[str, Any]) -> str:
    """The timeline for people: one line per event, then its essentials."""
    found = timeline["events"]
    lines = [f"signal {timeline['signal_id']}: {timeline['status'] or 'unknown status'}, "
             f"{len(found)} event{'s' * (len(found) != 1)}, received {timeline['received_at']}",
             f"{'position':>9}  {'time':<27}  {'type':<18}  {'since previous':>14}  "
             f"{'since received':>14}"]
    for step in found:
        gap = "" if step["since_previous"] is None else "+" + human(step["since_previous"])
        lines.append(f"{step['position']:>9}  {step['time']:<27}  {step['type']:<18}  "
                     f"{gap:>14}  {human(step['since_received']):>14}")
        for name, value in step["details"].items():
            shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            lines.append(f"{'':>11}{name}: {shown}")
    if timeline.get("truncated"):
        lines.append(f"(the first {len(found):,} events only: signalbox tail --stream "
                     f"{stream_of(timeline['signal_id'])} prints them all)")
    return "\n".join(lines)


async def from_database(url: str,
                        signal_id: str) -> tuple[str | None, list[dict[str, Any]], bool]:
    """The signal's status, its first :data:`MAX_EVENTS` events and whether it has more, read
    with SELECTs only (no events: unknown id)."""
    engines = reader_engines(url)
    try:
        async with engines.reader.connect() as conn:
            rows = (await conn.execute(
                select(*EVENT_COLUMNS)
                .where(events.c.stream == stream_of(signal_id))
                .order_by(events.c.position).limit(MAX_EVENTS + 1))).all()
            status = (await conn.execute(select(signals.c.status)
                                         .where(signals.c.signal_id == signal_id))
                      ).scalar_one_or_none()
    finally:
        await engines.dispose()
    return status, [Event(*row).to_dict() for row in rows[:MAX_EVENTS]], len(rows) > MAX_EVENTS
