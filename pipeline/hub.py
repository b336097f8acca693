"""Live fan-out: one tailer of the log feeds every subscriber, in bounded memory.

The hub keeps a window of the most recent committed events (contiguous positions, ``window``
of them and no more than ``window_bytes`` of their JSON, each up to a 64th more).
Subscribers own nothing but their cursor: one inside the window is served from memory; one
behind it (slow, or resuming from far back) is paged from the log until it is back inside.
No subscriber has a queue of its own, so nothing is ever dropped; what one paged from the
log holds of its own is its page, bounded by count and by bytes (:data:`PAGE_BYTES`), so
memory does not grow with the slowness of readers.

Events committed by this process arrive through the log's commit listener; events committed
elsewhere (another process or instance) are found by the tailer, which re-reads the log after
its head whenever it is woken or its poll interval passes. Wake-ups are hints: the tailer
always reads from its own cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.errors import LogUnavailable
from pipeline.log import Event, EventFilter, EventLog
from pipeline.tasks import cancel_all

log = logging.getLogger("signalbox.hub")

# A page read from the log for a subscriber holds frames of about this many bytes at most (and
# always one event, however large): it is held while a slow reader takes it, with the next
# one read ahead. Events of a webhook's 64 KiB made pages of 500 over 30 MB each.
PAGE_BYTES = 512 * 1024
# Rows read for a first page from the log, before the size of frames is known.
FIRST_ROWS = 16


@dataclass(frozen=True)
class Page:
    """Matching events after a cursor, and how far the scan got (``covered`` ≥ last event);
    ``from_log``: read from the database because the cursor was behind the window."""

    events: Sequence[Event]
    covered: int
    from_log: bool = False


@dataclass(frozen=True)
class Frames:
    """A :class:`Page` as the WebSocket frames of its events, for a subscriber."""

    frames: Sequence[str]
    covered: int
    from_log: bool = False


class Hub:
    def __init__(self, event_log: EventLog, *, window: int = 10_000,
                 window_bytes: int = 32 * 2**20, page_size: int = 500,
                 poll_interval: float = 1.0) -> None:
        self.log = event_log
        self.window = window
        self.window_bytes = window_bytes
        # The window is cut back once it is a 64th over, by that much: freeing half the window
        # at once (10,000 events) held the loop for over 10 ms; a 64th takes a fraction of one.
        self._slack = max(1, window // 64)
        self._byte_slack = window_bytes // 64
        self._bytes = 0  # of the window's events' JSON (see _size)
        self.page_size = page_size
        self.poll_interval = poll_interval
        self.head = 0
        self._frame_size = 0  # mean length of the frames last paged from the log; 0: unknown
        self._events: list[Event] = []
        self._first = 1  # position of self._events[0]
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self, head: int | None = None) -> None:
        """Look at the log now: another process may have appended up to ``head``. A hint,
        never data; one about what this hub already has (its own commits) is ignored."""
        if head is None or head > self.head:
            self._wake.set()

    async def start(self) -> None:
        self.head = await self.log.head()
        self._first = self.head + 1
        self.log.add_listener(self._on_commit)
        self._task = asyncio.create_task(self._tail(), name="signalbox-hub-tailer")

    async def stop(self) -> None:
        await cancel_all(self._task)
        self._task = None
        self._publish()  # let waiting subscribers notice the shutdown

    @property
    def changed(self) -> asyncio.Event:
        """An event set the next time the head moves; take it *before* comparing cursors."""
        return self._changed

    @property
    def memory_events(self) -> int:
        return len(self._events)

    @property
    def memory_bytes(self) -> int:
        """The JSON of the window's events: what bounds the memory it holds (each event's
        frame and decoded data, once made, come to about as much again each)."""
        return self._bytes

    # -- feeding -----------------------------------------------------------------------------

    def _on_commit(self, events: Sequence[Event]) -> None:
        if events[0].position == self.head + 1:
            self._extend(events)
        elif events[-1].position > self.head:
            self._wake.set()  # someone else committed in between: read it from the log

    def _extend(self, events: Sequence[Event]) -> None:
        fresh = [e for e in events if e.position > self.head]
        if not fresh or fresh[0].position != self.head + 1:
            return
        if not self._events:
            self._first = fresh[0].position
        self._events.extend(fresh)
        self._bytes += sum(map(_size, fresh))
        self.head = fresh[-1].position
        if (len(self._events) > self.window + self._slack
                or self._bytes > self.window_bytes + self._byte_slack):
            self._trim()
        self._publish()

    def _trim(self) -> None:
        """Drop the oldest events until the window holds ``window`` and ``window_bytes`` at
        most, keeping the newest event whatever its size."""
        drop = max(0, len(self._events) - self.window)
        dropped = sum(map(_size, self._events[:drop]))
        while self._bytes - dropped > self.window_bytes and drop < len(self._events) - 1:
            dropped += _size(self._events[drop])
            drop += 1
        del self._events[:drop]
        self._first += drop
        self._bytes -= dropped

    def _publish(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _tail(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()
            try:
                await self._catch_up()
            except LogUnavailable as exc:
                log.warning("hub cannot read the log: %s", exc)
            except Exception:  # keep tailing whatever happens; subscribers depend on it
                log.exception("hub tailer failed")

    async def _catch_up(self) -> None:
        while True:
            batch = await self.log.read(self.head, self.page_size)
            if not batch:
                return
            self._extend(batch)
            if len(batch) < self.page_size:
                return

    # -- serving -----------------------------------------------------------------------------

    async def page(self, after: int, filter: EventFilter, limit: int) -> Page:
        """Up to ``limit`` events matching ``filter`` after ``after``: from memory when the
        window still holds ``after + 1``, else from the log."""
        head = self.head
        if after >= head:
            return Page((), after)
        if after + 1 >= self._first and self._events:
            return self._from_window(after, filter, limit)
        # Behind the window: page from the log, but never past the head this hub has
        # published, so that the window takes over without a gap or a repeat.
        events = await self.log.read(after, limit, None if filter.is_empty else filter)
        events = [e for e in events if e.position <= head]
        covered = events[-1].position if len(events) >= limit else head
        if filter.partition is not None:  # the one part of a filter that SQL cannot apply
            events = [e for e in events if filter.matches(e)]
        return Page(events, covered, from_log=True)

    async def frames(self, after: int, filter: EventFilter, limit: int,
                     max_bytes: int = PAGE_BYTES) -> Frames:
        """:meth:`page` as frames. Behind the window, at most ``max_bytes`` of them (at least
        one), and only about as many rows are read as that takes, going by the size of the
        frames paged last (:data:`FIRST_ROWS` before any). Unfiltered and behind the window
        (catch-up), the frames are built from the log's rows, without an ``Event`` each."""
        head = self.head
        if after >= head or (after + 1 >= self._first and self._events):  # from memory
            page = await self.page(after, filter, limit)
            return Frames([e.frame for e in page.events], page.covered, page.from_log)
        rows = min(limit, FIRST_ROWS)
        if self._frame_size:
            rows = max(1, min(limit, max_bytes // self._frame_size))
        if not filter.is_empty:
            page = await self.page(after, filter, rows)
            frames = [e.frame for e in page.events]
            positions = [e.position for e in page.events]
            covered = page.covered
        else:
            read = await self.log.read_frames(after, rows)
            frames = [frame for position, frame in read if position <= head]
            positions = [position for position, _ in read[:len(frames)]]
            covered = read[-1][0] if len(frames) >= rows else head
        if frames:
            self._frame_size = max(1, sum(map(len, frames)) // len(frames))
            kept = fitting(frames, max_bytes)
            if kept < len(frames):
                frames, covered = frames[:kept], positions[kept - 1]
        return Frames(frames, covered, from_log=True)

    def behind_window(self, after: int) -> bool:
        """Whether a reader at ``after`` would be paged from the log rather than memory."""
        return after < self.head and not (self._events and after + 1 >= self._first)

    def _from_window(self, after: int, filter: EventFilter, limit: int) -> Page:
        start = after + 1 - self._first
        if filter.is_empty:
            chunk = self._events[start:start + limit]
            return Page(chunk, chunk[-1].position)
        matched: list[Event] = []
        covered = after
        # Scan a bounded stretch so that a sparse filter cannot stall the event loop.
        for event in self._events[start:start + limit * 20]:
            covered = event.position
            if filter.matches(event):
                matched.append(event)
                if len(matched) >= limit:
                    break
        return Page(matched, covered)


def _size(event: Event) -> int:
    return len(event.data_json) + len(event.meta_json)


def fitting(frames: Sequence[str], max_bytes: int) -> int:
    """How many of ``frames``, from the first, come to ``max_bytes`` at most (at least one)."""
    size = 0
    for count, frame in enumerate(frames):
        size += len(frame)
        if size > max_bytes and count:
            return count
    return len(frames)
