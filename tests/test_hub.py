"""The hub's pages for subscribers, on each backend, in the test's process."""

from __future__ import annotations

import json

from pipeline.hub import PAGE_BYTES, Hub
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
