"""The event log on each backend: group commit, ordering, reads, filters and the hash chain."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import re
import sqlite3
import time
import uuid

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from pipeline import migrate
from pipeline.errors import LogUnavailable, NotFound
from pipeline.log import GENESIS_HASH, Event, EventFilter, EventLog, NewEvent, Transaction
from pipeline.log.model import canonical_json, glob_regex, new_id, safe_text
from pipeline.processing.consumers import stage_position


def verify_chain(events: list[Event]) -> None:
    previous = GENESIS_HASH
    for expected_position, event in enumerate(events, start=1):
        assert event.position == expected_position
        assert event.expected_hash(previous) == event.hash, event.position
        previous = event.hash


async def read_everything(log: EventLog, page: int = 1000) -> list[Event]:
    found: list[Event] = []
    while batch := await log.read(found[-1].position if found else 0, page):
        found.extend(batch)
    return found


async def test_concurrent_appends_share_commits_and_get_contiguous_positions(
        event_log: EventLog) -> None:
    results = await asyncio.gather(*(
        event_log.append([NewEvent(f"s-{i}", "test.one", {"i": i}),
                          NewEvent(f"s-{i}", "test.two", {"i": i})])
        for i in range(300)
    ))
    for pair in results:  # one request's events are adjacent: they commit together
        assert pair[1].position == pair[0].position + 1
    events = await read_everything(event_log)
    assert len(events) == 600 and await event_log.head() == 600
    verify_chain(events)
    assert sorted(e.data["i"] for e in events if e.type == "test.one") == list(range(300))


async def test_a_unit_whose_write_the_database_refuses_fails_alone(
        event_log: EventLog) -> None:
    """One unit staging a value its column cannot hold fails; the others of its group commit
    are committed all the same, in order, as if it had never been."""

    async def poisoned(tx: Transaction) -> None:
        tx.append(NewEvent("s-poison", "test.poison", {}))
        stage_position(tx, "bot", 2**70)  # beyond a BIGINT: refused by the driver

    good = [event_log.append([NewEvent(f"s-{i}", "test.one", {"i": i})]) for i in range(20)]
    bad = event_log.transact(poisoned)
    results = await asyncio.gather(*good[:10], bad, *good[10:], return_exceptions=True)
    assert isinstance(results[10], LogUnavailable), results[10]
    assert "nothing was recorded" in str(results[10])
    committed = [r for r in results if not isinstance(r, BaseException)]
    assert len(committed) == 20, [r for r in results if isinstance(r, BaseException)]
    events = await read_everything(event_log)
    assert [e.data["i"] for e in events] == list(range(20))  # the order they were sent in
    assert await event_log.head() == 20
    verify_chain(events)
    assert event_log.failure is None  # the log is writable: /readyz says so


async def test_read_after_limit_and_filters(event_log: EventLog) -> None:
    await event_log.append([
        NewEvent("signal-a", "signal.received", {}, {"ticker": "AAA", "strategy": "s1"}),
        NewEvent("signal-a", "signal.accepted", {}, {"ticker": "AAA", "strategy": "s1"}),
        NewEvent("signal-b", "signal.received", {}, {"ticker": "BBB"}),
        NewEvent("other", "sys_event", {}, {}),
        NewEvent("other", "sysXevent", {}, {}),
    ])
    assert [e.position for e in await event_log.read(1, 2)] == [2, 3]
    by_glob = await event_log.read(0, 10, EventFilter(types=("signal.*",)))
    assert [e.position for e in by_glob] == [1, 2, 3]
    # "_" is not a wildcard, only * and ? are, in SQL as in memory
    assert [e.position for e in await event_log.read(0, 10, EventFilter(types=("sys_event",)))
            ] == [4]
    assert [e.position for e in await event_log.read(0, 10, EventFilter(types=("sys?event",)))
            ] == [4, 5]
    assert [e.position for e in await event_log.read(0, 10, EventFilter(tickers=("AAA",)))
            ] == [1, 2]
    both = EventFilter(types=("signal.received",), tickers=("AAA", "BBB"))
    assert [e.position for e in await event_log.read(0, 10, both)] == [1, 3]
    assert [e.position for e in await event_log.read(0, 10, EventFilter(strategies=("s1",)))
            ] == [1, 2]
    assert [e.position for e in await event_log.read(0, 10, EventFilter(streams=("other",)))
            ] == [4, 5]
    everything = await read_everything(event_log)
    for candidate in (EventFilter(types=("signal.*",)), both, EventFilter(types=("sys?event",))):
        in_memory = [e.position for e in everything if candidate.matches(e)]
        assert in_memory == [e.position for e in await event_log.read(0, 10, candidate)]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_append_waits_for_a_lock_held_elsewhere_then_commits(
        event_log: EventLog, database_url: str) -> None:
    """The writer takes a free lock at once; a lock another process holds is waited for (up
    to the busy timeout), not refused, and not on the event loop's thread, which goes on
    serving meanwhile; the head read once the lock is ours is the latest."""
    await event_log.append([NewEvent("s", "test.before", {})])
    other = sqlite3.connect(database_url.split("///", 1)[1], isolation_level=None)
    loop = asyncio.get_running_loop()
    gaps: list[float] = []

    async def tick() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            gaps.append(loop.time() - before)

    ticker = asyncio.create_task(tick())
    try:
        other.execute("BEGIN IMMEDIATE")
        appending = asyncio.create_task(event_log.append([NewEvent("s", "test.waited", {})]))
        await asyncio.sleep(0.3)  # the append must still be waiting: nothing has released it
        assert not appending.done()
        assert len(gaps) >= 10 and max(gaps) < 0.2  # the loop was never held by the wait
        other.execute("INSERT INTO events (position, id, stream, type, data, meta, time, hash)"
                      " VALUES (2, 'other', 's', 'test.other', '{}', '{}', 't', 'h')")
        other.execute("UPDATE log_head SET position = 2, hash = 'h'")
        other.execute("COMMIT")
        (event,) = await asyncio.wait_for(appending, 5)
    finally:
        ticker.cancel()
        other.close()
    assert event.position == 3
    assert [e.type for e in await event_log.read(0)] == ["test.before", "test.other",
                                                         "test.waited"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_units_past_the_commit_timeout_fail_each_at_its_own_deadline(
        database_url: str) -> None:
    """A commit that cannot happen (the database locked elsewhere) fails each waiting unit
    with LogUnavailable once it has waited ``commit_timeout``, not before, oldest first; the
    log goes on once the lock is released and keeps nothing of the units it answered, though
    the first had been taken into a group commit, which waited for the lock."""
    await migrate.upgrade_async(database_url)
    event_log = await EventLog.open(database_url, commit_timeout=0.6)
    other = sqlite3.connect(database_url.split("///", 1)[1], isolation_level=None)
    loop = asyncio.get_running_loop()
    failed_at: dict[str, float] = {}

    async def append(name: str) -> None:
        try:
            await event_log.append([NewEvent("s", name, {})])
        except LogUnavailable as exc:
            failed_at[name] = loop.time()
            assert "did not commit within 0.6 s; nothing was recorded" in str(exc)

    try:
        other.execute("BEGIN IMMEDIATE")
        started = loop.time()
        first = asyncio.create_task(append("test.first"))
        await asyncio.sleep(0.3)
        second = asyncio.create_task(append("test.second"))
        second_started = loop.time()
        await asyncio.sleep(0.1)
        assert not first.done() and not second.done()  # neither is due yet
        await asyncio.wait_for(first, 5)
        assert not second.done()  # its own deadline is later
        await asyncio.wait_for(second, 5)
        assert failed_at["test.first"] - started >= 0.59
        assert failed_at["test.second"] - second_started >= 0.59
        other.execute("ROLLBACK")
        (event,) = await asyncio.wait_for(event_log.append([NewEvent("s", "test.after", {})]), 5)
        assert event.type == "test.after"
        assert not event_log._waiting  # answered units are not kept
        assert [e.type for e in await event_log.read(0)] == ["test.after"]
    finally:
        other.close()
        await event_log.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_unit_whose_caller_stopped_waiting_is_committed_all_the_same(
        database_url: str) -> None:
    """A caller that stops waiting (its task cancelled: the request of a client that went
    away) is never answered that nothing was recorded: its unit is committed once the log
    can, even after its deadline, while one whose caller was answered 503 is dropped."""
    await migrate.upgrade_async(database_url)
    event_log = await EventLog.open(database_url, commit_timeout=0.3)
    other = sqlite3.connect(database_url.split("///", 1)[1], isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        waiting = asyncio.create_task(event_log.append([NewEvent("s", "test.given_up", {})]))
        deadline = time.monotonic() + 5
        while not event_log._waiting:  # queued
            assert time.monotonic() < deadline, "the append was never queued"
            await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(LogUnavailable):  # queued after it: answered after its deadline
            await event_log.append([NewEvent("s", "test.answered", {})])
        other.execute("ROLLBACK")
        await asyncio.wait_for(event_log.append([NewEvent("s", "test.after", {})]), 5)
        assert [e.type for e in await event_log.read(0)] == ["test.given_up", "test.after"]
    finally:
        other.close()
        await event_log.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_group_commit_held_up_by_a_lock_fails_as_a_whole_within_the_timeout(
        database_url: str) -> None:
    """A lock held elsewhere (an operator's ``LOCK TABLE events``) holds up a group
    commit's writes: the commit fails once it has waited about ``commit_timeout``, as a whole
    and with nothing of it written, and is not tried again a unit at a time (each would wait
    as long again, and land after its caller was answered) nor waited out for as long as the
    lock is held."""
    await migrate.upgrade_async(database_url)
    event_log = await EventLog.open(database_url, commit_timeout=0.5)
    admin = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        async with admin.transaction():
            await admin.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            outcomes = await asyncio.gather(*(  # queued at once: one group commit
                event_log.append([NewEvent("s", f"test.held{i}", {})]) for i in range(3)),
                return_exceptions=True)
            assert all(isinstance(o, LogUnavailable) for o in outcomes), outcomes
            deadline = time.monotonic() + 3
            while event_log.failure is None:
                assert time.monotonic() < deadline, "the group commit waited for the lock"
                await asyncio.sleep(0.01)
            assert "lock" in event_log.failure
        (after,) = await asyncio.wait_for(event_log.append([NewEvent("s", "test.after", {})]),
                                          5)
        assert [e.type for e in await event_log.read(0)] == ["test.after"]
        assert after.position == 1
    finally:
        await admin.close()
        await event_log.close()


@pytest.mark.parametrize(("value", "expected"), [
    ("BTCUSDT", "BTCUSDT"), ("a\x00b", "ab"), ("\x00", None), ("", None), (None, None),
    (42, None), ("x" * 150, "x" * 100), ("\ud800é", "?é"), ("é\x00" * 80, "é" * 80),
])
def test_safe_text_is_storable_in_every_backend_index(value: object, expected: str | None) -> None:
    assert safe_text(value, 100) == expected


def test_glob_only_knows_star_and_question_mark() -> None:
    assert re.match(glob_regex("signal.*"), "signal.accepted")
    assert not re.match(glob_regex("signal.*"), "signalXaccepted")
    assert not re.match(glob_regex("[s]ignal"), "signal")
    assert not re.match(glob_regex("signal"), "signal.accepted")


async def test_a_failing_unit_leaves_no_trace_and_does_not_fail_its_batch(
        event_log: EventLog) -> None:
    async def good(tx: Transaction) -> int:
        return tx.append(NewEvent("s", "ok", {})).position

    async def bad(tx: Transaction) -> int:
        tx.append(NewEvent("s", "half-written", {}))
        raise NotFound("refused after appending")

    outcomes = await asyncio.gather(event_log.transact(good), event_log.transact(bad),
                                    event_log.transact(good), return_exceptions=True)
    assert isinstance(outcomes[1], NotFound)
    events = await read_everything(event_log)
    assert [e.type for e in events] == ["ok", "ok"]
    verify_chain(events)


async def test_unicode_and_lone_surrogates_are_stored_and_hashed(event_log: EventLog) -> None:
    await event_log.append([NewEvent("s", "t", {"text": "emoji \U0001f680 and \x00 nul",
                                                "broken": json.loads('"\\ud800"')},
                                     {"strategy": "x\x00y"})])
    (event,) = await read_everything(event_log)
    assert event.data["text"] == "emoji \U0001f680 and \x00 nul"
    assert event.data["broken"] == "\ud800"
    verify_chain([event])


async def test_frames_read_from_rows_are_the_events_as_appended(event_log: EventLog) -> None:
    """Catch-up's frames, built from the rows without an Event: valid JSON however the
    stream and type must be escaped, each the event that was appended."""
    names = ["plain", 'quo"te', "back\\slash", "ünïcode", "tab\tand\nline", "\u2028",
             "\U0001f680", "\x7f"]
    appended = await event_log.append([NewEvent(f"s-{name}", f"t.{name}", {"name": name},
                                                {"n": i}) for i, name in enumerate(names)])
    frames = await event_log.read_frames(0, 100)
    assert [position for position, _ in frames] == [e.position for e in appended]
    for (_, frame), event, name in zip(frames, appended, names, strict=True):
        assert json.loads(frame) == {
            "op": "event", "position": event.position, "id": event.id, "stream": f"s-{name}",
            "type": f"t.{name}", "data": {"name": name}, "meta": {"n": names.index(name)},
            "time": event.time, "hash": event.hash}
        assert frame == event.frame
    assert await event_log.read_frames(appended[-2].position, 100) == frames[-1:]


async def test_epoch_is_stable_and_head_starts_at_zero(database_url: str) -> None:
    await migrate.upgrade_async(database_url)
    first = await EventLog.open(database_url)
    try:
        assert await first.head() == 0
        epoch = first.epoch
    finally:
        await first.close()
    await migrate.upgrade_async(database_url)  # idempotent: no new epoch
    second = await EventLog.open(database_url)
    try:
        assert second.epoch == epoch
    finally:
        await second.close()


async def test_an_unmigrated_database_is_refused_clearly(database_url: str) -> None:
    with pytest.raises(LogUnavailable, match="signalbox migrate"):
        await EventLog.open(database_url)


async def test_closing_commits_what_is_queued(event_log: EventLog, database_url: str) -> None:
    pending = [asyncio.ensure_future(event_log.append([NewEvent("s", "t", {"i": i})]))
               for i in range(100)]
    await asyncio.sleep(0)
    await event_log.close()
    done = await asyncio.gather(*pending)
    reopened = await EventLog.open(database_url)
    try:
        assert await reopened.head() == len(done) == 100
    finally:
        await reopened.close()


def _writer_process(url: str, writer: int, count: int) -> None:
    async def main() -> None:
        log = await EventLog.open(url)
        try:
            for i in range(count):
                await log.append([NewEvent(f"w{writer}", "race", {"w": writer, "i": i})
                                  for _ in range(random.randint(1, 3))])
        finally:
            await log.close()

    asyncio.run(main())


async def test_readers_never_miss_a_position_that_commits_later(database_url: str) -> None:
    """Writers in separate processes race; a reader tails by cursor and must see every
    position exactly once, in order: a later commit may never take a smaller position."""
    await migrate.upgrade_async(database_url)
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer_process, args=(database_url, w, 150))
               for w in range(4)]
    for process in writers:
        process.start()
    reader = await EventLog.open(database_url)
    seen: list[int] = []
    try:
        cursor = 0
        while any(p.is_alive() for p in writers) or cursor < await reader.head():
            for event in await reader.read(cursor, 50):
                assert event.position == cursor + 1, f"gap or repeat after {cursor}"
                cursor = event.position
                seen.append(cursor)
            await asyncio.sleep(0.001)
        for process in writers:
            process.join(30)
            assert process.exitcode == 0
        head = await reader.head()
        assert seen == list(range(1, head + 1))
        verify_chain(await read_everything(reader))
        async with reader.engines.reader.connect() as conn:
            per_writer = (await conn.execute(text(
                "SELECT stream, count(*) FROM events GROUP BY stream"))).all()
        assert sum(n for _, n in per_writer) == head
    finally:
        await reader.close()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=3000, deadline=None)
@given(JSON_VALUES | st.floats(allow_nan=False, allow_infinity=False).map(lambda f: [f, {"f": f}])
       | st.sampled_from([1e-4, 1e-5, -1e-5, 1e15, 1e16, 1.5e300, 5e-324, 0.1, 67432.5, -0.0]))
def test_canonical_json_is_the_documented_encoding_byte_for_byte(value: object) -> None:
    # The hash chain is defined over json.dumps(sort_keys, compact, ensure_ascii=False), which
    # clients re-compute; the fast encoder must agree on every value, exponents and all.
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert canonical_json(value) == expected


def test_new_ids_are_uuid7_text_ordered_by_their_millisecond_and_random_after_it() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(4000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    stamps = []
    for made in ids:
        parsed = uuid.UUID(made)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert str(parsed) == made  # lower case, dashed, as the log's ids have always been
        stamps.append(parsed.int >> 80)
    assert before <= stamps[0] and stamps[-1] <= after
    assert stamps == sorted(stamps)  # made later, sorted later (to the millisecond)
    # After the time every bit is random: each hex digit takes all its values somewhere, the
    # variant's digit its four.
    digits = [{made[i] for made in ids} for i in range(15, 36)]
    assert [len(d) for d in digits] == [
        1 if i in (18, 23) else 4 if i == 19 else 16 for i in range(15, 36)
    ]


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\x00\x1f\x7f\u2028"])
def test_canonical_json_of_text_that_is_not_unicode_is_ascii_escaped(text: str) -> None:
    encoded = canonical_json({"k": text})
    encoded.encode("utf-8")  # storable
    assert json.loads(encoded) == {"k": text}


async def test_a_filter_matches_in_memory_what_it_matches_in_the_log(
        event_log: EventLog) -> None:
    """Tickers and strategies are indexed cut to their column's length and without NUL: the
    in-memory match (live subscribers, the window) compares the same text."""
    long = "s" * 250
    appended = await event_log.append([
        NewEvent("signal-a", "signal.received", {}, {"ticker": "AA\x00PL", "strategy": long}),
        NewEvent("signal-b", "signal.received", {}, {"ticker": "T" * 120, "strategy": "x"}),
    ])
    for found in (EventFilter(strategies=(long[:200],)), EventFilter(tickers=("AAPL",)),
                  EventFilter(tickers=("T" * 100,)), EventFilter(strategies=(long,))):
        in_log = [e.position for e in await event_log.read(0, 10, found)]
        in_memory = [e.position for e in appended if found.matches(e)]
        assert in_memory == in_log, found
