"""Moments and spans as people write them: ``2026-11-20``, ``2026-11-20T08:00:00+01:00``, ``24h``.

The audit report (over HTTP and from the command line) and the export take the same forms, so
they share these parsers. A malformed value is a :class:`BadRequest` that names the parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from pipeline.errors import BadRequest

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SPAN = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
MOMENT_FORMS = ("ISO 8601 (2026-11-20, 2026-11-20T08:00:00Z; UTC when no offset is given) "
                "or a span before now such as 90m, 24h, 7d")
SPAN_FORMS = "a number with a unit such as 90s, 15m, 2h, 7d, 1w (seconds without a unit)"


def parse_span(text: str, name: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``7d``, ``1w``, or a plain number of seconds."""
    match = _SPAN.fullmatch(text.strip().lower())
    if match is None:
        raise BadRequest(f"{name}: {text!r} is not a span of time: give {SPAN_FORMS}")
    number, unit = match.groups()
    try:
        return timedelta(seconds=float(number) * UNITS[unit or "s"])
    except OverflowError:
        raise BadRequest(f"{name}: {text!r} is longer than any span of time this can "
                         f"measure: give {SPAN_FORMS}") from None


def parse_moment(text: str, name: str, now: datetime) -> datetime:
    """An ISO 8601 date or date-time (UTC without an offset), ``now``, or a span before now."""
    value = text.strip()
    if value.lower() == "now":
        return now
    try:
        if _SPAN.fullmatch(value.lower()) and value[-1:].isalpha():
            return now - parse_span(value, name)
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        moment = datetime.fromisoformat(value)
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except ValueError:
        raise BadRequest(f"{name}: {text!r} is not a time: give {MOMENT_FORMS}") from None
    except OverflowError:  # before year 1 or after 9999, once in UTC
        raise BadRequest(f"{name}: {text!r} is out of range: give a time between the years "
                         "1 and 9999 in UTC") from None


@dataclass(frozen=True)
class Window:
    """``since`` (included) to ``until`` (excluded), in UTC."""

    since: datetime
    until: datetime

    @classmethod
    def parse(cls, since: str | None, until: str | None, now: datetime,
              default_span: timedelta) -> Window:
        """Both ends as given; ``until`` defaults to now, ``since`` to ``default_span`` before
        ``until``."""
        end = parse_moment(until, "until", now) if until else now
        try:
            start = parse_moment(since, "since", now) if since else end - default_span
        except OverflowError:
            raise BadRequest(f"until ({end.isoformat()}) leaves no room for the default "
                             "span before it: give since too") from None
        if start >= end:
            raise BadRequest(f"since ({start.isoformat()}) must be before until "
                             f"({end.isoformat()})")
        return cls(start, end)
