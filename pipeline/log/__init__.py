"""The append-only event log (see ``store`` for group commit and ordering)."""

from pipeline.log.model import GENESIS_HASH, Event, EventFilter, NewEvent, format_time, utc_now
from pipeline.log.store import EventLog, Transaction

__all__ = [
    "GENESIS_HASH",
    "Event",
    "EventFilter",
    "EventLog",
    "NewEvent",
    "Transaction",
    "format_time",
    "utc_now",
]
