"""The in-process handler runner: once per signal, in ticker order, across crashes."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from pipeline.log import EventLog, format_time, utc_now
from pipeline.log.schema import leases
from pipeline.processing.handlers import SIGNATURE_HEADER, sign
from tests.support import (
    INGEST_TOKEN,
    FastClient,
    ServerProcess,
    TcpProxy,
    headers,
    read_all_events,
    take_over,
)

HANDLER = ["--handler", "tests.handler_fixture:record", "--handler-backoff", "0.01",
           "--handler-attempts", "3"]
CONSUMER = "handler:tests.handler_fixture:record"  # its checkpoint's name, and its lease's


def runner_server(database_url: str, record: Path, *extra: str) -> ServerProcess:
    return ServerProcess(database_url, env={"SIGNALBOX_TEST_RECORD": str(record)},
                         args=[*HANDLER, *extra]).start()


def calls(record: Path) -> list[dict[str, Any]]:
    """The handler's calls, in the order they started."""
    return [line for line in journal(record) if not line.get("cancelled")]


def journal(record: Path) -> list[dict[str, Any]]:
    """The handler's calls and cancellations, in the order they happened."""
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines() if line]


async def post_all(server: ServerProcess, bodies: list[dict[str, Any]]) -> list[str]:
    async with FastClient(server.base_url, connections=8) as client:
        answers = await asyncio.gather(*(client.post("/api/signals", body, INGEST_TOKEN)
                                         for body in bodies))
    assert {status for status, _ in answers} == {202}
    return [answer["signal_id"] for _, answer in answers]


async def wait_for_outcomes(server: ServerProcess, count: int,
                            within: float = 60) -> list[dict[str, Any]]:
    """Every event, once ``count`` signals have a final status (polled, with a deadline)."""
    final = {"signal.processed", "signal.failed", "signal.expired"}
    deadline = asyncio.get_running_loop().time() + within
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        while True:
            events = await read_all_events(client)
            if sum(e["type"] in final for e in events) >= count:
                return events
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"only {sum(e['type'] in final for e in events)} of {count}")
            await asyncio.sleep(0.05)


def outcomes(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    by_signal: dict[str, list[str]] = defaultdict(list)
    for event in events:
        if event["type"] not in ("signal.received", "signal.accepted"):
            by_signal[event["data"]["signal_id"]].append(event["type"])
    return by_signal


async def test_each_signal_is_handled_once_and_each_ticker_in_order(
        database_url: str, tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    server = runner_server(database_url, record)
    try:
        bodies = [{"ticker": f"T{i % 4}", "action": "buy", "quantity": "1"} for i in range(80)]
        ids = await post_all(server, bodies)
        events = await wait_for_outcomes(server, len(ids))
    finally:
        server.stop()
    assert all(steps == ["signal.processing", "signal.processed"]
               for steps in outcomes(events).values())
    assert set(outcomes(events)) == set(ids)
    made = calls(record)
    assert Counter(c["signal_id"] for c in made) == Counter(ids)
    for ticker in {c["ticker"] for c in made}:
        positions = [c["position"] for c in made if c["ticker"] == ticker]
        assert positions == sorted(positions), f"{ticker} out of order"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_retries_then_processed_or_failed(database_url: str, tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    server = runner_server(database_url, record)
    try:
        ids = await post_all(server, [
            {"ticker": "A", "action": "buy", "comment": "fail-twice"},
            {"ticker": "B", "action": "buy", "comment": "permanent"},
            {"ticker": "C", "action": "buy", "comment": "always"},
        ])
        events = await wait_for_outcomes(server, 3)
    finally:
        server.stop()
    final = {e["data"]["signal_id"]: e for e in events
             if e["type"] in ("signal.processed", "signal.failed")}
    assert final[ids[0]]["type"] == "signal.processed"
    assert final[ids[0]]["data"]["detail"]["attempts"] == 3
    assert final[ids[1]]["type"] == "signal.failed"
    assert final[ids[1]]["data"]["detail"] == {"error": "unknown symbol",
                                               "type": "PermanentError", "attempts": 1}
    assert final[ids[2]]["data"]["detail"]["attempts"] == 3
    assert Counter(c["comment"] for c in calls(record)) == {
        "fail-twice": 3, "permanent": 1, "always": 3}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_signal_past_its_max_lag_when_processing_starts_expires(
        database_url: str, tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    server = runner_server(database_url, record)
    try:
        now = format_time(utc_now())
        ids = [  # one after the other: the order of the log is the point
            *await post_all(server, [{"ticker": "X", "action": "buy", "comment": "sleep:2.5"}]),
            *await post_all(server, [{"ticker": "X", "action": "sell", "signal_time": now,
                                      "max_lag": 1}]),
        ]
        events = await wait_for_outcomes(server, 2)
    finally:
        server.stop()
    steps = outcomes(events)
    if steps[ids[0]] != ["signal.processing", "signal.processed"]:
        pytest.fail(f"first signal: {steps[ids[0]]}")
    assert steps[ids[1]] == ["signal.expired"]
    assert [c["signal_id"] for c in calls(record)] == [ids[0]]


async def test_killed_mid_batch_skips_nothing_and_records_each_outcome_once(
        database_url: str, tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    # The restarted instance takes over when the killed one's lease lapses: after 3 s, not the
    # default 10 (the lease itself is tested with three instances below).
    server = runner_server(database_url, record, "--handler-lease", "3")
    try:
        bodies = [{"ticker": f"K{i % 5}", "action": "buy", "comment": "sleep:0.01"}
                  for i in range(250)]
        ids = await post_all(server, bodies)
        deadline = asyncio.get_running_loop().time() + 60
        while len(calls(record)) < 60:  # kill mid-batch: some done, most not
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        server.kill()
        server.restart()
        events = await wait_for_outcomes(server, len(ids))
    finally:
        server.stop()
    steps = outcomes(events)
    assert set(steps) == set(ids)
    assert all(s == ["signal.processing", "signal.processed"] for s in steps.values()), [
        s for s in steps.values() if s != ["signal.processing", "signal.processed"]][:3]
    ran = Counter(c["signal_id"] for c in calls(record))
    assert set(ran) == set(ids)
    # Only a signal in the middle of its handler at the kill may have run twice.
    assert sum(n - 1 for n in ran.values()) <= 5


class Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []
    status = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append((dict(self.headers), body))
        self.send_response(Receiver.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.received = []
    http = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http.server_address[1]}/hook"
    http.shutdown()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("status", [200, 400])
async def test_forward_posts_signed_signals(database_url: str, receiver: str,
                                            status: int) -> None:
    Receiver.status = status
    server = ServerProcess(database_url, env={"SIGNALBOX_FORWARD_SECRET": "hmac-key"}, args=[
        "--handler", "forward", "--forward-url", receiver, "--handler-backoff", "0.01",
        "--handler-attempts", "2"]).start()
    try:
        (signal_id,) = await post_all(server, [{"ticker": "ETHUSDT", "action": "sell",
                                                "quantity": "0.5"}])
        events = await wait_for_outcomes(server, 1)
    finally:
        server.stop()
    headers, body = Receiver.received[0]
    assert headers[SIGNATURE_HEADER] == sign("hmac-key", body)
    assert headers["Idempotency-Key"] == signal_id
    sent = json.loads(body)
    assert sent["signal_id"] == signal_id and sent["signal"]["quantity"] == "0.5"
    final = events[-1]
    if status == 200:
        assert final["type"] == "signal.processed"
    else:  # a 4xx is permanent: no retry
        assert final["type"] == "signal.failed" and len(Receiver.received) == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_builtin_log_handler_and_a_clear_error_for_an_unknown_one(
        database_url: str) -> None:
    server = ServerProcess(database_url, args=["--handler", "log"]).start()
    try:
        await post_all(server, [{"ticker": "LOG", "action": "buy"}])
        events = await wait_for_outcomes(server, 1)
    finally:
        server.stop()
    assert events[-1]["type"] == "signal.processed"
    assert events[-1]["data"]["detail"]["result"] == {"logged": True}
    assert events[-1]["data"]["consumer"] == "handler:log"
    assert any("signal " in line and "LOG" in line for line in server.output)
    broken = ServerProcess(database_url, args=["--handler", "no_such_handler"])
    with pytest.raises(RuntimeError, match="no handler named 'no_such_handler'"):
        broken.start(timeout=20)


async def test_three_instances_run_the_handler_once_and_take_over_from_a_dead_one(
        database_url: str, tmp_path: Path) -> None:
    record = tmp_path / "calls.jsonl"
    servers = [runner_server(database_url, record, "--handler-lease", "1.5")
               for _ in range(3)]
    try:
        first = await post_all(servers[0], [{"ticker": f"N{i % 3}", "action": "buy"}
                                            for i in range(60)])
        await wait_for_outcomes(servers[1], len(first))
        runners = {c["pid"] for c in calls(record)}
        assert len(runners) == 1  # the lease holder alone ran the handler
        (holder,) = runners
        victim = next(s for s in servers if s.process and s.process.pid == holder)
        victim.kill()
        survivor = next(s for s in servers if s is not victim)
        second = await post_all(survivor, [{"ticker": "N9", "action": "sell"}
                                           for _ in range(20)])
        events = await wait_for_outcomes(survivor, len(first) + len(second))
    finally:
        for server in servers:
            server.stop()
    steps = outcomes(events)
    assert all(s == ["signal.processing", "signal.processed"] for s in steps.values())
    assert set(steps) == set(first) | set(second)
    made = calls(record)
    assert Counter(c["signal_id"] for c in made) == Counter(first + second)
    assert {c["pid"] for c in made if c["signal_id"] in second} != {holder}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_holder_cut_off_from_the_database_stops_before_a_sibling_takes_over(
        database_url: str, tmp_path: Path) -> None:
    """Instance A reaches the database through a proxy that goes silent (a partition: no
    error, no answer) while A runs a long handler; B reaches it directly. A must have
    cancelled the handler before B, once the lease lapsed, runs the same signal again."""
    record = tmp_path / "calls.jsonl"
    env = {"SIGNALBOX_TEST_RECORD": str(record)}
    lease = ["--handler-lease", "3"]
    async with TcpProxy(5432) as proxy:
        a = ServerProcess(database_url.replace(":5432/", f":{proxy.port}/"), env=env,
                          args=[*HANDLER, *lease])
        b = ServerProcess(database_url, env=env, args=[*HANDLER, *lease, "--no-migrate"])
        try:
            await asyncio.to_thread(a.start)  # from a thread: the proxy serves on this loop
            await post_all(a, [{"ticker": "FIRST", "action": "buy"}])
            await wait_for_outcomes(a, 1)  # A holds the lease: B starts as a stand-by
            await asyncio.to_thread(b.start)
            (slow,) = await post_all(b, [{"ticker": "SLOW", "action": "buy",
                                          "comment": "sleep:60"}])
            await until(lambda: any(c["signal_id"] == slow for c in calls(record)))
            # Cut A off just after a renewal committed, so that it holds no lock that B would
            # wait for: A's next renewal goes unanswered, and so does everything else.
            async with opened(database_url) as event_log:
                await lease_renewed(event_log)
            proxy.freeze()
            await until(lambda: sum(c["signal_id"] == slow for c in calls(record)) == 2,
                        within=30)
            steps = [(line["pid"], bool(line.get("cancelled")))
                     for line in journal(record) if line["signal_id"] == slow]
        finally:
            proxy.thaw()
            for server in (b, a):
                await asyncio.to_thread(server.stop)
    assert a.process is not None and b.process is not None
    assert steps[:3] == [(a.process.pid, False), (a.process.pid, True),
                         (b.process.pid, False)], steps


async def until(condition: Callable[[], bool], within: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("late", ["claim", "outcome"])
async def test_a_holder_whose_lease_passed_on_unnoticed_records_nothing_more(
        database_url: str, tmp_path: Path, late: str) -> None:
    """A holds the lease, B stands by; the lease passes to an instance whose clock runs ahead
    right after A renewed it, so A, counting on its own clock, runs on. A's next write (the
    claim of a new signal, or the outcome of the handler it is running) must not land, nor
    move the checkpoint; once that lease lapses, whoever takes it runs the signal and records
    its outcome, once."""
    record = tmp_path / "calls.jsonl"
    lease = ["--handler-lease", "9"]  # renewed every 3 s: A notices nothing in between
    a = runner_server(database_url, record, *lease)
    servers = [a]
    try:
        await post_all(a, [{"ticker": "FIRST", "action": "buy"}])
        await wait_for_outcomes(a, 1)  # A holds the lease: B starts as a stand-by
        servers.append(runner_server(database_url, record, *lease))
        async with opened(database_url) as event_log:
            await lease_renewed(event_log)
            if late == "claim":
                checkpoint = await take_over(event_log, CONSUMER, "ahead", 60)
                (signal_id,) = await post_all(a, [{"ticker": "LATE", "action": "buy"}])
            else:
                (signal_id,) = await post_all(a, [{"ticker": "LATE", "action": "buy",
                                                   "comment": "sleep:0.5"}])
                await until(lambda: any(c["signal_id"] == signal_id for c in calls(record)))
                checkpoint = await take_over(event_log, CONSUMER, "ahead", 60)
            kinds = {"signal.processed"} | ({"signal.processing"} if late == "claim" else set())
            landed = await refused_or_recorded(a, signal_id, kinds)
            assert landed == [], "A recorded after the lease had passed on"
            assert await handler_checkpoint(a) == checkpoint
            await take_over(event_log, CONSUMER, "ahead", -1)  # lapsed: take it
        events = await wait_for_outcomes(a, 2)
    finally:
        for server in servers:
            server.stop()
    assert outcomes(events)[signal_id] == ["signal.processing", "signal.processed"]
    runs = [c for c in calls(record) if c["signal_id"] == signal_id]
    assert len(runs) == (1 if late == "claim" else 2), runs  # once after the refusal


async def refused_or_recorded(server: ServerProcess, signal_id: str, kinds: set[str],
                              within: float = 20) -> list[str]:
    """Once ``server`` has said that a write was refused, or ``signal_id`` has an event of
    one of ``kinds`` (polled, with a deadline): those events' types."""
    deadline = asyncio.get_running_loop().time() + within
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        while True:
            said = any("a write was refused" in line for line in server.output)
            found = [e["type"] for e in await read_all_events(client)
                     if e["type"] in kinds and e["data"].get("signal_id") == signal_id]
            if said or found:
                return found
            assert asyncio.get_running_loop().time() < deadline, "neither refused nor recorded"
            await asyncio.sleep(0.05)


async def handler_checkpoint(server: ServerProcess) -> int:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        response = await client.get("/api/consumers", headers=headers())
    response.raise_for_status()
    (found,) = [c for c in response.json()["consumers"] if c["name"] == CONSUMER]
    return int(found["position"])


@asynccontextmanager
async def opened(database_url: str) -> AsyncIterator[EventLog]:
    event_log = await EventLog.open(database_url)
    try:
        yield event_log
    finally:
        await event_log.close()


async def lease_renewed(event_log: EventLog) -> None:
    """Return once the handler's lease has been renewed (polled, with a deadline)."""
    query = select(leases.c.expires_at).where(leases.c.name == CONSUMER)

    async def expiry() -> str | None:
        async with event_log.engines.reader.connect() as conn:
            value: str | None = (await conn.execute(query)).scalar_one_or_none()
        return value

    before = await expiry()
    deadline = asyncio.get_running_loop().time() + 10
    while await expiry() == before:
        assert asyncio.get_running_loop().time() < deadline, "the lease is not renewed"
        await asyncio.sleep(0.01)
