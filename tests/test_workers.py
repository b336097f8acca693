"""``signalbox serve --workers N``: N processes on one port and one log. Clients see one
server: every subscriber, whichever worker holds it, gets the whole log in order; a worker
that dies is started again, and nothing it acknowledged is lost; the supervisor stops them
all, gracefully, and they do not outlive it."""

from __future__ import annotations

import asyncio
import signal
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest
import websockets

from replay import Subscriber
from replay._stream import SubscriberState
from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    ServerProcess,
    next_frame,
    read_all_events,
    verify_chain,
    ws_connect,
)
from tests.test_client import FAST, Collector
from tests.test_crash import Acknowledged
from tests.test_faults import until

# SLOW_POLL: nothing but the workers' wake-ups can bring one worker's commits to another's
# subscribers within the tests' deadlines.
from tests.test_localwake import BTC, SLOW_POLL
from tests.test_metrics import scrape, value


def workers_of(server: ServerProcess) -> list[psutil.Process]:
    assert server.process is not None
    supervisor = psutil.Process(server.process.pid)
    return [child for child in supervisor.children()
            if "spawn_main" in " ".join(child.cmdline())]


def established(worker: psutil.Process, port: int) -> int:
    return sum(1 for c in worker.net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


async def spread_subscribers(server: ServerProcess, pids: Callable[[], set[int]],
                             most: int = 200) -> list[Collector]:
    """Subscribers from cursor 0, opened until every worker in ``pids()`` holds one."""
    collectors: list[Collector] = []
    while len(collectors) < most:
        collector = Collector(Subscriber(server.base_url, ADMIN_TOKEN, cursor=0,
                                         backoff=FAST))
        collectors.append(collector)
        await collector.until(live(collector))
        holding = {w.pid for w in workers_of(server) if established(w, server.port)}
        if pids() <= holding:
            return collectors
    raise AssertionError(f"{most} subscribers, and a worker held none of them")


def live(collector: Collector) -> Callable[[], bool]:
    return lambda: collector.subscriber.state == SubscriberState.LIVE


async def post_on_fresh_connections(server: ServerProcess, count: int,
                                    acknowledged: set[str]) -> None:
    """Each signal on a connection of its own, 8 at a time: each may land on any worker."""
    limits = httpx.Limits(max_keepalive_connections=0)

    async def one() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, limits=limits,
                                     timeout=30) as client:
            response = await client.post("/api/signals", json=BTC, headers={
                "Authorization": f"Bearer {INGEST_TOKEN}",
                "Idempotency-Key": str(uuid.uuid4())})
            assert response.status_code == 202, response.text
            acknowledged.add(response.json()["signal_id"])

    for start in range(0, count, 8):
        await asyncio.gather(*(one() for _ in range(min(8, count - start))))


async def test_workers_share_one_port_and_every_subscriber_gets_the_whole_log(
        database_url: str) -> None:
    server = ServerProcess(database_url, env=SLOW_POLL, args=["--workers", "2"]).start()
    collectors: list[Collector] = []
    try:
        workers = workers_of(server)
        assert len(workers) == 2
        collectors = await spread_subscribers(server, lambda: {w.pid for w in workers})
        acknowledged: set[str] = set()
        await post_on_fresh_connections(server, 120, acknowledged)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            events = await read_all_events(http)
        verify_chain(events)
        head = events[-1]["position"]
        assert head == 2 * len(acknowledged) == 240
        recorded = {e["data"]["signal_id"] for e in events if e["type"] == "signal.accepted"}
        assert recorded == acknowledged
        for collector in collectors:
            await collector.until_position(head, within=15)
            assert collector.positions == list(range(1, head + 1))
        # /metrics counts for every worker, whichever worker takes the scrape.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.base_url, limits=limits) as http:
            for _ in range(6):
                samples, _ = await scrape(http)
                assert value(samples, "signalbox_signals_received_total", source="api",
                             outcome="accepted") == 120
                assert value(samples, "signalbox_subscribers") == len(collectors)
                assert value(samples, "signalbox_subscribers_by_state",
                             state="live") == len(collectors)
                assert value(samples, "signalbox_append_seconds_count") >= 120
    finally:
        for collector in collectors:
            await collector.close()
        assert server.stop() == 0


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_killed_worker_is_started_again_and_nothing_acknowledged_is_lost(
        database_url: str) -> None:
    server = ServerProcess(database_url, env=SLOW_POLL, args=["--workers", "2"]).start()
    collectors: list[Collector] = []
    try:
        first = workers_of(server)
        collectors = await spread_subscribers(server, lambda: {w.pid for w in first})
        acknowledged = Acknowledged()
        sending = asyncio.create_task(keep_posting(server, acknowledged))
        acknowledged.target = 50
        await asyncio.wait_for(acknowledged.reached.wait(), 30)
        victim = first[0]
        victim.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.wait, 10)

        def replaced() -> bool:
            now = {w.pid for w in workers_of(server)}
            return len(now) == 2 and victim.pid not in now

        await until(replaced, within=30)
        # The new worker serves: subscribers opened now reach it too.
        collectors += await spread_subscribers(server, lambda: {w.pid for w in workers_of(server)})
        acknowledged.target = len(acknowledged.ids) + 50
        acknowledged.reached.clear()
        await asyncio.wait_for(acknowledged.reached.wait(), 30)
        sending.cancel()
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            events = await read_all_events(http)
        verify_chain(events)
        recorded = {e["data"]["signal_id"] for e in events if e["type"] == "signal.accepted"}
        assert acknowledged.ids <= recorded, "an acknowledged signal was lost"
        head = events[-1]["position"]
        for collector in collectors:  # those of the killed worker resumed elsewhere
            await collector.until_position(head, within=15)
            assert collector.positions == list(range(1, head + 1))
        assert any("starting it again" in line for line in server.output)
    finally:
        for collector in collectors:
            await collector.close()
        server.stop()


async def keep_posting(server: ServerProcess, acknowledged: Acknowledged) -> None:
    """Signals one after the other on fresh connections; a refused or broken one is retried
    with its key (it may or may not have been recorded, but it was never acknowledged)."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=10) as client:
        while True:
            key = str(uuid.uuid4())
            while True:
                try:
                    response = await client.post("/api/signals", json=BTC, headers={
                        "Authorization": f"Bearer {INGEST_TOKEN}", "Idempotency-Key": key})
                except httpx.TransportError:
                    continue
                if response.status_code in (200, 202):
                    acknowledged.add(response.json()["signal_id"])
                    break


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_supervisor_stops_its_workers_gracefully_and_they_do_not_outlive_it(
        database_url: str) -> None:
    server = ServerProcess(database_url, args=["--workers", "2"]).start()
    workers = workers_of(server)
    conn = await ws_connect(server, cursor=None)
    assert (await next_frame(conn))["op"] == "welcome"
    assert server.stop() == 0
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await next_frame(conn)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert not any(w.is_running() for w in workers)

    server.start()  # killed, the supervisor cannot stop them: they stop by themselves
    workers = workers_of(server)
    assert len(workers) == 2
    # Where they meet (pipeline.siblings): the last of them removes it.
    places = {Path(str(c.laddr)).parent for w in workers for c in w.net_connections("unix")
              if str(c.laddr).startswith(tempfile.gettempdir())
              and Path(str(c.laddr)).parent.name.startswith("signalbox-workers-")}
    assert len(places) == 1
    place = places.pop()
    assert place.is_dir()
    server.kill()
    _, alive = await asyncio.to_thread(psutil.wait_procs, workers, 15)
    assert not alive, "a worker outlived its supervisor"
    assert not place.exists()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_worker_that_cannot_start_stops_the_supervisor_with_its_exit_code(
        database_url: str) -> None:
    spec = "tests.handler_fixture:unloadable_in_workers"
    server = ServerProcess(database_url, args=["--workers", "2", "--handler", spec])
    with pytest.raises(RuntimeError, match="server did not start"):
        server.start()
    assert server.process is not None
    assert server.process.wait(30) == 3  # as a single process exits
    output = "".join(server.output)
    assert f"cannot load handler {spec!r}" in output
    assert "could not start; stopping" in output
