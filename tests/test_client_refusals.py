"""The client library against a server that says "not now": a token over its ingestion rate
(429 with Retry-After), an address refused after failed authentications (429, 4429).

The waits are measured, not assumed: a transport around the real one notes when each attempt
left and when its answer came back, and the gap before the next attempt of the same signal is
held against the Retry-After that answer carried.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from itertools import pairwise

import httpx
import pytest

from replay import (
    Backoff,
    Client,
    Subscriber,
    SyncClient,
    TooManyRequests,
    Unauthorized,
    Worker,
)
from replay._http import retry_after_seconds, retry_delay
from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    ServerProcess,
    read_all_events,
    sqlite_only,
)
from tests.test_client import BTC, until

SQLITE = sqlite_only("the waits are the client's and the HTTP layer's, the same on both")

# Were Retry-After ignored, this backoff would send every retry within 10 ms.
HASTY = Backoff(base=0.01, cap=0.01)


@dataclass(frozen=True)
class Attempt:
    key: str
    sent: float
    answered: float
    status: int
    retry_after: float | None


class Recording(httpx.AsyncBaseTransport, httpx.BaseTransport):
    """The real transport (asynchronous or blocking), noting every attempt."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.blocking = httpx.HTTPTransport()
        self.attempts: list[Attempt] = []

    def _note(self, request: httpx.Request, sent: float, response: httpx.Response) -> None:
        header = response.headers.get("retry-after")
        self.attempts.append(Attempt(request.headers.get("idempotency-key", ""), sent,
                                     time.monotonic(), response.status_code,
                                     float(header) if header is not None else None))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.monotonic()
        response = await self.inner.handle_async_request(request)
        await response.aread()
        self._note(request, sent, response)
        return response

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.monotonic()
        response = self.blocking.handle_request(request)
        response.read()
        self._note(request, sent, response)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()

    def close(self) -> None:
        self.blocking.close()

    def by_signal(self) -> list[list[Attempt]]:
        found: dict[str, list[Attempt]] = defaultdict(list)
        for attempt in self.attempts:
            found[attempt.key].append(attempt)
        return list(found.values())


def assert_each_retry_waited_as_asked(tries: list[Attempt]) -> None:
    """Every attempt but the last was a 429, and the next one left no sooner than its
    Retry-After said (and not much later: the wait is the server's, not a long backoff)."""
    for before, after in pairwise(tries):
        assert before.status == 429 and before.retry_after is not None, before
        gap = after.sent - before.answered
        assert before.retry_after - 0.02 <= gap <= before.retry_after + 2.0, (before, gap)


def start(database_url: str, *args: str) -> ServerProcess:
    return ServerProcess(database_url, args=list(args)).start()


@SQLITE
async def test_a_burst_over_the_ingestion_rate_all_lands_after_the_waits_asked(
        database_url: str) -> None:
    server = start(database_url, "--ingest-rate", "2", "--ingest-burst", "2")
    try:
        transport = Recording()
        async with Client(server.base_url, INGEST_TOKEN, transport=transport, retries=6,
                          backoff=HASTY) as client:
            started = time.monotonic()
            receipts = await asyncio.gather(*(client.send_signal({**BTC, "comment": str(n)})
                                              for n in range(8)))
            elapsed = time.monotonic() - started
        assert len({r.signal_id for r in receipts}) == 8
        assert not any(r.duplicate for r in receipts)  # a refused attempt records nothing
        refused = [a for a in transport.attempts if a.status == 429]
        assert len(refused) >= 6, transport.attempts  # 2 at once, then 2 a second
        tries = transport.by_signal()
        assert len(tries) == 8
        for attempts in tries:
            assert attempts[-1].status == 202
            assert_each_retry_waited_as_asked(attempts)
        slowest = max(tries, key=len)
        assert elapsed >= sum(a.retry_after or 0 for a in slowest[:-1]) - 0.02
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            events = await read_all_events(http)
        assert sum(e["type"] == "signal.accepted" for e in events) == 8
        assert len(events) == 16
    finally:
        server.stop()


@SQLITE
async def test_spent_retries_and_long_waits_raise_too_many_requests(
        database_url: str) -> None:
    server = start(database_url, "--ingest-rate", "0.5", "--ingest-burst", "1")
    try:
        async with Client(server.base_url, INGEST_TOKEN) as client:
            await client.send_signal(BTC)  # this token's bucket is empty now
        # No retries left: raised at once, with the wait the server asked for.
        transport = Recording()
        async with Client(server.base_url, INGEST_TOKEN, transport=transport,
                          retries=0) as client:
            started = time.monotonic()
            with pytest.raises(TooManyRequests) as spent:
                await client.send_signal(BTC)
            assert time.monotonic() - started < 1
        error = spent.value
        assert (error.status, error.code) == (429, "too_many_requests")
        assert error.retry_after == transport.attempts[0].retry_after
        assert error.retry_after is not None and error.retry_after >= 1
        assert "after 1 attempts" in error.message
        # A wait over max_retry_after is not waited for either.
        async with Client(server.base_url, INGEST_TOKEN, max_retry_after=0.5) as client:
            started = time.monotonic()
            with pytest.raises(TooManyRequests) as too_long:
                await client.send_signal(BTC)
            assert time.monotonic() - started < 1
        assert too_long.value.retry_after is not None and too_long.value.retry_after >= 1
        assert "not waited for" in too_long.value.message
        # Another token (a bucket of its own), three signals at once, one retry each: one
        # lands at once, one after the 2 s asked, and the third, refused again then, has
        # spent its retries.
        async with Client(server.base_url, ADMIN_TOKEN, retries=1, backoff=HASTY) as client:
            started = time.monotonic()
            outcomes = await asyncio.gather(*(client.send_signal(BTC) for _ in range(3)),
                                            return_exceptions=True)
            elapsed = time.monotonic() - started
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], TooManyRequests), outcomes
        assert errors[0].retry_after is not None and errors[0].retry_after >= 1
        assert "after 2 attempts" in errors[0].message
        assert elapsed >= 2 - 0.02  # the one wait it did make
    finally:
        server.stop()


@SQLITE
async def test_the_blocking_client_waits_as_asked_too(database_url: str) -> None:
    server = start(database_url, "--ingest-rate", "1", "--ingest-burst", "1")
    transport = Recording()

    def script() -> list[str]:
        with SyncClient(server.base_url, INGEST_TOKEN, transport=transport,
                        backoff=HASTY) as client:
            return [client.send_signal(BTC).signal_id for _ in range(3)]

    try:
        assert len(set(await asyncio.to_thread(script))) == 3
        tries = transport.by_signal()
        assert [len(t) > 1 for t in tries] == [False, True, True]
        for attempts in tries:
            assert_each_retry_waited_as_asked(attempts)
    finally:
        server.stop()


@SQLITE
async def test_an_address_refused_for_failed_authentications_is_not_waited_for(
        database_url: str) -> None:
    server = start(database_url, "--auth-failures", "1", "--auth-failure-window", "30")
    try:
        async with Client(server.base_url, "sbx_wrong") as stranger:
            with pytest.raises(Unauthorized):
                await stranger.events()
        transport = Recording()
        async with Client(server.base_url, INGEST_TOKEN, transport=transport) as client:
            started = time.monotonic()
            with pytest.raises(TooManyRequests) as refused:
                await client.send_signal(BTC)
            assert time.monotonic() - started < 1.5
        assert refused.value.code == "too_many_auth_failures"
        assert refused.value.retry_after is not None and 1 <= refused.value.retry_after <= 30
        assert len(transport.attempts) == 1  # nothing to gain from asking again
    finally:
        server.stop()


@SQLITE
async def test_a_worker_waits_out_a_refused_address_and_reports_the_outcome(
        database_url: str) -> None:
    window = 2.0
    # 127.0.0.1 is a trusted proxy: the test reads as another address (X-Forwarded-For),
    # while the worker and its handler come from 127.0.0.1 itself.
    server = start(database_url, "--auth-failures", "1", "--auth-failure-window",
                   str(window), "--trusted-proxies", "127.0.0.1/32")
    worker = Worker(server.base_url, ADMIN_TOKEN, consumer="bot", backoff=HASTY)
    locked_at: list[float] = []

    @worker.handler
    async def handle(signal: dict[str, object], event: object) -> str:
        # Someone at the worker's address fails to authenticate: the worker's report of
        # the outcome is refused for the rest of the window.
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            answer = await http.get("/api/events", headers={"Authorization": "Bearer x"})
        assert answer.status_code == 401
        locked_at.append(time.monotonic())
        return "done"

    running = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.state == "live" or running.done())
        async with Client(server.base_url, INGEST_TOKEN) as client:
            receipt = await client.send_signal(BTC)
        elsewhere = {"Authorization": f"Bearer {ADMIN_TOKEN}",
                     "X-Forwarded-For": "203.0.113.9"}
        async with httpx.AsyncClient(base_url=server.base_url, headers=elsewhere) as reader:
            deadline = time.monotonic() + 20
            path = f"/api/signals/{receipt.signal_id}"
            while (await reader.get(path)).json()["status"] != "processed":
                assert not running.done(), running
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            reported_at = time.monotonic()
        assert worker.processed == 1 and not running.done()
        assert reported_at - locked_at[0] >= window - 1  # the refusal was waited out
    finally:
        worker.stop()
        try:
            await asyncio.wait_for(running, 10)
        finally:
            server.stop()


@SQLITE
async def test_a_subscriber_refused_with_4429_waits_as_asked_before_it_dials_again(
        database_url: str) -> None:
    server = start(database_url, "--auth-failures", "1", "--auth-failure-window", "3")
    try:
        async with Client(server.base_url, INGEST_TOKEN) as client:
            receipt = await client.send_signal(BTC)
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            assert (await http.get("/api/events", headers={"Authorization": "Bearer x"})
                    ).status_code == 401  # this address is refused for 3 s from now
            subscriber = Subscriber(server.base_url, ADMIN_TOKEN, cursor=0,
                                    filter={"types": ["signal.accepted"]},
                                    backoff=Backoff(base=0.01, cap=5))
            try:
                event = await asyncio.wait_for(anext(aiter(subscriber)), 20)
            finally:
                await subscriber.close()
            assert event.position == receipt.position and subscriber.connections == 1
            metrics = (await http.get("/metrics")).text
        # Dialling on the backoff alone (10 ms, 20 ms, ...) would have been refused some
        # eight times in those 3 s.
        found = re.search(r'signalbox_websocket_closes_total\{code="4429"\} (\d+)', metrics)
        assert found is not None and 1 <= int(found.group(1)) <= 2, metrics
    finally:
        server.stop()


@SQLITE
async def test_a_subscriber_refused_by_a_busy_server_waits_its_retry_after(
        database_url: str) -> None:
    server = start(database_url, "--limit-concurrency", "3")
    try:
        async with Client(server.base_url, INGEST_TOKEN) as client:
            receipt = await client.send_signal(BTC)
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        subscriber = Subscriber(server.base_url, ADMIN_TOKEN, cursor=0,
                                filter={"types": ["signal.accepted"]},
                                backoff=Backoff(base=0.01, cap=5))
        reading = asyncio.create_task(anext(aiter(subscriber)))
        try:
            # Each refused upgrade (503, Retry-After: 1) is a warning in the server's log:
            # note when each appears.
            refused: list[float] = []
            deadline = time.monotonic() + 15
            while len(refused) < 2:
                count = sum("over the concurrency limit" in line for line in server.output)
                refused += [time.monotonic()] * (count - len(refused))
                assert time.monotonic() < deadline and not reading.done()
                await asyncio.sleep(0.01)
            for _, writer in held:
                writer.close()
            event = await asyncio.wait_for(reading, 15)
        finally:
            await subscriber.close()
        assert event.position == receipt.position
        # On the backoff alone it would have dialled again within 20 ms.
        assert refused[1] - refused[0] >= 1 - 0.1, refused
    finally:
        server.stop()


def test_retry_after_is_seconds_or_a_date_counted_from_the_answer() -> None:
    sent = datetime(2025, 1, 15, 14, 45, 0, tzinfo=UTC)
    later = format_datetime(sent + timedelta(seconds=90), usegmt=True)
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(" 0 ") == 0.0
    assert retry_after_seconds(later, format_datetime(sent, usegmt=True)) == 90.0
    # Without the answer's Date, a date is counted from this clock; a past one is now.
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 28 <= (retry_after_seconds(soon) or 0) <= 30
    assert retry_after_seconds(format_datetime(sent, usegmt=True)) == 0.0
    for unreadable in (None, "", "-1", "1.5", "soon", "99999999999"):
        assert retry_after_seconds(unreadable) is None, unreadable


def test_a_429_without_retry_after_follows_the_backoff() -> None:
    request = httpx.Request("POST", "http://127.0.0.1/api/signals")
    bare = httpx.Response(429, json={"error": "too_many_requests", "message": "slow down"},
                          request=request)
    delays = {retry_delay(bare, 3, retries=5, backoff=Backoff(1, 4), max_retry_after=0.5,
                          url="u") for _ in range(50)}
    assert all(d is not None and 0 <= d <= 4 for d in delays) and len(delays) > 1
    with pytest.raises(TooManyRequests) as spent:
        retry_delay(bare, 5, retries=5, backoff=Backoff(1, 4), max_retry_after=30, url="u")
    assert spent.value.retry_after is None and "after 6 attempts" in spent.value.message


def test_a_503_or_proxy_answer_with_retry_after_waits_at_least_that() -> None:
    """A server at its connection limit answers 503 ``server_busy`` with ``Retry-After: 1``:
    sending again sooner (the backoff's first waits are under a second) only spends the
    retries. A wait over ``max_retry_after`` is capped there; without one, the backoff."""
    request = httpx.Request("POST", "http://127.0.0.1/api/signals")
    for status in (503, 502, 504):
        busy = httpx.Response(status, json={"error": "server_busy", "message": "busy"},
                              headers={"Retry-After": "2"}, request=request)
        delays = [retry_delay(busy, 0, retries=5, backoff=Backoff(0.5, 30),
                              max_retry_after=30, url="u") for _ in range(50)]
        assert all(d is not None and 2 <= d <= 2.5 for d in delays), (status, delays)
        capped = retry_delay(busy, 0, retries=5, backoff=Backoff(0.5, 30), max_retry_after=1,
                             url="u")
        assert capped is not None and capped <= 1
    bare = httpx.Response(503, json={"error": "log_unavailable", "message": "down"},
                          request=request)
    delays = [retry_delay(bare, 0, retries=5, backoff=Backoff(0.5, 30), max_retry_after=30,
                          url="u") for _ in range(50)]
    assert all(d is not None and 0 <= d <= 0.5 for d in delays) and len(set(delays)) > 1
