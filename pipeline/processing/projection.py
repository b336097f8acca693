"""The signals projection: one row per signal, folded from its events.

:func:`fold` is the only definition of what a row holds. Ingestion and status reports apply it
to the events they append, in the same transaction (through :class:`SignalRows`), and a rebuild
applies it to the whole log: so the live table and a rebuilt one cannot disagree.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from decimal import Decimal
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, bindparam, select

from pipeline.errors import IllegalTransition
from pipeline.log import Event, Transaction
from pipeline.log.model import safe_text
from pipeline.log.schema import signals
from pipeline.textformats import LONE_SURROGATE

Row = dict[str, Any]


class EventType(StrEnum):
    """The event types of a signal's stream, in the order of its life cycle."""

    RECEIVED = "signal.received"
    """the raw body as it came (secrets stripped) and facts about its source"""
    ACCEPTED = "signal.accepted"
    """the normalized signal"""
    REJECTED = "signal.rejected"
    """the validation errors"""
    DUPLICATE = "signal.duplicate"
    """a repeat of an already recorded signal arrived (and was not recorded again)"""
    DISPATCHED = "signal.dispatched"
    """handed to a consumer (may repeat: redelivery)"""
    PROCESSING = "signal.processing"
    """claimed by a consumer: nobody else may process it"""
    PROCESSED = "signal.processed"
    """done (final)"""
    FAILED = "signal.failed"
    """given up, with the error (final)"""
    EXPIRED = "signal.expired"
    """too old to act on when processing would have started (final)"""
    RENORMALIZED = "signal.renormalized"
    """today's parsers read the recorded body differently (the old verdict stands)"""


class Status(StrEnum):
    RECEIVED = "received"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DISPATCHED = "dispatched"
    PROCESSING = "processing"
    PROCESSED = "processed"
    FAILED = "failed"
    EXPIRED = "expired"


REPORTABLE = (Status.DISPATCHED, Status.PROCESSING, Status.PROCESSED, Status.FAILED,
              Status.EXPIRED)
FINAL = frozenset({Status.REJECTED, Status.PROCESSED, Status.FAILED, Status.EXPIRED})
_AFTER_DELIVERY = frozenset(REPORTABLE)
ALLOWED: dict[str, frozenset[Status]] = {
    Status.ACCEPTED: _AFTER_DELIVERY,
    Status.DISPATCHED: _AFTER_DELIVERY,  # dispatched again: a redelivery
    Status.PROCESSING: frozenset({Status.PROCESSED, Status.FAILED, Status.EXPIRED}),
}
STEP_COLUMN = {status: f"{status.value}_at" for status in REPORTABLE}


def stream_of(signal_id: str) -> str:
    return f"signal-{signal_id}"


def content_hash(token_name: str, body: str) -> str:
    """What the content dedupe window compares: the same body from the same token."""
    return hashlib.sha256(f"{token_name}\n{body}".encode("utf-8", "replace")).hexdigest()


def check_transition(row: Row, new: Status, consumer: str | None) -> None:
    """Refuse (409) a status that may not follow the signal's current one."""
    current = Status(row["status"])
    if new not in ALLOWED.get(current, frozenset()):
        if current is Status.PROCESSING and new is Status.PROCESSING:
            raise IllegalTransition(
                f"signal {row['signal_id']} is already claimed by "
                f"{row['claimed_by'] or 'an unnamed consumer'} (since {row['processing_at']}): "
                "a second claim is refused so that it is never executed twice"
            )
        if current in FINAL:
            raise IllegalTransition(
                f"signal {row['signal_id']} is already {current.value}: "
                "no status may follow a final one"
            )
        raise IllegalTransition(
            f"signal {row['signal_id']} is {current.value}: it cannot become {new.value}"
        )
    claimer = row["claimed_by"]
    if current is Status.PROCESSING and claimer and consumer != claimer:
        reporter = f"not {consumer!r}" if consumer else "and the report names no consumer"
        raise IllegalTransition(
            f"signal {row['signal_id']} is claimed by {claimer!r}, {reporter}: only the "
            "claimer reports its outcome: report it as that consumer "
            f"(\"consumer\": {json.dumps(claimer, ensure_ascii=False)})"
        )


def fold(row: Row | None, event: Event) -> Row:
    """The row after ``event``; ``row`` is None before the signal's first event."""
    data = event.data
    if event.type == EventType.RECEIVED:
        return _new_row(event)
    if row is None:
        raise ValueError(f"event {event.position} ({event.type}) precedes its signal.received")
    row = {**row, "updated_at": event.time, "last_position": event.position}
    if event.type == EventType.ACCEPTED:
        signal = data.get("signal") or {}
        row.update(status=Status.ACCEPTED.value, action=signal.get("action"),
                   ticker=safe_text(signal.get("ticker"), 100),
                   strategy=safe_text(signal.get("strategy"), 200))
    elif event.type == EventType.REJECTED:
        row["status"] = Status.REJECTED.value
    elif event.type.startswith("signal.") and event.type not in _NO_STATUS:
        status = Status(event.type.removeprefix("signal."))
        row["status"] = status.value
        row[STEP_COLUMN[status]] = event.time
        if status is Status.PROCESSING:
            row["attempts"] = row["attempts"] + 1
            row["claimed_by"] = safe_text(data.get("consumer"), 200)
        elif status is Status.FAILED:
            row["last_error"] = _error_text(data.get("detail"))
    return row


_NO_STATUS = frozenset({EventType.DUPLICATE, EventType.RENORMALIZED})


def _new_row(event: Event) -> Row:
    data = event.data
    return {
        "signal_id": data["signal_id"],
        "status": Status.RECEIVED.value,
        "source": data.get("source") or "api",
        "token_name": data.get("token"),
        "ticker": safe_text(event.meta.get("ticker"), 100),
        "strategy": safe_text(event.meta.get("strategy"), 200),
        "action": None,
        "idempotency_key": data.get("idempotency_key"),
        "content_hash": content_hash(data.get("token") or "", data.get("body") or ""),
        "received_at": event.time,
        "updated_at": event.time,
        "first_position": event.position,
        "last_position": event.position,
        "claimed_by": None,
        "attempts": 0,
        "last_error": None,
        **{column: None for column in STEP_COLUMN.values()},
    }


def _error_text(detail: Any) -> str | None:
    """The error a failure reported, for its column: its ``error`` (else ``message``, else
    ``reason``), else the whole detail; a string as it is, anything else as the browser's
    ``JSON.stringify`` writes it (web/src/client/signals.ts folds the same way). Text fit for
    every backend (no NUL, no lone surrogate), bounded, as for every column a sender writes."""
    if isinstance(detail, dict):
        for key in ("error", "message", "reason"):
            if detail.get(key) is not None:
                detail = detail[key]
                break
    if detail is None:
        return None
    return safe_text(detail if isinstance(detail, str) else js_json(detail), 2000)


_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]{0,9}")


def js_json(value: Any) -> str:
    """``JSON.stringify(value)`` in a browser that read ``value`` from the log's canonical JSON
    (keys sorted): array-index keys ("0", "7", ...) come first in numeric order, numbers are
    doubles written as JavaScript writes them, a lone surrogate is escaped."""
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return LONE_SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return _js_number(value)
    if isinstance(value, list):
        return "[" + ",".join(js_json(item) for item in value) + "]"
    keys = sorted(sorted(value), key=lambda k: (0, int(k)) if _ARRAY_INDEX.fullmatch(k)
                  and int(k) < 2**32 - 1 else (1, 0))
    return "{" + ",".join(f"{js_json(k)}:{js_json(value[k])}" for k in keys) + "}"


def _js_number(number: float) -> str:
    """A JSON number as a double, written as JavaScript's ``Number.prototype.toString``."""
    try:
        number = float(number)
    except OverflowError:  # an integer beyond the doubles: Infinity, which JSON writes null
        return "null"
    if not math.isfinite(number):
        return "null"
    if number == 0:
        return "0"
    shortest = Decimal(repr(abs(number))).normalize().as_tuple()  # the same shortest digits
    digits = "".join(map(str, shortest.digits))
    k, n = len(digits), len(digits) + int(shortest.exponent)
    sign = "-" if number < 0 else ""
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return f"{sign}{digits[:n]}.{digits[n:]}"
    if -6 < n <= 0:
        return f"{sign}0.{'0' * -n}{digits}"
    fraction = f".{digits[1:]}" if k > 1 else ""
    return f"{sign}{digits[0]}{fraction}e{'+' if n > 0 else '-'}{abs(n - 1)}"


# What the first event fixes for good; every other column follows the signal's life.
_FIXED = frozenset({"signal_id", "first_position", "received_at", "source", "token_name",
                    "idempotency_key", "content_hash"})
_MUTABLE = [c.name for c in signals.columns if c.name not in _FIXED]
SIGNAL_HINT = "signal_id"  # the hint a unit gives for the signal whose row it will read
ROWS_PER_READ = 500  # values in one IN: well under every backend's limit on parameters
# What a sender may send again (a key, the same body): what a new row is found by at once.
_UNIQUE_BY_SENDER = ("idempotency_key", "content_hash")
_INSERT = signals.insert()
_UPDATE = (
    signals.update()
    .where(signals.c.signal_id == bindparam("b_signal_id"))
    .values({name: bindparam(name) for name in _MUTABLE})
)


class SignalRows:
    """The projection inside one group commit: reads see what earlier units of the batch
    staged, writes are staged to flush with the batch.

    A row not yet read is read together with those the batch's other units named in their
    hints for the same column (``{SIGNAL_HINT: signal_id}``, an idempotency key, ...): one
    query for a batch of status reports or keyed signals rather than one each."""

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx
        self.cache: dict[str, Row] = tx.local.setdefault("signal_rows", {})
        # (column, value) → the signal_id of the row holding it, None when there is none.
        self._found: dict[tuple[str, str], str | None] = tx.local.setdefault(
            "signal_rows_found", {})

    async def get(self, signal_id: str) -> Row | None:
        if signal_id in self.cache:
            return self.cache[signal_id]
        return await self.find(SIGNAL_HINT, signal_id)

    async def find(self, column: str, value: str, *where: ColumnElement[bool]) -> Row | None:
        """The row with ``value`` in ``column`` (and ``where``), the latest received if
        several: as the batch has made it, else as committed before the batch."""
        if (column, value) not in self._found:
            unread = (v for v in self.tx.batch_hints(column)
                      if v != value and (column, v) not in self._found)
            values = [value, *itertools.islice(unread, ROWS_PER_READ - 1)]
            rows = await self.tx.fetch_all(
                select(signals).where(signals.c[column].in_(values), *where))
            self._found.update(dict.fromkeys(((column, v) for v in values), None))
            for row in sorted(rows, key=lambda r: (r["received_at"], r["first_position"])):
                self.cache.setdefault(row["signal_id"], row)  # the batch's version is kept
                self._found[column, row[column]] = row["signal_id"]
        signal_id = self._found[column, value]
        return None if signal_id is None else self.cache[signal_id]

    def insert(self, row: Row) -> None:
        self.cache[row["signal_id"]] = row
        for column in _UNIQUE_BY_SENDER:  # a later unit of the batch finds it by these too
            if row[column] is not None:
                self._found[column, row[column]] = row["signal_id"]
        self.tx.stage(_INSERT, row)

    def update(self, row: Row) -> None:
        self.cache[row["signal_id"]] = row
        self.tx.stage(_UPDATE, {"b_signal_id": row["signal_id"],
                                **{name: row[name] for name in _MUTABLE}})
