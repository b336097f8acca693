"""Integrity of the log: walk the position sequence and the hash chain, in bounded memory.

Every event's hash is sha256 over the previous event's hash and the event's canonical encoding
(docs/protocol.md), so an event whose content, position or predecessor changed no longer
matches its hash. :func:`verify` reads the log in pages, oldest first, and names the first
position where it differs from what was appended:

- ``removed``: the sequence jumps over a position (or stops short of the recorded head);
- ``edited``: an event's content no longer gives its hash, while the chain goes on from that
  hash (the event was changed in place);
- ``reordered``: the event at a position is one appended at another position (the chain goes
  on from the hash of an event found elsewhere in the log);
- ``inserted``: an event the chain does not lead to at all, or one beyond the recorded head.

A forger who recomputes every hash after an edit leaves a consistent chain: that is what the
*verified head* is for. Each run prints the head it verified (position and hash); saved and
given to a later run, it is checked first (the event at that position must still have that
hash), and the walk goes on from there, so a later edit before it is caught and the walk is
shorter.

The log is read from a database URL (offline, SELECTs only) or from a server over the HTTP API
(:mod:`replay.sources`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.log.model import GENESIS_HASH, Event
from replay._files import write_atomically
from replay.sources import DatabaseSource, ServerSource, Source

__all__ = ["AuditError", "DatabaseSource", "Finding", "Head", "Report", "ServerSource",
           "run_verify", "verify"]


class AuditError(Exception):
    """A one-line reason for ``signalbox audit`` to exit with 1."""


@dataclass(frozen=True)
class Head:
    """A verified position of the log and the hash of the event there (0: the empty log)."""

    position: int
    hash: str

    def save(self, path: Path) -> None:
        write_atomically(path, json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, path: Path) -> Head:
        text = path.read_text()
        try:
            value = json.loads(text)
            return cls(int(value["position"]), str(value["hash"]))
        except (KeyError, TypeError, ValueError):
            raise AuditError(f"{path} is not a verified head (a file that --save wrote): give "
                             "that file to --from") from None


@dataclass(frozen=True)
class Finding:
    kind: str  # removed, edited, reordered, inserted
    position: int
    message: str


@dataclass(frozen=True)
class Report:
    verified: int  # events checked in this run
    head: Head  # the last position verified
    finding: Finding | None

    @property
    def ok(self) -> bool:
        return self.finding is None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "verified": self.verified, "head": asdict(self.head),
                "finding": None if self.finding is None else asdict(self.finding)}


Progress = Callable[[int, float], None]


async def verify(source: Source, start: Head | None = None,
                 progress: Progress | None = None) -> Report:
    """Walk the log from ``start`` (or from the beginning) to its end."""
    head = start or Head(0, GENESIS_HASH)
    if start is not None and start.position > 0:
        finding = await _check_start(source, start)
        if finding is not None:
            return Report(0, Head(0, GENESIS_HASH), finding)
    walk = _Walk(head, progress)
    while True:
        read = False
        async for page in source.after(walk.head.position):
            read = True
            # Read after the page: the recorded head commits with the events, so it is at
            # least as far as any event read before it, unless an event was put there by hand.
            recorded = await source.recorded_head()
            for event in page:
                finding = await walk.step(event, source, recorded)
                if finding is not None:
                    return Report(walk.count, walk.head, finding)
        recorded = await source.recorded_head()
        if recorded is None or recorded <= walk.head.position:
            return Report(walk.count, walk.head, None)
        if not read:  # the recorded head is further, and there is nothing more to read
            return Report(walk.count, walk.head, Finding(
                "removed", walk.head.position + 1,
                f"the log records its head at {recorded} but ends at {walk.head.position}: "
                f"events from {walk.head.position + 1} on were removed"))
        # else: events were appended while the walk read the last page: walk on


async def _check_start(source: Source, start: Head) -> Finding | None:
    async for page in source.after(start.position - 1):
        event = page[0]
        if event.position != start.position:
            return Finding("removed", start.position,
                           f"the verified head's event at {start.position} is gone")
        if event.hash != start.hash:
            return Finding("edited", start.position,
                           f"the event at the verified head ({start.position}) no longer has "
                           "the hash verified then: the log was rewritten up to there")
        return None
    return Finding("removed", start.position,
                   f"the log ends before the verified head ({start.position})")


class _Walk:
    def __init__(self, head: Head, progress: Progress | None) -> None:
        self.head = head
        self.count = 0
        self.progress = progress
        self.started = time.monotonic()

    async def step(self, event: Event, source: Source, recorded: int | None) -> Finding | None:
        expected = self.head.position + 1
        if event.position != expected:
            return Finding("removed", expected,
                           f"position {expected} is missing: the log goes from "
                           f"{self.head.position} to {event.position}")
        if recorded is not None and event.position > recorded:
            return Finding("inserted", event.position,
                           f"the event at {event.position} is beyond the head the log records "
                           f"({recorded}): it was added outside the log")
        if event.expected_hash(self.head.hash) != event.hash:
            return await self._classify(event, source)
        self.head = Head(event.position, event.hash)
        self.count += 1
        if self.progress is not None and self.count % 100_000 == 0:
            self.progress(self.count, time.monotonic() - self.started)
        return None

    async def _classify(self, event: Event, source: Source) -> Finding:
        """The event at ``event.position`` does not match its hash: how it got there."""
        following = await _next_event(source, event.position)
        if following is None or following.expected_hash(event.hash) == following.hash:
            return Finding("edited", event.position,
                           f"the event at {event.position} was changed: its content no longer "
                           "gives its hash")
        # The next event chains from some other hash: the one of the event that belongs here.
        async for page in source.after(0):
            for other in page:
                if other.position != event.position and (
                        following.expected_hash(other.hash) == following.hash):
                    return Finding("reordered", event.position,
                                   f"the event at {event.position} was moved there; the one "
                                   f"that belongs there is at {other.position}")
        return Finding("inserted", event.position,
                       f"the event at {event.position} was not appended by the log: nothing "
                       "chains to it")


async def _next_event(source: Source, position: int) -> Event | None:
    async for page in source.after(position):
        return page[0]
    return None


async def run_verify(args: Any, database_url: str) -> int:
    """``signalbox audit verify``: 0 when the log verifies, 1 when it was tampered with."""
    source: DatabaseSource | ServerSource
    if args.url:
        source = ServerSource(args.url, os.environ.get("SIGNALBOX_TOKEN", ""))
    else:
        source = DatabaseSource(args.database_url or database_url)

    def progress(count: int, seconds: float) -> None:
        print(f"verified {count:,} events ({count / max(seconds, 1e-9):,.0f}/s)",
              file=sys.stderr, flush=True)

    try:
        report = await verify(source, Head.load(args.start) if args.start else None, progress)
    finally:
        await source.close()
    if report.ok and args.save:
        report.head.save(args.save)
    if args.json:
        print(json.dumps(report.to_json()))
    elif report.finding is None:
        print(f"verified {report.verified:,} events: the log is intact up to position "
              f"{report.head.position} (hash {report.head.hash})")
    else:
        print(f"TAMPERED: {report.finding.kind} at position {report.finding.position}: "
              f"{report.finding.message}")
    return 0 if report.ok else 1
