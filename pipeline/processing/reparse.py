"""Recorded bodies read again with today's parsers: which signals would now read differently.

A ``signal.received`` event keeps the body as it came (secrets stripped) and the route it came
by. :func:`reparse` gives it to that route's parser as of the moment it was received (expiry is
judged against the received time, not today), and :func:`compare` sets the result beside the
verdict recorded then (``signal.accepted`` or ``signal.rejected``). Both the offline command
(``signalbox replay --renormalize``) and the server (which appends ``signal.renormalized``) use
them, so they cannot disagree on what changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from pipeline.errors import NotFound
from pipeline.log import Event, EventFilter, EventLog, NewEvent, Transaction
from pipeline.log.model import canonical_json
from pipeline.log.schema import events
from pipeline.processing.projection import EventType, SignalRows, fold, stream_of
from pipeline.signals import (
    API_JSON,
    BodyFormat,
    ParsedBody,
    SignalError,
    SignalErrorCode,
    parse_api_signal,
    parse_tradingview,
)
from pipeline.textformats import parse_time


@dataclass(frozen=True)
class Reading:
    """What a body was read as: ``accepted`` with its signal, or ``rejected`` with errors."""

    status: str
    signal: dict[str, Any] | None = None
    errors: tuple[dict[str, Any], ...] = ()

    @classmethod
    def recorded(cls, verdict: Event) -> Reading:
        if verdict.type == EventType.ACCEPTED:
            return cls("accepted", dict(verdict.data.get("signal") or {}))
        return cls("rejected", errors=tuple(verdict.data.get("errors") or ()))

    @classmethod
    def parsed(cls, parsed: ParsedBody) -> Reading:
        if parsed.signal is not None and not parsed.errors:
            # Through the log's own encoding, as the recorded one went: 1.50 reads as 1.5 both.
            signal: dict[str, Any] = json.loads(canonical_json(parsed.signal.to_data()))
            return cls("accepted", signal)
        return cls("rejected", errors=tuple(e.to_data() for e in parsed.errors))

    def reasons(self) -> set[tuple[str, str | None]]:
        """The rejection's errors as (code, field): their wording may change, not their sense."""
        return {(str(e.get("code")), e.get("field")) for e in self.errors}

    def to_data(self) -> dict[str, Any]:
        if self.status == "accepted":
            return {"status": self.status, "signal": self.signal}
        return {"status": self.status, "errors": list(self.errors)}


@dataclass(frozen=True)
class Change:
    """A signal whose body today's parsers read differently from the recorded verdict."""

    signal_id: str
    position: int  # of its signal.received
    recorded: Reading
    now: Reading
    fields: list[dict[str, Any]] = field(default_factory=list)  # {"field", "recorded", "now"}

    @property
    def kind(self) -> str:
        """``accepted->rejected``, ``rejected->accepted``, or ``values`` (same verdict)."""
        if self.recorded.status != self.now.status:
            return f"{self.recorded.status}->{self.now.status}"
        return "values"

    def to_data(self) -> dict[str, Any]:
        return {"signal_id": self.signal_id, "position": self.position, "kind": self.kind,
                "recorded": self.recorded.to_data(), "now": self.now.to_data(),
                "fields": self.fields}

    def to_event_data(self) -> dict[str, Any]:
        """:meth:`to_data` with ``position`` named ``received_position``: the data of the
        ``signal.renormalized`` event that records the change."""
        data = self.to_data()
        return {"signal_id": data.pop("signal_id"), "received_position": data.pop("position"),
                **data}


def reparse(received: Event, *, default_max_lag: int | None) -> ParsedBody:
    """The recorded body through today's parser for its route, at the time it was received."""
    data = received.data
    body = data.get("body")
    if not isinstance(body, str):
        body = ""
    now = parse_time(received.time)
    if data.get("source") != "api":
        return parse_tradingview(body, now=now, default_max_lag=default_max_lag)
    try:
        value = API_JSON.decode(body)
    except (ValueError, RecursionError):
        # Never recorded by the API (it answers 400 before recording); a hand-made event.
        return ParsedBody(BodyFormat.JSON, {}, None, (SignalError(
            SignalErrorCode.INVALID_JSON, None, "the recorded body is not JSON"),), None, None)
    return parse_api_signal(value, now=now, default_max_lag=default_max_lag)


def compare(received: Event, verdict: Event, *, default_max_lag: int | None) -> Change | None:
    """The change today's parsers make to ``received``'s recorded verdict, or None."""
    recorded = Reading.recorded(verdict)
    now = Reading.parsed(reparse(received, default_max_lag=default_max_lag))
    signal_id = str(received.data.get("signal_id"))
    if recorded.status != now.status:
        return Change(signal_id, received.position, recorded, now)
    if now.status == "rejected":
        if recorded.reasons() == now.reasons():
            return None
        return Change(signal_id, received.position, recorded, now, [
            {"field": "errors", "recorded": sorted(map(_reason_text, recorded.reasons())),
             "now": sorted(map(_reason_text, now.reasons()))}])
    before, after = recorded.signal or {}, now.signal or {}
    fields = [{"field": name, "recorded": before.get(name), "now": after.get(name)}
              for name in sorted(before.keys() | after.keys())
              if before.get(name) != after.get(name)]
    return Change(signal_id, received.position, recorded, now, fields) if fields else None


def _reason_text(reason: tuple[str, str | None]) -> str:
    code, name = reason
    return f"{code}: {name}" if name else code


class Pairs:
    """Matches each ``signal.received`` with its verdict in a walk of the log, oldest first.

    Ingestion appends the two in one unit, one after the other, so at most a few received
    events wait for their verdict at any time: memory stays flat however long the log.
    """

    TYPES = (EventType.RECEIVED.value, EventType.ACCEPTED.value, EventType.REJECTED.value)

    def __init__(self) -> None:
        self.waiting: dict[str, Event] = {}

    def feed(self, event: Event) -> tuple[Event, Event] | None:
        """The (received, verdict) pair ``event`` completes, if it does."""
        if event.type == EventType.RECEIVED:
            self.waiting[event.stream] = event
            return None
        if event.type in (EventType.ACCEPTED, EventType.REJECTED):
            received = self.waiting.pop(event.stream, None)
            if received is not None:
                return received, event
        return None


@dataclass(frozen=True)
class Renormalized:
    """The server's answer to a re-normalization: the change (if any) and what was appended."""

    signal_id: str
    change: Change | None
    position: int | None  # of the signal.renormalized event that records the change

    def to_body(self, appended: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"signal_id": self.signal_id, "changed": self.change is not None,
                                "appended": appended, "position": self.position}
        if self.change is not None:
            body.update({k: v for k, v in self.change.to_event_data().items()
                         if k != "signal_id"})
        return body


async def record_renormalized(log: EventLog, signal_id: str, *,
                              default_max_lag: int | None) -> tuple[Renormalized, bool]:
    """Read ``signal_id``'s body again; when the reading changed, append it (once).

    Returns the outcome and whether this call appended the event: a repeat of a change
    already recorded appends nothing and names the event that recorded it.
    """
    stream = stream_of(signal_id)
    timeline = await log.read(0, 100, EventFilter.build(types=Pairs.TYPES, streams=[stream]))
    pairs = Pairs()
    found = next((p for p in map(pairs.feed, timeline) if p is not None), None)
    if found is None:
        raise NotFound(f"no signal {signal_id!r} with a recorded verdict: check the id")
    change = compare(*found, default_max_lag=default_max_lag)
    if change is None:
        return Renormalized(signal_id, None, None), False
    data = {**change.to_event_data(), "signal_id": signal_id}  # the stream's own id

    async def unit(tx: Transaction) -> tuple[Renormalized, bool]:
        # What earlier units of this group commit appended (a retry may share the batch of
        # the attempt it repeats), which a read of the database cannot see yet.
        batch: dict[str, tuple[int, Any]] = tx.local.setdefault("renormalized", {})
        if stream in batch:
            position, now = batch[stream]
        else:
            last = await tx.fetch_one(
                select(events.c.position, events.c.data)
                .where(events.c.stream == stream, events.c.type == EventType.RENORMALIZED.value)
                .order_by(events.c.position.desc()).limit(1))
            position, now = ((0, None) if last is None
                             else (int(last["position"]), json.loads(last["data"]).get("now")))
        if position and now == data["now"]:
            return Renormalized(signal_id, change, position), False
        rows = SignalRows(tx)
        row = await rows.get(signal_id)
        if row is None:
            raise NotFound(f"no signal {signal_id!r}: check the id")
        meta = {k: v for k, v in (("signal_id", signal_id), ("ticker", row["ticker"]),
                                  ("strategy", row["strategy"])) if v is not None}
        event = tx.append(NewEvent(stream, EventType.RENORMALIZED, data, meta))
        rows.update(fold(row, event))
        batch[stream] = (event.position, data["now"])
        return Renormalized(signal_id, change, event.position), True

    return await log.transact(unit)
