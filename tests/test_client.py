"""The client library against a real server: subscribe and resume, send, report, work.

Faults are real: the server is SIGKILLed and restarted, SIGSTOPped, pointed at a new log, its
SQLite write lock held by another connection; a lost answer is a response read from the real
server and then thrown away by the transport.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import signal
import socket
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import replay
import replay.client
from replay import (
    Backoff,
    Checkpoint,
    Client,
    Conflict,
    EpochChanged,
    Event,
    FileCursorStore,
    Forbidden,
    MemoryCursorStore,
    NotFound,
    Rejected,
    SignalboxClientError,
    Subscriber,
    SyncClient,
    Unauthorized,
    Unavailable,
    Worker,
    subscribe,
)
from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    ServerProcess,
    TcpProxy,
    read_all_events,
    wait_until,
)

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}
FAST = Backoff(base=0.05, cap=0.5)  # quick reconnects, so the tests spend little time waiting

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


# -- helpers -------------------------------------------------------------------------------


async def until(predicate: Callable[[], bool], within: float = 20.0) -> None:
    """Poll ``predicate`` until it holds, failing after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.01)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    """Like `until`, for a check that has to ask the server."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


class Collector:
    """``async for`` over a subscriber in a task, keeping every event it yields."""

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber
        self.events: list[Event] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for event in self.subscriber:
            self.events.append(event)

    @property
    def positions(self) -> list[int]:
        return [e.position for e in self.events]

    async def until(self, predicate: Callable[[], bool], within: float = 30.0) -> None:
        await until(lambda: predicate() or self.task.done(), within)
        if self.task.done():
            self.task.result()  # raises what ended the subscription
            raise AssertionError("the subscription ended early")

    async def until_position(self, position: int, within: float = 30.0) -> None:
        await self.until(lambda: bool(self.events) and self.events[-1].position >= position,
                         within)

    async def close(self) -> None:
        await self.subscriber.close()
        await self.task


async def head_of(server: ServerProcess) -> tuple[str, int]:
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        body = (await http.get("/readyz")).json()
    return body["epoch"], body["head"]


async def log_of(server: ServerProcess) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        return await read_all_events(http)


class FaultyTransport(httpx.AsyncBaseTransport):
    """The real transport, with the answers of the first ``lose`` matching requests read from
    the server and then lost, as when a connection drops after the server has committed."""

    def __init__(self, lose: int = 0, path: str = "/api/signals") -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.lose = lose
        self.path = re.compile(path)
        self.requests: list[tuple[str, str]] = []
        self.statuses: list[int] = []
        self.saw_503 = threading.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path))
        response = await self.inner.handle_async_request(request)
        await response.aread()
        self.statuses.append(response.status_code)
        if response.status_code == 503:
            self.saw_503.set()
        if self.lose and request.method == "POST" and self.path.fullmatch(request.url.path):
            self.lose -= 1
            raise httpx.ReadError("the answer was lost", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def hold_write_lock(database_url: str) -> sqlite3.Connection:
    connection = sqlite3.connect(database_url.split("///", 1)[1], isolation_level=None,
                                 check_same_thread=False)
    connection.execute("BEGIN IMMEDIATE")
    return connection


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# -- the public surface --------------------------------------------------------------------


def test_exported_names_and_the_error_hierarchy_match_the_docstring() -> None:
    assert sorted(replay.__all__) == sorted(replay.client.__all__)
    for name in replay.__all__:
        assert getattr(replay, name) is getattr(replay.client, name)
    doc = replay.client.__doc__ or ""
    drawn = set(re.findall(r"[├└]── (\w+)", doc))
    errors = {name for name in replay.__all__
              if isinstance(getattr(replay, name), type)
              and issubclass(getattr(replay, name), SignalboxClientError)}
    assert drawn == errors - {"SignalboxClientError"}
    assert "SignalboxClientError" in doc


def test_backoff_is_full_jitter_within_the_window() -> None:
    backoff = Backoff(base=0.5, cap=30.0)
    rng = random.Random(20250115)
    for attempt in range(14):
        ceiling = min(30.0, 0.5 * 2**attempt)
        assert backoff.ceiling(attempt) == ceiling
        samples = [backoff.delay(attempt, rng) for _ in range(2000)]
        assert all(0.0 <= s <= ceiling for s in samples)
        # Full jitter uses the whole window, not only its upper half ("equal jitter").
        assert min(samples) < 0.05 * ceiling
        assert max(samples) > 0.95 * ceiling
    assert backoff.ceiling(100_000) == 30.0


def test_file_cursor_store_replaces_the_file_atomically(tmp_path: Path) -> None:
    store = FileCursorStore(tmp_path / "state" / "cursor.json")
    assert store.read() is None
    store.write(Checkpoint("epoch-1", 41))
    store.write(Checkpoint("epoch-1", 42))
    assert store.read() == Checkpoint("epoch-1", 42)
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["cursor.json"]
    assert asyncio.run(store.load()) == Checkpoint("epoch-1", 42)
    (tmp_path / "state" / "cursor.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a cursor file"):
        store.read()


# -- Subscriber ----------------------------------------------------------------------------


@sqlite_only
async def test_subscriber_replays_then_goes_live(server: ServerProcess) -> None:
    async with Client(server.base_url, INGEST_TOKEN) as client:
        await client.send_signal(BTC)
        await client.send_signal({**BTC, "ticker": "ETHUSDT"})
        collector = Collector(Subscriber(server.base_url, ADMIN_TOKEN, cursor=0))
        await collector.until_position(4)
        await until(lambda: collector.subscriber.state == "live")
        assert collector.positions == [1, 2, 3, 4]
        receipt = await client.send_signal({**BTC, "ticker": "SOLUSDT"})
        await collector.until_position(receipt.position)
    await collector.close()
    assert collector.positions == [1, 2, 3, 4, 5, 6]
    accepted = collector.events[5]
    assert accepted.type == "signal.accepted" and accepted.data["signal"]["ticker"] == "SOLUSDT"
    assert accepted.signal_id == receipt.signal_id and isinstance(accepted.time, datetime)
    assert collector.subscriber.state == "closed" and collector.subscriber.connections == 1


@sqlite_only
async def test_filtered_subscriber_keeps_the_live_position_as_its_cursor(
        server: ServerProcess) -> None:
    async with Client(server.base_url, INGEST_TOKEN) as client:
        for ticker in ("BTCUSDT", "ETHUSDT", "BTCUSDT"):
            await client.send_signal({**BTC, "ticker": ticker})
    store = MemoryCursorStore()
    subscriber = Subscriber(server.base_url, ADMIN_TOKEN, cursor=0, store=store,
                            filter={"types": ["signal.accepted"], "tickers": ["ETHUSDT"]})
    collector = Collector(subscriber)
    await collector.until(lambda: subscriber.state == "live")
    # Replay looked up to 6; the only match was 4. Resuming from 4 would re-scan 5 and 6.
    assert collector.positions == [4] and subscriber.cursor == 6
    await collector.until(lambda: store.checkpoint == Checkpoint(subscriber.epoch, 6))
    await collector.close()


@sqlite_only
async def test_without_autocommit_only_commit_moves_the_saved_cursor(
        server: ServerProcess) -> None:
    async with Client(server.base_url, INGEST_TOKEN) as client:
        for _ in range(3):
            await client.send_signal(BTC)
    store = MemoryCursorStore()
    subscriber = Subscriber(server.base_url, ADMIN_TOKEN, cursor=0, store=store,
                            autocommit=False)
    seen = []
    async for event in subscriber:
        seen.append((event.position, store.checkpoint))
        if event.position == 6:
            break
    epoch = subscriber.epoch
    assert seen == [(p, Checkpoint(epoch, 0)) for p in range(1, 7)]
    await subscriber.commit()
    assert store.checkpoint == subscriber.committed == Checkpoint(epoch, 6)
    await subscriber.close()


async def test_subscriber_survives_kill_and_restart_without_gap_or_repeat(
        server: ServerProcess, tmp_path: Path) -> None:
    store = FileCursorStore(tmp_path / "cursor.json")
    writer = Client(server.base_url, INGEST_TOKEN, retries=60, backoff=FAST)
    for i in range(10):
        await writer.send_signal({**BTC, "comment": f"before {i}"})
    subscriber = Subscriber(server.base_url, ADMIN_TOKEN, cursor=0, store=store, backoff=FAST)
    collector = Collector(subscriber)
    await collector.until(lambda: len(collector.events) >= 5)

    async def write() -> None:  # keyed retries carry it over the outages
        for i in range(60):
            await writer.send_signal({**BTC, "comment": f"during {i}"})

    writing = asyncio.create_task(write())
    for _ in range(2):  # two crashes while events stream live
        target = len(collector.events) + 12
        await collector.until(lambda: len(collector.events) >= target)  # noqa: B023
        server.kill()
        await collector.until(lambda: subscriber.state == "reconnecting")
        await asyncio.to_thread(server.restart)
    await writing
    await writer.aclose()
    epoch, head = await head_of(server)
    await collector.until_position(head)
    # It may hold every event before the last restart completes: it still reconnects.
    await collector.until(lambda: subscriber.connections >= 3)
    await collector.close()

    logged = await log_of(server)
    assert collector.positions == list(range(1, head + 1)), "a gap or a repeat"
    assert [e.id for e in collector.events] == [e["id"] for e in logged]
    assert len([e for e in logged if e["type"] == "signal.accepted"]) == 70
    assert store.read() == Checkpoint(epoch, head)

    # A new instance resumes from the stored cursor: nothing again, nothing missed.
    async with Client(server.base_url, INGEST_TOKEN) as client:
        receipt = await client.send_signal(BTC)
    second = Subscriber(server.base_url, ADMIN_TOKEN, store=FileCursorStore(store.path))
    async for event in second:
        assert event.position == head + 1
        break  # taken but not handled: not saved
    await second.close()
    assert store.read() == Checkpoint(epoch, head)
    third = Subscriber(server.base_url, ADMIN_TOKEN, store=FileCursorStore(store.path))
    seen = []
    async for event in third:
        seen.append(event.position)
        if event.position == receipt.position:
            await third.commit()
            break
    await third.close()
    assert seen == [head + 1, head + 2]
    assert store.read() == Checkpoint(epoch, head + 2)


@sqlite_only
async def test_epoch_change_raises_with_both_epochs(server: ServerProcess,
                                                    tmp_path: Path) -> None:
    store = FileCursorStore(tmp_path / "cursor.json")
    async with Client(server.base_url, INGEST_TOKEN) as client:
        for _ in range(3):
            await client.send_signal(BTC)
    first = Subscriber(server.base_url, ADMIN_TOKEN, cursor=0, store=store)
    async for event in first:
        if event.position == 6:
            await first.commit()
            break
    await first.close()
    old_epoch, _ = await head_of(server)
    assert store.read() == Checkpoint(old_epoch, 6)

    other = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}").start()
    try:
        new_epoch, _ = await head_of(other)
        async with Client(other.base_url, INGEST_TOKEN) as client:
            await client.send_signal(BTC)
        moved = Subscriber(other.base_url, ADMIN_TOKEN, store=store, backoff=FAST)
        started = time.monotonic()
        with pytest.raises(EpochChanged) as changed:
            async for _ in moved:
                pass
        assert time.monotonic() - started < 5
        assert (changed.value.old_epoch, changed.value.new_epoch) == (old_epoch, new_epoch)
        assert moved.state == "closed" and store.read() == Checkpoint(old_epoch, 6)

        restarting = Subscriber(other.base_url, ADMIN_TOKEN, store=store,
                                on_epoch_change="restart", backoff=FAST)
        positions = []
        async for event in restarting:
            positions.append(event.position)
            if event.position == 2:
                await restarting.commit()
                break
        await restarting.close()
        assert positions == [1, 2]
        assert store.read() == Checkpoint(new_epoch, 2)
    finally:
        other.stop()


@sqlite_only
async def test_epoch_change_under_a_running_subscriber_restarts_from_zero(
        server: ServerProcess, tmp_path: Path) -> None:
    async with Client(server.base_url, INGEST_TOKEN) as client:
        await client.send_signal(BTC)
    store = MemoryCursorStore()
    subscriber = Subscriber(server.base_url, ADMIN_TOKEN, cursor=0, store=store,
                            on_epoch_change="restart", backoff=FAST)
    collector = Collector(subscriber)
    await collector.until(lambda: subscriber.state == "live")
    old_epoch = subscriber.epoch
    server.stop()
    # The database is replaced: a new log, served on the same address.
    replacement = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'new.db'}")
    replacement.port = server.port
    replacement.start()
    try:
        async with Client(replacement.base_url, INGEST_TOKEN) as client:
            await client.send_signal({**BTC, "ticker": "NEWLOG"})
        await collector.until(lambda: len(collector.events) == 4)
        assert collector.positions == [1, 2, 1, 2]
        assert collector.events[3].data["signal"]["ticker"] == "NEWLOG"
        new_epoch, _ = await head_of(replacement)
        assert subscriber.epoch == new_epoch != old_epoch
        await collector.close()
        assert store.checkpoint is not None and store.checkpoint.epoch == new_epoch
    finally:
        replacement.stop()


@sqlite_only
async def test_bad_tokens_are_refused_at_once_without_a_reconnect_loop(
        server: ServerProcess) -> None:
    for token, error in (("sbx_wrong", Unauthorized), (INGEST_TOKEN, Forbidden)):
        subscriber = Subscriber(server.base_url, token, cursor=0, backoff=Backoff(5, 5))
        started = time.monotonic()
        with pytest.raises(error) as refused:  # a reconnect loop would never raise
            async for _ in subscriber:
                pass
        assert time.monotonic() - started < 3.0
        assert refused.value.status in (4401, 4403) and refused.value.message
        assert subscriber.state == "closed" and subscriber.connections == 0


@sqlite_only
async def test_silent_link_is_dropped_and_pings_keep_a_busy_subscriber_connected(
        database_url: str) -> None:
    heartbeat = 0.3
    server = ServerProcess(database_url, args=["--heartbeat", str(heartbeat)]).start()
    try:
        async with Client(server.base_url, INGEST_TOKEN, retries=40, backoff=FAST) as client:
            await client.send_signal(BTC)
            subscriber = Subscriber(server.base_url, ADMIN_TOKEN, cursor=0, backoff=FAST)
            stream = aiter(subscriber)
            assert (await anext(stream)).position == 1
            # A handler busy for 6 heartbeats: the passing time is what is tested here. The
            # server closes a client silent for 2 heartbeats; the keepalive must prevent it.
            await asyncio.sleep(6 * heartbeat)
            assert (await anext(stream)).position == 2
            waiting = asyncio.create_task(anext(stream))
            await asyncio.sleep(6 * heartbeat)  # idle, waiting for events: pings answered
            await client.send_signal(BTC)
            assert [(await waiting).position, (await anext(stream)).position] == [3, 4]
            assert subscriber.connections == 1 and subscriber.state == "live"

            server.signal(signal.SIGSTOP)  # the link stays open, and goes silent
            try:
                waiting = asyncio.create_task(anext(stream))
                started = time.monotonic()
                await until(lambda: subscriber.state == "reconnecting", within=10)
                assert time.monotonic() - started < 2 * heartbeat + 1.5
            finally:
                server.signal(signal.SIGCONT)
            receipt = await client.send_signal(BTC)
            assert (await waiting).position == 5
            assert (await anext(stream)).position == receipt.position == 6
            assert subscriber.connections >= 2
            await subscriber.close()
    finally:
        server.signal(signal.SIGCONT)
        server.stop()


# -- Client --------------------------------------------------------------------------------


@sqlite_only
async def test_send_signal_retried_after_a_lost_answer_makes_one_signal(
        server: ServerProcess) -> None:
    transport = FaultyTransport(lose=1)
    async with Client(server.base_url, INGEST_TOKEN, transport=transport, backoff=FAST) as c:
        receipt = await c.send_signal(BTC)  # no key given: the client makes one
    assert transport.requests.count(("POST", "/api/signals")) == 2
    assert receipt.duplicate  # the retry was recognized as a repeat of the first attempt
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        received = [e for e in await read_all_events(http) if e["type"] == "signal.received"
                    and e["data"]["signal_id"] == receipt.signal_id]
    # A time-ordered UUID, which the server's index of keys takes at its end.
    assert uuid.UUID(received[0]["data"]["idempotency_key"]).version == 7
    async with Client(server.base_url, ADMIN_TOKEN) as reader:
        page = await reader.signals()
        assert [s.signal_id for s in page.signals] == [receipt.signal_id]
        keyed = await Client(server.base_url, INGEST_TOKEN).send_signal(BTC, "order-7")
        again = await Client(server.base_url, INGEST_TOKEN).send_signal(BTC, "order-7")
        assert (again.signal_id, again.duplicate) == (keyed.signal_id, True)
        assert len((await reader.signals()).signals) == 2


@sqlite_only
async def test_invalid_signal_raises_rejected_with_errors_and_is_not_retried(
        server: ServerProcess) -> None:
    transport = FaultyTransport()
    async with Client(server.base_url, INGEST_TOKEN, transport=transport) as client:
        with pytest.raises(Rejected) as rejected:
            await client.send_signal({**BTC, "action": "hodl"})
    assert transport.requests == [("POST", "/api/signals")]
    error = rejected.value
    assert error.status == 422 and error.signal_id and error.position == 2
    assert [e["field"] for e in error.errors] == ["action"]
    assert "action" in str(error)


@sqlite_only
async def test_503_is_retried_until_the_log_commits(database_url: str) -> None:
    server = ServerProcess(database_url, env={"SIGNALBOX_COMMIT_TIMEOUT": "0.5"}).start()
    transport = FaultyTransport()
    lock = hold_write_lock(database_url)

    def release_after_a_refusal() -> None:
        transport.saw_503.wait(30)
        lock.execute("ROLLBACK")

    releaser = threading.Thread(target=release_after_a_refusal)
    releaser.start()
    try:
        async with Client(server.base_url, INGEST_TOKEN, transport=transport, retries=10,
                          backoff=Backoff(0.2, 1.0)) as client:
            receipt = await client.send_signal(BTC)
        assert 503 in transport.statuses and transport.statuses[-1] in (200, 202)
        events = await log_of(server)
        assert [e["type"] for e in events if e["type"] == "signal.received"] == [
            "signal.received"]
        assert receipt.signal_id == events[0]["data"]["signal_id"]
    finally:
        transport.saw_503.set()
        releaser.join()
        lock.close()
        server.stop()


@sqlite_only
async def test_a_gateway_502_while_the_server_restarts_is_retried_as_unavailable(
        server: ServerProcess) -> None:
    """Behind a reverse proxy, a server that is down or restarting answers 502 (or 504): the
    signal is sent again until it is back, and once the retries are spent the error is
    `Unavailable`, which a worker waits out as it does a 503."""
    async with TcpProxy(server, gateway=True) as proxy:
        server.stop()
        async with Client(proxy.base_url, INGEST_TOKEN, retries=50,
                          backoff=Backoff(0.05, 0.3)) as client:
            sending = asyncio.create_task(client.send_signal(BTC, idempotency_key="gw-1"))
            await until(lambda: proxy.bad_gateways >= 1 or sending.done())
            await asyncio.to_thread(server.restart)
            receipt = await sending
        assert proxy.bad_gateways >= 1
        assert [e["data"]["signal_id"] for e in await log_of(server)
                if e["type"] == "signal.received"] == [receipt.signal_id]

        server.stop()
        async with Client(proxy.base_url, INGEST_TOKEN, retries=2,
                          backoff=Backoff(0.01, 0.01)) as client:
            with pytest.raises(Unavailable) as spent:
                await client.send_signal(BTC)
        assert spent.value.status == 502
        server.restart()


@sqlite_only
async def test_retries_are_bounded_and_end_in_unavailable(database_url: str) -> None:
    server = ServerProcess(database_url, env={"SIGNALBOX_COMMIT_TIMEOUT": "0.3"}).start()
    lock = hold_write_lock(database_url)
    try:
        transport = FaultyTransport()
        async with Client(server.base_url, INGEST_TOKEN, transport=transport, retries=2,
                          backoff=Backoff(0.01, 0.05)) as client:
            with pytest.raises(Unavailable) as refused:
                await client.send_signal(BTC)
        assert refused.value.code == "log_unavailable" and transport.statuses == [503] * 3
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        server.stop()
    nobody = Client(f"http://127.0.0.1:{free_port()}", INGEST_TOKEN, retries=2,
                    backoff=Backoff(0.01, 0.05))
    with pytest.raises(Unavailable) as unreachable:
        await nobody.send_signal(BTC)
    assert unreachable.value.code == "unreachable"
    await nobody.aclose()


@sqlite_only
async def test_reads_are_typed_and_errors_are_not_retried(server: ServerProcess) -> None:
    async with Client(server.base_url, INGEST_TOKEN) as client:
        btc = await client.send_signal({**BTC, "strategy": "breakout"})
        await client.send_signal({**BTC, "ticker": "ETHUSDT"})
    async with Client(server.base_url, ADMIN_TOKEN) as reader:
        page = await reader.events(types="signal.accepted", tickers=["BTCUSDT"])
        assert [e.position for e in page.events] == [btc.position]
        assert page.next == page.head == 4
        timeline = await reader.signal(btc.signal_id)
        assert timeline.status == "accepted" and timeline.signal.strategy == "breakout"
        assert timeline.signal.normalized is not None
        assert [e.type for e in timeline.events] == ["signal.received", "signal.accepted"]
        listed = await reader.signals(ticker="ETHUSDT")
        assert [s.ticker for s in listed.signals] == ["ETHUSDT"]
        with pytest.raises(NotFound) as missing:
            await reader.signal("no-such-signal")
        assert missing.value.code == "not_found"
    transport = FaultyTransport()
    async with Client(server.base_url, "sbx_wrong", transport=transport) as stranger:
        with pytest.raises(Unauthorized):
            await stranger.events()
    assert len(transport.requests) == 1


# -- the sync facade -----------------------------------------------------------------------


@sqlite_only
async def test_sync_client_and_subscribe_work_from_plain_code(server: ServerProcess,
                                                              tmp_path: Path) -> None:
    path = tmp_path / "cursor.json"

    def script() -> tuple[list[int], list[Checkpoint | None]]:
        with SyncClient(server.base_url, INGEST_TOKEN) as client:
            receipts = [client.send_signal({**BTC, "comment": str(i)}) for i in range(3)]
        with SyncClient(server.base_url, ADMIN_TOKEN) as reader:
            assert reader.signal(receipts[0].signal_id).status == "accepted"
            assert len(reader.events().events) == 6
            with pytest.raises(NotFound):
                reader.signal("nope")
        store = FileCursorStore(path)
        positions, saved = [], []
        with subscribe(server.base_url, ADMIN_TOKEN, cursor=0, store=store) as events:
            for event in events:
                positions.append(event.position)
                saved.append(store.read())  # read while the event is in hand
                if event.position == receipts[-1].position:
                    break
        return positions, saved

    positions, saved = await asyncio.to_thread(script)
    epoch, _ = await head_of(server)
    assert positions == [1, 2, 3, 4, 5, 6]
    # The cursor moves over an event only once the caller asks for the next one.
    assert saved == [Checkpoint(epoch, p) for p in (0, 1, 2, 3, 4, 5)]
    assert FileCursorStore(path).read() == Checkpoint(epoch, 5)

    def refused() -> None:
        with subscribe(server.base_url, "sbx_wrong", cursor=0) as events:
            next(events)

    with pytest.raises(Unauthorized):
        await asyncio.to_thread(refused)


@sqlite_only
async def test_closing_a_subscription_from_another_thread_ends_the_iteration(
        server: ServerProcess) -> None:
    async with Client(server.base_url, INGEST_TOKEN) as client:
        receipt = await client.send_signal(BTC)

    def script() -> tuple[list[int | str], bool]:
        store = MemoryCursorStore()
        events = subscribe(server.base_url, ADMIN_TOKEN, cursor=0, store=store)
        seen: list[int | str] = []

        def read() -> None:
            try:
                seen.extend(event.position for event in events)
                seen.append("ended")
            except Exception as exc:
                seen.append(repr(exc))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        # The checkpoint moves over the last event when the reader asks for the next one:
        # from then on it waits for an event that does not come.
        wait_until(lambda: store.checkpoint is not None
                   and store.checkpoint.position == receipt.position)
        events.close()
        reader.join(10)
        return seen, reader.is_alive()

    seen, still_reading = await asyncio.to_thread(script)
    assert not still_reading
    assert seen == [receipt.position - 1, receipt.position, "ended"]


# -- status reports and the Worker ---------------------------------------------------------


@sqlite_only
async def test_report_status_after_a_lost_answer_is_success_only_for_its_claimer(
        server: ServerProcess) -> None:
    async with Client(server.base_url, INGEST_TOKEN) as client:
        receipt = await client.send_signal(BTC)
    transport = FaultyTransport(lose=1, path=r"/api/signals/[^/]+/status")
    async with Client(server.base_url, ADMIN_TOKEN, transport=transport, backoff=FAST) as bot:
        claim = await bot.report_status(receipt.signal_id, "processing", consumer="bot-1")
        assert claim.status == "processing" and claim.position == receipt.position + 1
        assert [s for s in transport.statuses if s == 409] == [409]  # the retry's answer
    async with Client(server.base_url, ADMIN_TOKEN) as other:
        with pytest.raises(Conflict) as taken:
            await other.report_status(receipt.signal_id, "processing", consumer="bot-2")
        assert taken.value.code == "illegal_transition"
        done = await other.report_status(receipt.signal_id, "processed", {"result": 1},
                                         consumer="bot-1")
        assert done.status == "processed"
        assert (await other.signal(receipt.signal_id)).status == "processed"


async def start_worker(worker: Worker) -> asyncio.Task[None]:
    task = asyncio.create_task(worker.run())
    await until(lambda: worker.state == "live" or task.done())
    if task.done():
        task.result()
    return task


async def post_concurrently(url: str, signals: list[dict[str, Any]]) -> list[str]:
    async with Client(url, INGEST_TOKEN, retries=10, backoff=FAST) as client:
        receipts = await asyncio.gather(*(client.send_signal(s) for s in signals))
    return [r.signal_id for r in receipts]


def outcomes(events: list[dict[str, Any]], kind: str) -> list[str]:
    return [e["data"]["signal_id"] for e in events if e["type"] == f"signal.{kind}"]


@sqlite_only
async def test_worker_processes_each_signal_once_and_reports_failures(
        server: ServerProcess) -> None:
    worker = Worker(server.base_url, ADMIN_TOKEN, consumer="bot-1")
    handled: list[str] = []

    @worker.handler
    async def handle(signal: dict[str, Any], event: Event) -> Any:
        handled.append(signal["ticker"])
        if signal["ticker"] == "FAIL":
            raise ValueError("no liquidity")
        return {"filled": signal["quantity"]}

    task = await start_worker(worker)
    ids = await post_concurrently(server.base_url, [
        {**BTC, "ticker": "FAIL" if i == 7 else f"T{i}"} for i in range(20)])
    await until(lambda: worker.processed + worker.failed == 20 or task.done())
    worker.stop()
    await task
    events = await log_of(server)
    processed = outcomes(events, "processed")
    assert sorted(processed + outcomes(events, "failed")) == sorted(ids)
    assert len(set(processed)) == len(processed) == 19 and len(handled) == 20
    failed = next(e for e in events if e["type"] == "signal.failed")
    assert failed["data"]["detail"] == {"error": "no liquidity", "type": "ValueError"}
    done = next(e for e in events if e["type"] == "signal.processed")
    assert done["data"]["detail"] == {"result": {"filled": "0.01"}}
    assert done["data"]["consumer"] == "bot-1"


@sqlite_only
async def test_worker_reports_every_outcome_even_those_the_server_refuses_as_they_are(
        server: ServerProcess, caplog: pytest.LogCaptureFixture) -> None:
    worker = Worker(server.base_url, ADMIN_TOKEN, consumer="bot-1")

    @worker.handler
    async def handle(signal: dict[str, Any], event: Event) -> Any:
        if signal["ticker"] == "BIG":  # over the server's body limit, 64 KiB
            return {"blob": "x" * 70_000}
        if signal["ticker"] == "LOUD":
            raise RuntimeError("y" * 100_000)
        if signal["ticker"] == "NAN":  # not JSON: the server refuses NaN and Infinity
            return {"pnl": math.nan, "high": math.inf, "low": -math.inf}
        if signal["ticker"] == "LOOP":  # no JSON at all: it holds itself
            looped: dict[str, Any] = {}
            looped["self"] = looped
            return looped
        return "fine"

    task = await start_worker(worker)
    tickers = ("BIG", "LOUD", "NAN", "LOOP", "FINE")
    ids = dict(zip(tickers, await post_concurrently(
        server.base_url, [{**BTC, "ticker": t} for t in tickers]), strict=True))
    await until(lambda: worker.processed + worker.failed == len(tickers) or task.done())
    assert not task.done(), "the worker died"
    worker.stop()
    await task
    async with Client(server.base_url, ADMIN_TOKEN) as reader:
        timelines = {t: await reader.signal(i) for t, i in ids.items()}
    assert {t: timeline.status for t, timeline in timelines.items()} == {
        "BIG": "processed", "LOUD": "failed", "NAN": "processed", "LOOP": "processed",
        "FINE": "processed"}

    def detail(ticker: str) -> Any:
        return timelines[ticker].events[-1].data["detail"]

    assert detail("BIG") == {"unreported": {
        "error": "payload_too_large",
        "message": "the body is over 65536 bytes: send a smaller message"}}
    assert detail("LOUD") == {"error": "y" * 2000 + "… (100000 characters in all)",
                              "type": "RuntimeError"}
    assert detail("NAN") == {"result": {"pnl": "NaN", "high": "Infinity", "low": "-Infinity"}}
    assert detail("LOOP")["unreported"]["error"] == "not_json"
    assert detail("FINE") == {"result": "fine"}
    refused = [r for r in caplog.records if r.levelno == logging.ERROR
               and ids["BIG"] in r.getMessage()]
    assert len(refused) == 1 and "payload_too_large" in refused[0].getMessage()


async def test_competing_workers_process_each_signal_exactly_once(
        server: ServerProcess) -> None:
    workers = [Worker(server.base_url, ADMIN_TOKEN, consumer=name, backoff=FAST)
               for name in ("bot-a", "bot-b")]
    for worker in workers:
        worker.handler(slow_echo)
    tasks = [await start_worker(w) for w in workers]
    ids = await post_concurrently(server.base_url, [BTC] * 30)
    # Each worker sees every signal: one claims it, the other's claim is refused.
    await until(lambda: all(w.processed + w.skipped == 30 for w in workers), within=60)
    for worker in workers:
        worker.stop()
    await asyncio.gather(*tasks)
    events = await log_of(server)
    assert sorted(outcomes(events, "processed")) == sorted(ids)
    assert sorted(outcomes(events, "processing")) == sorted(ids)
    assert sum(w.processed for w in workers) == 30


async def slow_echo(signal: dict[str, Any], event: Event) -> Any:
    await asyncio.sleep(0)  # let the other worker interleave
    return event.position


@sqlite_only
async def test_worker_resumes_after_its_acknowledged_position(server: ServerProcess) -> None:
    first = Worker(server.base_url, ADMIN_TOKEN, consumer="bot-1")
    first.handler(slow_echo)
    task = await start_worker(first)
    before = await post_concurrently(server.base_url, [BTC] * 5)
    await until(lambda: first.processed == 5)
    first.stop()
    await task
    assert first.subscriber.committed is not None
    handled = first.subscriber.committed.position
    async with Client(server.base_url, ADMIN_TOKEN) as reader:

        async def acknowledged() -> bool:  # the server stores the final ack asynchronously
            found = (await reader.consumers()).consumers
            return bool(found) and found[0].position >= handled

        await eventually(acknowledged)
    missed = await post_concurrently(server.base_url, [BTC] * 4)  # while no worker runs

    second = Worker(server.base_url, ADMIN_TOKEN, consumer="bot-1")
    second.handler(slow_echo)
    task = await start_worker(second)
    await until(lambda: second.processed == 4)
    async with Client(server.base_url, ADMIN_TOKEN) as reader:
        listed = (await reader.consumers()).consumers
    second.stop()
    await task
    events = await log_of(server)
    assert sorted(outcomes(events, "processed")) == sorted(before + missed)
    assert second.skipped == 0  # it resumed after the acknowledged ones, not before
    assert [c.name for c in listed] == ["bot-1"]


@sqlite_only
async def test_consumer_group_members_split_the_tickers(server: ServerProcess) -> None:
    tickers = [f"T{i}" for i in range(12)]
    members = [Worker(server.base_url, ADMIN_TOKEN, consumer=f"bot-{i}", group=("bots", i, 2))
               for i in range(2)]
    seen: list[list[str]] = [[], []]
    for index, worker in enumerate(members):
        worker.handler(recorder(seen[index]))
    tasks = [await start_worker(w) for w in members]
    await post_concurrently(server.base_url, [{**BTC, "ticker": t} for t in tickers])
    await until(lambda: sum(w.processed for w in members) == len(tickers))
    for worker in members:
        worker.stop()
    await asyncio.gather(*tasks)
    for index in range(2):
        assert sorted(seen[index]) == sorted(
            t for t in tickers if zlib.crc32(t.encode()) % 2 == index)
    assert all(w.skipped == 0 for w in members)


def recorder(into: list[str]) -> Callable[[dict[str, Any], Event], Awaitable[Any]]:
    async def handle(signal: dict[str, Any], event: Event) -> Any:
        into.append(signal["ticker"])
        return None

    return handle

