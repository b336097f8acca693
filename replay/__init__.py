"""The consumer side of Signalbox: a resumable subscriber, typed HTTP calls, a worker for bots.

Everything public is listed in ``__all__``; see docs/clients.md for examples.
"""

from replay.client import (
    Backoff,
    BadRequest,
    Checkpoint,
    Client,
    Conflict,
    ConsumerInfo,
    ConsumerList,
    CursorStore,
    EpochChanged,
    Event,
    EventPage,
    FileCursorStore,
    Filter,
    Forbidden,
    Group,
    MemoryCursorStore,
    NotFound,
    ProcessingStatus,
    ProtocolError,
    Rejected,
    SignalboxClientError,
    SignalPage,
    SignalReceipt,
    SignalSummary,
    SignalTimeline,
    StatusReceipt,
    Subscriber,
    SubscriberState,
    Subscription,
    SyncClient,
    Unauthorized,
    Unavailable,
    Worker,
    subscribe,
)

__all__ = [
    "Backoff", "BadRequest", "Checkpoint", "Client", "Conflict", "ConsumerInfo",
    "ConsumerList", "CursorStore", "EpochChanged", "Event", "EventPage", "FileCursorStore",
    "Filter", "Forbidden", "Group", "MemoryCursorStore", "NotFound", "ProcessingStatus",
    "ProtocolError", "Rejected", "SignalPage", "SignalReceipt", "SignalSummary",
    "SignalTimeline", "SignalboxClientError", "StatusReceipt", "Subscriber",
    "SubscriberState", "Subscription", "SyncClient", "Unauthorized", "Unavailable", "Worker",
    "subscribe",
]
