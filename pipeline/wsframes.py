"""The frames a WebSocket client sends, read strictly: the hello (cursor, epoch, filter,
consumer or group), and the close codes and error frame that end a connection whose client
broke the protocol. :mod:`pipeline.ws` runs the connection itself.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeGuard

from pipeline.log import EventFilter
from pipeline.log.model import strict_loads
from pipeline.textformats import NotJsonValue

FILTER_KEYS = ("types", "streams", "tickers", "strategies")
MAX_FILTER_VALUES = 100
MAX_FILTER_LENGTH = 200
TYPE_PATTERN = re.compile(r"^[A-Za-z0-9_.*?-]+$")


class CloseCode(IntEnum):
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    INTERNAL_ERROR = 1011
    OVERLOADED = 1013
    MALFORMED = 4400
    UNAUTHORIZED = 4401
    FORBIDDEN = 4403
    TIMEOUT = 4408
    CONFLICT = 4409
    TOO_MANY_REQUESTS = 4429


class Closing(Exception):
    """Ends a connection with an error frame and a close code."""

    def __init__(self, code: CloseCode, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


@dataclass(frozen=True)
class Hello:
    token: str | None
    cursor: int | None
    epoch: str | None
    filter: EventFilter
    consumer: str | None  # a consumer group member's name is "<group>/<member>"
    batch: bool


def parse_hello(text: str) -> Hello:
    frame = decode_frame(text)
    if frame.get("op") != "hello":
        raise Closing(CloseCode.MALFORMED, 'the first frame must be {"op": "hello", ...}')
    token = frame.get("token")
    if token is not None and not isinstance(token, str):
        raise Closing(CloseCode.MALFORMED, "token must be a string")
    cursor = frame.get("cursor")
    if cursor is not None and (not isinstance(cursor, int) or isinstance(cursor, bool)
                               or cursor < 0):
        raise Closing(CloseCode.MALFORMED, "cursor must be a position (integer >= 0) or null")
    epoch = frame.get("epoch")
    if epoch is not None and not isinstance(epoch, str):
        raise Closing(CloseCode.MALFORMED, "epoch must be a string or null")
    consumer = frame.get("consumer")
    if consumer is not None and (not isinstance(consumer, str) or not 0 < len(consumer) <= 100
                                 or not consumer.isprintable()):
        raise Closing(CloseCode.MALFORMED,
                      "consumer must be a name of 1-100 printable characters or null")
    batch = frame.get("batch", False)
    if not isinstance(batch, bool):
        raise Closing(CloseCode.MALFORMED, "batch must be true or false")
    event_filter = parse_filter(frame.get("filter"))
    group = frame.get("group")
    if group is not None:
        if consumer is not None:
            raise Closing(CloseCode.MALFORMED, "give either consumer or group, not both")
        name, member, size = parse_group(group)
        consumer = f"{name}/{member}"
        event_filter = dataclasses.replace(event_filter, partition=(member, size))
    return Hello(token, cursor, epoch, event_filter, consumer, batch)


def parse_group(value: object) -> tuple[str, int, int]:
    usage = ('group must be {"name": NAME, "member": INDEX, "size": N} with '
             "0 <= member < size <= 1024")
    if not isinstance(value, dict):
        raise Closing(CloseCode.MALFORMED, usage)
    name, member, size = value.get("name"), value.get("member"), value.get("size")
    if (not isinstance(name, str) or not 0 < len(name) <= 90 or "/" in name
            or not name.isprintable()
            or not is_int(member) or not is_int(size) or not 0 <= member < size <= 1024):
        raise Closing(CloseCode.MALFORMED, usage)
    return name, member, size


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_filter(value: object) -> EventFilter:
    if value is None:
        return EventFilter()
    if not isinstance(value, dict):
        raise Closing(CloseCode.MALFORMED, "filter must be an object")
    unknown = set(value) - set(FILTER_KEYS)
    if unknown:
        raise Closing(CloseCode.MALFORMED,
                      f"unknown filter key(s) {sorted(unknown)}: use {list(FILTER_KEYS)}")
    lists: dict[str, tuple[str, ...]] = {}
    for key in FILTER_KEYS:
        items = value.get(key)
        if items is None:  # absent or null: any value; "", 0 or {} is no list, and refused
            items = []
        if not isinstance(items, list) or len(items) > MAX_FILTER_VALUES or not all(
            isinstance(i, str) and 0 < len(i) <= MAX_FILTER_LENGTH and "\x00" not in i
            for i in items
        ):
            raise Closing(CloseCode.MALFORMED,
                          f"filter.{key} must be a list of at most {MAX_FILTER_VALUES} "
                          f"non-empty strings of at most {MAX_FILTER_LENGTH} characters "
                          "(no NUL)")
        lists[key] = tuple(items)
    bad = [t for t in lists["types"] if not TYPE_PATTERN.match(t)]
    if bad:
        raise Closing(CloseCode.MALFORMED,
                      f"bad type pattern(s) {bad}: letters, digits, . _ - and the globs * ?")
    return EventFilter(lists["types"], lists["streams"], lists["tickers"], lists["strategies"])


def decode_frame(text: str) -> dict[str, Any]:
    try:
        frame = strict_loads(text)
    except NotJsonValue as exc:
        raise Closing(CloseCode.MALFORMED, str(exc)) from None
    except (ValueError, RecursionError):
        raise Closing(CloseCode.MALFORMED, "frames are JSON objects with an \"op\"") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("op"), str):
        raise Closing(CloseCode.MALFORMED, "frames are JSON objects with an \"op\"")
    return frame
