"""The hub's pages for subscribers, on each backend, in the test's process."""

from __future__ import annotations

import json
import tracemalloc

from pipeline.hub import FIRST_ROWS, PAGE_BYTES, Hub
from pipeline.log import EventFilter, EventLog, NewEvent


async def test_a_page_from_the_log_is_bounded_in_bytes_and_loses_nothing(
        event_log: EventLog) -> None:
    """Behind the window, a page holds about ``PAGE_BYTES`` of frames, however many events
    were asked for: a slow reader holds it (and the next) while it is sent. Its ``covered``
    stops at its last event, so that paging on gets every event once, in order."""
    big = "x" * 60_000  # a webhook's body, as large as it may be
    for i in range(40):
        await event_log.append([NewEvent(f"s-{i}", "test.big", {"body": big}),
                                NewEvent(f"s-{i}", "test.small", {"i": i})])
    hub = Hub(event_log, window=100, page_size=500)
    await hub.start()  # with an empty window: every page comes from the log
    try:
        for event_filter, expected in [(EventFilter(), list(range(1, 81))),
                                       (EventFilter(types=("test.big",)), list(range(1, 81, 2)))]:
            positions: list[int] = []
            after = 0
            while after < hub.head:
                page = await hub.frames(after, event_filter, 500)
                assert page.from_log and page.covered > after
                assert len(page.frames) <= 1 or sum(map(len, page.frames)) <= PAGE_BYTES
                positions += [json.loads(frame)["position"] for frame in page.frames]
                after = page.covered
            assert positions == expected
    finally:
        await hub.stop()


async def test_the_first_page_from_the_log_is_small_until_the_size_of_frames_is_known(
        event_log: EventLog) -> None:
    """How many rows fit in ``PAGE_BYTES`` is learnt from the frames paged last; before any
    page, a first one of a few rows is read, not ``limit`` rows of events that may each be
    a webhook's 64 KiB."""
    big = "x" * 60_000
    for i in range(100):
        await event_log.append([NewEvent(f"s-{i}", "test.big", {"body": big})])
    hub = Hub(event_log, window=100, page_size=500)
    await hub.start()
    try:
        tracemalloc.start()
        try:
            first = await hub.frames(0, EventFilter(), 500)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert 1 <= len(first.frames) <= FIRST_ROWS and first.covered == len(first.frames)
        assert peak < 8 * PAGE_BYTES  # 100 rows of 60 KB, read at once, come to over 6 MB
        second = await hub.frames(first.covered, EventFilter(), 500)  # now by their size
        assert len(second.frames) == PAGE_BYTES // 60_000
    finally:
        await hub.stop()
