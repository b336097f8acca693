"""Status reports: a consumer says what became of a signal; the log records it, or refuses.

A report is checked against the signal's current status inside the group commit that appends
it, so two racing claims (from any connection, process or instance) cannot both succeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import BadRequest, NotFound
from pipeline.log import EventLog, NewEvent, Transaction
from pipeline.processing.projection import (
    REPORTABLE,
    SIGNAL_HINT,
    SignalRows,
    Status,
    check_transition,
    fold,
    stream_of,
)

MAX_CONSUMER_LENGTH = 200


@dataclass(frozen=True)
class StatusReport:
    signal_id: str
    status: Status
    detail: dict[str, Any]
    consumer: str | None

    @classmethod
    def parse(cls, signal_id: str, body: object) -> StatusReport:
        """Validate a report as sent over HTTP or WebSocket; :class:`BadRequest` if malformed."""
        words = ", ".join(s.value for s in REPORTABLE)
        if not isinstance(body, dict):
            raise BadRequest(f'send {{"status": one of {words}, "detail": {{}}, "consumer": NAME}}')
        try:
            status = Status(str(body.get("status")))
        except ValueError:
            status = Status.RECEIVED  # not reportable: refused just below
        if status not in REPORTABLE:
            raise BadRequest(f"status must be one of {words}")
        detail = body.get("detail") or {}
        if not isinstance(detail, dict):
            raise BadRequest("detail must be a JSON object")
        consumer = body.get("consumer")
        if consumer is not None and (not isinstance(consumer, str) or not consumer.isprintable()
                                     or not 0 < len(consumer) <= MAX_CONSUMER_LENGTH):
            raise BadRequest(f"consumer must be a name of 1-{MAX_CONSUMER_LENGTH} printable "
                             "characters")
        return cls(signal_id, status, detail, consumer)


@dataclass(frozen=True)
class StatusOutcome:
    signal_id: str
    status: str
    position: int

    def to_body(self) -> dict[str, Any]:
        return {"signal_id": self.signal_id, "status": self.status, "position": self.position}


async def report_status(log: EventLog, report: StatusReport,
                        token_name: str | None = None) -> StatusOutcome:
    """Append the report's event if the transition is legal (else 409, or 404 if unknown)."""

    async def unit(tx: Transaction) -> StatusOutcome:
        rows = SignalRows(tx)
        row = await rows.get(report.signal_id)
        if row is None:
            raise NotFound(f"no signal {report.signal_id!r}: check the id you were given")
        check_transition(row, report.status, report.consumer)
        attempt = row["attempts"] + (1 if report.status is Status.PROCESSING else 0)
        event = tx.append(NewEvent(
            stream_of(report.signal_id),
            f"signal.{report.status.value}",
            {"signal_id": report.signal_id, "status": report.status.value,
             "detail": report.detail, "consumer": report.consumer, "attempt": attempt,
             "token": token_name},
            {k: v for k, v in (("signal_id", report.signal_id), ("ticker", row["ticker"]),
                               ("strategy", row["strategy"])) if v is not None},
        ))
        rows.update(fold(row, event))
        return StatusOutcome(report.signal_id, report.status.value, event.position)

    return await log.transact(unit, {SIGNAL_HINT: report.signal_id})
