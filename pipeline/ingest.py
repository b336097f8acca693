"""Ingestion: one signal in, its ``signal.received`` and verdict events committed together.

The verdict is ``signal.accepted`` (the normalized signal) or ``signal.rejected`` (the
validation errors). A repeat of an idempotency key (or, when the content dedupe window is on,
of the same body from the same token) appends ``signal.duplicate`` to the original stream and
answers with the original signal instead. The idempotency check runs inside the group commit,
so two concurrent requests with one key can never both be accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pipeline.errors import BadRequest, LogUnavailable
from pipeline.instruments import SIGNALS
from pipeline.log import EventLog, NewEvent, Transaction, format_time
from pipeline.log.model import new_id, safe_text
from pipeline.log.schema import signals
from pipeline.processing.projection import (
    EventType,
    SignalRows,
    content_hash,
    fold,
    stream_of,
)
from pipeline.signals import ParsedBody

MAX_KEY_LENGTH = 200
# What a submission's unit may look up, named as the signals table's columns.
KEY_HINT = "idempotency_key"
CONTENT_HINT = "content_hash"


@dataclass(frozen=True)
class Submission:
    """One request's signal, parsed, with the facts about where it came from."""

    source: str  # "webhook" or "api"
    raw: str  # the body as received, secrets already stripped
    parsed: ParsedBody
    token_name: str
    remote_addr: str | None
    content_type: str | None
    idempotency_key: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    signal_id: str
    position: int
    status: str
    duplicate: bool
    errors: tuple[dict[str, Any], ...] = ()

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "signal_id": self.signal_id,
            "position": self.position,
            "status": self.status,
            "duplicate": self.duplicate,
        }
        if self.errors:
            body["errors"] = list(self.errors)
        return body


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise BadRequest(
            f"the idempotency key must be 1-{MAX_KEY_LENGTH} printable characters"
        )
    return key


class Ingestor:
    def __init__(self, log: EventLog, *, dedupe_window: float = 0.0) -> None:
        self.log = log
        self.dedupe_window = dedupe_window

    async def submit(self, submission: Submission) -> Outcome:
        key = check_idempotency_key(submission.idempotency_key)
        digest = None
        if self.dedupe_window > 0:
            digest = content_hash(submission.token_name, submission.raw)

        async def unit(tx: Transaction) -> Outcome:
            original = await self._find_original(tx, key, digest)
            if original is not None:
                return await self._record_duplicate(tx, submission, original)
            return self._record_new(tx, submission, key)

        try:
            hints = {k: v for k, v in ((KEY_HINT, key), (CONTENT_HINT, digest)) if v is not None}
            outcome = await self.log.transact(unit, hints)
        except LogUnavailable:
            SIGNALS.inc(submission.source, "unavailable")
            raise
        SIGNALS.inc(submission.source, "duplicate" if outcome.duplicate else outcome.status)
        return outcome

    async def _recorded(self, tx: Transaction, column: str, value: str) -> Outcome | None:
        """The signal recorded with ``value`` in ``column``: its idempotency key, or its
        content hash within the dedupe window. Read with the batch's other values of
        ``column`` (the Python client sends a key with every signal)."""
        within = () if column == KEY_HINT else (
            signals.c.received_at >= format_time(tx.now - timedelta(seconds=self.dedupe_window)),)
        row = await SignalRows(tx).find(column, value, *within)
        return None if row is None else Outcome(row["signal_id"], 0, row["status"], True)

    async def _find_original(self, tx: Transaction, key: str | None,
                             digest: str | None) -> Outcome | None:
        for column, value in ((KEY_HINT, key), (CONTENT_HINT, digest)):
            if value is not None and (original := await self._recorded(tx, column, value)):
                return original
        return None

    async def _record_duplicate(self, tx: Transaction, submission: Submission,
                                original: Outcome) -> Outcome:
        rows = SignalRows(tx)
        row = await rows.get(original.signal_id)
        event = tx.append(NewEvent(
            stream_of(original.signal_id),
            EventType.DUPLICATE,
            {
                "signal_id": original.signal_id,
                "idempotency_key": submission.idempotency_key,
                **_source_facts(submission),
            },
            {"signal_id": original.signal_id},
        ))
        if row is not None:
            rows.update(fold(row, event))
        return Outcome(original.signal_id, event.position, original.status, True)

    def _record_new(self, tx: Transaction, submission: Submission, key: str | None) -> Outcome:
        parsed = submission.parsed
        signal_id = new_id()
        stream = stream_of(signal_id)
        signal = parsed.signal
        ticker = signal.ticker if signal else safe_text(parsed.fields.get("ticker"), 100)
        strategy = signal.strategy if signal else None
        meta = {k: v for k, v in (("signal_id", signal_id), ("ticker", ticker),
                                  ("strategy", strategy)) if v is not None}
        received = tx.append(NewEvent(stream, EventType.RECEIVED, {
            "signal_id": signal_id,
            "body": submission.raw,
            "format": parsed.format.value,
            "idempotency_key": key,
            **_source_facts(submission),
        }, meta))
        errors: tuple[dict[str, Any], ...] = ()
        if signal is not None and not parsed.errors:
            verdict = tx.append(NewEvent(stream, EventType.ACCEPTED,
                                         {"signal_id": signal_id, "signal": signal.to_data()},
                                         meta))
        else:
            errors = tuple(e.to_data() for e in parsed.errors)
            verdict = tx.append(NewEvent(stream, EventType.REJECTED,
                                         {"signal_id": signal_id, "errors": list(errors)},
                                         meta))
        row = fold(fold(None, received), verdict)
        SignalRows(tx).insert(row)
        return Outcome(signal_id, verdict.position, row["status"], False, errors)


def _source_facts(submission: Submission) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "source": submission.source,
        "token": submission.token_name,
        "remote_addr": submission.remote_addr,
        "content_type": submission.content_type,
    }
    facts.update(submission.facts)
    return facts
