"""The records of the log: events as stored, their canonical encoding, hash chain and filters."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import orjson

from pipeline.textformats import NOT_UNICODE, NotJsonValue, has_lone_surrogate

GENESIS_HASH = "0" * 64
"""The "previous hash" of the first event of every log."""

JsonObject = dict[str, Any]


_VARIANT = {f"{n:x}": f"{8 | n & 3:x}" for n in range(16)}  # the RFC 9562 variant bits: 10xx


def new_id() -> str:
    """A time-ordered (version 7) UUID as text: 48 bits of Unix time in milliseconds, then 74
    random bits (RFC 9562). Event and signal ids are made on every append, and the log indexes
    them: ids that grow with time take their index entries at the end of each index, where a
    random id would land on a page of its own, and a group commit writes a few pages where it
    wrote one per id (a signal's commit cost half as much CPU)."""
    h = f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"
    return f"{h[:8]}-{h[8:12]}-7{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds: fixed width (years before 1000 too, which
    ``strftime`` does not pad), so text order is time order."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


# Floats that orjson writes differently from ``json``: those in exponent form (1e16 against
# 1e+16) and those below 1e-4 (0.00001 against 1e-05): inside an object or array a number
# token follows one of : , [ in compact JSON. Text inside a string that merely looks like one
# only sends the value the slow way, as does a value that is a number itself. (An alternative
# "^|" in the pattern would cost a match attempt at every byte: three times the time.)
_ORJSON_DIFFERS = re.compile(rb"[:,\[]-?(?:[0-9]+(?:\.[0-9]+)?[eE]|0\.0000)")
_NUMBER_START = frozenset(b"-0123456789")


def canonical_json(value: object) -> str:
    """The one encoding that hashes are computed over: sorted keys, no spaces, UTF-8 as is.

    It is ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``,
    byte for byte; orjson produces the same text much faster for everything but a few cases
    (floats beyond 1e16 or below 1e-4, integers beyond 64 bits, non-string keys, invalid Unicode),
    which go to ``json`` instead. Text that is not valid Unicode (a lone surrogate from a
    ``\\ud800`` escape) cannot be stored as UTF-8; such a value is encoded with ASCII escapes,
    which is just as canonical, since decoding and encoding it again yields the same text.
    """
    try:
        encoded = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        pass
    else:
        if encoded[0] not in _NUMBER_START and not _ORJSON_DIFFERS.search(encoded):
            return encoded.decode()
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_STRICT_JSON = json.JSONDecoder(parse_constant=_no_constants)


def strict_loads(text: str) -> Any:
    """``json.loads`` without the ``NaN``/``Infinity`` extensions, which are not JSON, and
    without lone surrogates (``"\\ud800"``), which are not Unicode: a body that uses them is
    refused (``ValueError``; :class:`NotJsonValue` for a surrogate) rather than stored. The
    decoder is built once, where ``json.loads`` with a ``parse_constant`` builds one per
    call."""
    value = _STRICT_JSON.decode(text)
    if "\\u" in text and has_lone_surrogate(value):  # only an escape makes one
        raise NotJsonValue(NOT_UNICODE)
    return value


def _plain(text: str) -> str:
    """Text that every JSON encoder writes as is (printable ASCII without quote or backslash),
    quoted; else "" (then the caller encodes it)."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return ""


def chain_hash(previous: str, position: int, event_id: str, stream: str, type_: str,  # noqa: PLR0917
               data_json: str, meta_json: str, time: str) -> str:
    """sha256 over the previous event's hash and this event's canonical encoding.

    The canonical encoding is the sorted-key JSON object of ``data, id, meta, position, stream,
    time, type`` with ``data`` and ``meta`` in their own canonical encoding (as stored).
    """
    body = (
        f'{{"data":{data_json},"id":{_plain(event_id) or json.dumps(event_id)},'
        f'"meta":{meta_json},"position":{position},'
        f'"stream":{_plain(stream) or canonical_json(stream)},'
        f'"time":{_plain(time) or json.dumps(time)},'
        f'"type":{_plain(type_) or canonical_json(type_)}}}'
    )
    return hashlib.sha256((previous + body).encode("utf-8")).hexdigest()


TICKER_LIMIT = 100
STRATEGY_LIMIT = 200
"""The longest ticker and strategy the events table indexes (longer ones are cut)."""


def safe_text(value: object, limit: int) -> str | None:
    """A string fit for an indexed column on every backend: no NUL, valid UTF-8, bounded."""
    if not isinstance(value, str) or not value:
        return None
    if not value.isascii() or "\x00" in value:  # (isascii is a flag of the string: free)
        value = value.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return value[:limit] or None


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append; ``meta`` may carry ``ticker`` and ``strategy`` for filtering."""

    stream: str
    type: str
    data: Mapping[str, Any]
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, init=False)
class Event:
    """A committed event. ``data_json``/``meta_json`` are the stored canonical encodings."""

    position: int
    id: str
    stream: str
    type: str
    data_json: str
    meta_json: str
    time: str
    hash: str

    def __init__(self, position: int, id: str, stream: str, type: str,  # noqa: PLR0917
                 data_json: str, meta_json: str, time: str, hash: str) -> None:
        # Frozen, but built without a __setattr__ per field: the log reads many of them.
        self.__dict__.update(position=position, id=id, stream=stream, type=type,
                             data_json=data_json, meta_json=meta_json, time=time, hash=hash)

    @classmethod
    def decoded(cls, position: int, id: str, stream: str, type: str,  # noqa: PLR0917
                data_json: str, meta_json: str, time: str, hash: str,
                data: Mapping[str, Any], meta: Mapping[str, Any]) -> Event:
        """An event whose ``data`` and ``meta`` are known already (just appended): they are
        not decoded again from their JSON. They must be what decoding would give."""
        event = cls(position, id, stream, type, data_json, meta_json, time, hash)
        event.__dict__["data"] = dict(data)
        event.__dict__["meta"] = dict(meta)
        return event

    @cached_property
    def data(self) -> JsonObject:
        value: JsonObject = json.loads(self.data_json)
        return value

    @cached_property
    def meta(self) -> JsonObject:
        value: JsonObject = json.loads(self.meta_json)
        return value

    @property
    def ticker(self) -> str | None:
        value = self.meta.get("ticker")
        return value if isinstance(value, str) else None

    @property
    def strategy(self) -> str | None:
        value = self.meta.get("strategy")
        return value if isinstance(value, str) else None

    @cached_property
    def frame(self) -> str:
        """The WebSocket ``event`` frame, encoded once and shared by every subscriber: built
        from the stored encodings, never re-encoded."""
        return event_frame(self.position, self.id, self.stream, self.type, self.data_json,
                           self.meta_json, self.time, self.hash)

    @property
    def json(self) -> str:
        """The event as a JSON object (the frame without its ``op``)."""
        return "{" + self.frame[_FRAME_PREFIX:]

    def to_dict(self) -> JsonObject:
        return {
            "position": self.position,
            "id": self.id,
            "stream": self.stream,
            "type": self.type,
            "data": self.data,
            "meta": self.meta,
            "time": self.time,
            "hash": self.hash,
        }

    def expected_hash(self, previous: str) -> str:
        return chain_hash(previous, self.position, self.id, self.stream, self.type,
                          self.data_json, self.meta_json, self.time)


def event_frame(position: int, id: str, stream: str, type: str,  # noqa: PLR0917
                data_json: str, meta_json: str, time: str, hash: str) -> str:
    """:attr:`Event.frame` from the columns of its row, for readers that need no ``Event``."""
    if _plain(id + stream + type + time + hash):  # the usual case
        return (
            f'{{"op":"event","position":{position},"id":"{id}","stream":"{stream}",'
            f'"type":"{type}","data":{data_json},"meta":{meta_json},'
            f'"time":"{time}","hash":"{hash}"}}'
        )
    return (
        f'{{"op":"event","position":{position},"id":{_quoted(id)},'
        f'"stream":{_quoted(stream)},"type":{_quoted(type)},'
        f'"data":{data_json},"meta":{meta_json},'
        f'"time":{_quoted(time)},"hash":{_quoted(hash)}}}'
    )


_GLOB_CHARS = re.compile(r"[*?]")
_FRAME_PREFIX = len('{"op":"event",')


def _quoted(text: str) -> str:
    """``json.dumps(text, ensure_ascii=False)``, without its cost for ids, names and times."""
    return _plain(text) or json.dumps(text, ensure_ascii=False)


def partition_of(event: Event, size: int) -> int:
    """The consumer-group member an event belongs to: crc32 of its ticker (of its stream when
    it has none) modulo the group size, so one symbol's signals stay on one member, in order."""
    key = event.ticker or event.stream
    return zlib.crc32(key.encode("utf-8", "replace")) % size


def glob_regex(pattern: str) -> str:
    """``*`` matches any run of characters, ``?`` one character; nothing else is special."""
    return re.escape(pattern).replace(r"\*", ".*").replace(r"\?", ".") + r"\Z"


@dataclass(frozen=True)
class EventFilter:
    """Which events a reader wants. Empty lists mean "any"; lists are OR-ed, kinds AND-ed.

    ``types`` are glob patterns (``signal.*``); ``streams``, ``tickers`` and ``strategies`` are
    exact values. Tickers and strategies are matched against the event's meta.
    """

    types: tuple[str, ...] = ()
    streams: tuple[str, ...] = ()
    tickers: tuple[str, ...] = ()
    strategies: tuple[str, ...] = ()
    # (member, size) of a consumer group: only events whose ticker (or, without one, stream)
    # hashes to this member. Matched in memory only: readers of the log apply it after SQL.
    partition: tuple[int, int] | None = None

    @classmethod
    def build(cls, types: Iterable[str] = (), streams: Iterable[str] = (),
              tickers: Iterable[str] = (), strategies: Iterable[str] = ()) -> EventFilter:
        return cls(tuple(types), tuple(streams), tuple(tickers), tuple(strategies))

    @property
    def is_empty(self) -> bool:
        return not (self.types or self.streams or self.tickers or self.strategies
                    or self.partition)

    @cached_property
    def _type_regex(self) -> re.Pattern[str] | None:
        if not self.types:
            return None
        return re.compile("|".join(f"(?:{glob_regex(t)})" for t in self.types))

    def matches(self, event: Event) -> bool:
        if self.is_empty:
            return True
        regex = self._type_regex
        if regex is not None and not regex.match(event.type):
            return False
        if self.streams and event.stream not in self.streams:
            return False
        # As the events table's columns hold them, so that a subscriber served from memory
        # gets what one paging from the log (or GET /api/events) gets.
        if self.tickers and safe_text(event.ticker, TICKER_LIMIT) not in self.tickers:
            return False
        if self.strategies and safe_text(event.strategy, STRATEGY_LIMIT) not in self.strategies:
            return False
        return self.partition is None or partition_of(event, self.partition[1]) == (
            self.partition[0])

    def exact_types(self) -> tuple[str, ...] | None:
        """The type patterns when none is a glob (then SQL can use ``IN``), else None."""
        if any(_GLOB_CHARS.search(t) for t in self.types):
            return None
        return self.types
