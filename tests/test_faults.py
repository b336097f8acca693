"""PostgreSQL going away under load, and several instances serving one log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import websockets

from pipeline import migrate
from pipeline.log.backends import create_engines, migration_engine, open_connection
from pipeline.log.notify import asyncpg_connect_args
from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    PG_ADMIN_DSN,
    FastClient,
    ServerProcess,
    TcpProxy,
    create_pg_database,
    drop_pg_database,
    headers,
    next_frame,
    read_all_events,
    verify_chain,
    ws_connect,
)

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "1"}


def through(proxy: TcpProxy, database_url: str) -> str:
    return database_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/").replace(
        "@127.0.0.1/", f"@127.0.0.1:{proxy.port}/")


@contextlib.asynccontextmanager
async def behind_a_proxy(env: dict[str, str] | None = None,
                         args: list[str] | None = None) -> AsyncIterator[
        tuple[str, TcpProxy, ServerProcess, httpx.AsyncClient]]:
    """A fresh PostgreSQL database (its URL, the schema in place), and a server that reaches
    it through a `TcpProxy`, with a client; at the end the server is stopped, the proxy let
    go and the database dropped. The proxy serves on this event loop, so the server starts
    from a thread."""
    url, name = await create_pg_database()
    try:
        await migrate.upgrade_async(url)
        async with TcpProxy(5432) as proxy, httpx.AsyncClient(timeout=30) as http:
            server = ServerProcess(through(proxy, url), env=env, args=args)
            try:
                await asyncio.to_thread(server.start)
                yield url, proxy, server, http
            finally:
                proxy.thaw()
                proxy.cut()
                await asyncio.to_thread(server.stop)
    finally:
        await drop_pg_database(name)


async def keep_sending(client: FastClient, acknowledged: set[str], refused: list[int],
                       stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            status, body = await client.post("/api/signals", BTC, INGEST_TOKEN,
                                             {"Idempotency-Key": str(uuid.uuid4())})
        except (OSError, asyncio.IncompleteReadError):
            continue  # not acknowledged; the client dials again
        if status == 202:
            acknowledged.add(body["signal_id"])
        else:
            assert status == 503, (status, body)  # never a 500, never a 4xx for good input
            refused.append(status)
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_postgres_outage_under_load_answers_503_loses_nothing_and_recovers(
        database_url: str) -> None:
    async with TcpProxy(5432) as proxy:
        url = through(proxy, database_url)
        servers = [ServerProcess(url, env={"SIGNALBOX_COMMIT_TIMEOUT": "1"},
                                 args=[] if i == 0 else ["--no-migrate"]) for i in range(2)]
        acknowledged: set[str] = set()
        refused: list[int] = []
        try:
            for server in servers:  # from a thread: the proxy serves on this event loop
                await asyncio.to_thread(server.start)
            subscriber = await ws_connect(servers[1], cursor=0)
            stop = asyncio.Event()
            async with FastClient(servers[0].base_url, connections=2) as one, \
                    FastClient(servers[1].base_url, connections=2) as two, \
                    httpx.AsyncClient(timeout=30) as http:
                senders = [asyncio.create_task(keep_sending(client, acknowledged, refused,
                                                            stop)) for client in (one, two) * 2]
                await until(lambda: len(acknowledged) >= 100)
                proxy.fail()  # the database is gone
                await until(lambda: len(refused) >= 4)
                for server in servers:
                    ready = await http.get(server.base_url + "/readyz")
                    assert ready.status_code == 503, "".join(server.output[-40:])
                before = len(acknowledged)
                await asyncio.sleep(random.uniform(0.5, 2.0))
                proxy.recover()  # and back: no restart of Signalbox
                await until(lambda: len(acknowledged) >= before + 100, within=60)
                for server in servers:  # every instance is ready again by itself
                    assert (await http.get(server.base_url + "/readyz")).status_code == 200
                stop.set()
                await asyncio.gather(*senders)
                http.base_url = httpx.URL(servers[0].base_url)
                events = await read_all_events(http)
            verify_chain(events)
            accepted = {e["data"]["signal_id"] for e in events if e["type"] == "signal.accepted"}
            assert acknowledged <= accepted, f"{len(acknowledged - accepted)} acknowledged lost"
            positions = await receive_until(subscriber, events[-1]["position"])
            assert positions == list(range(1, events[-1]["position"] + 1))
            await subscriber.close()
        finally:
            for server in servers:  # from a thread too: a server stops through the proxy
                await asyncio.to_thread(server.stop)


async def receive_until(conn: Any, head: int) -> list[int]:
    """Positions from a subscriber that reconnects (from its cursor) whenever it is cut off."""
    positions: list[int] = []
    while not positions or positions[-1] < head:
        try:
            frame = await next_frame(conn)
        except websockets.ConnectionClosed:
            raise AssertionError("the subscriber was closed during the outage") from None
        if frame["op"] == "event":
            positions.append(frame["position"])
    return positions


async def until(condition: Any, within: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_three_instances_six_writers_every_subscriber_sees_the_same_log(
        database_url: str) -> None:
    servers = [ServerProcess(database_url, args=[] if i == 0 else ["--no-migrate"]).start()
               for i in range(3)]
    try:
        total = 6 * 150

        async def writer(index: int) -> None:
            async with FastClient(servers[index % 3].base_url, connections=2) as client:
                for _ in range(150):
                    status, _ = await client.post("/api/signals", BTC, INGEST_TOKEN)
                    assert status == 202

        async def subscriber(home: int, hops: int) -> list[int]:
            positions: list[int] = []
            cursor, instance = 0, home
            while len(positions) < 2 * total:
                conn = await ws_connect(servers[instance], cursor=cursor)
                take = random.randint(50, 400) if hops else 10**9
                try:
                    while len(positions) < 2 * total and take > 0:
                        frame = await next_frame(conn, 30)
                        if frame["op"] == "event":
                            assert frame["position"] == cursor + 1, "gap or repeat"
                            cursor = frame["position"]
                            positions.append(cursor)
                            take -= 1
                finally:
                    await conn.close()
                if hops:  # reconnect to another instance, from the cursor
                    hops -= 1
                    instance = random.choice([i for i in range(3) if i != instance])
            return positions

        readers = [asyncio.create_task(subscriber(i % 3, hops=3 if i % 2 else 0))
                   for i in range(6)]
        await asyncio.gather(*(writer(i) for i in range(6)))
        sequences = await asyncio.wait_for(asyncio.gather(*readers), 120)
        assert all(s == list(range(1, 2 * total + 1)) for s in sequences)
        async with httpx.AsyncClient(base_url=servers[2].base_url) as http:
            verify_chain(await read_all_events(http))
            assert (await http.get("/api/events", params={"limit": 1},
                                   headers=headers(ADMIN_TOKEN))).json()["head"] == 2 * total
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_consumer_acked_through_one_instance_resumes_through_another(
        database_url: str) -> None:
    first = ServerProcess(database_url).start()
    second = ServerProcess(database_url, args=["--no-migrate"]).start()
    try:
        conn = await ws_connect(first, cursor=0, consumer="roaming-bot")
        await next_frame(conn)
        async with httpx.AsyncClient(base_url=first.base_url) as http:
            for _ in range(3):
                await http.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
        positions = await receive_until(conn, 4)
        assert positions == [1, 2, 3, 4]
        await conn.send('{"op": "ack", "position": 4}')
        async with httpx.AsyncClient(base_url=second.base_url) as http:
            await until_acked(http, "roaming-bot", 4)
        await conn.close()
        resumed = await ws_connect(second, cursor=None, consumer="roaming-bot")
        welcome = await next_frame(resumed)
        assert welcome["cursor"] == 4
        rest = [await next_frame(resumed) for _ in range(2)]
        assert [f["position"] for f in rest] == [5, 6]
        await resumed.close()
    finally:
        second.stop()
        first.stop()


async def until_acked(http: httpx.AsyncClient, name: str, position: int) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        consumers = (await http.get("/api/consumers", headers=headers(ADMIN_TOKEN))).json()
        if any(c["name"] == name and c["position"] == position
               for c in consumers["consumers"]):
            return
        assert asyncio.get_running_loop().time() < deadline, consumers
        await asyncio.sleep(0.02)


async def test_the_first_signal_after_postgresql_dropped_the_writers_connection_lands() -> None:
    """The writer keeps one connection between commits; when the server closes it meanwhile
    (a restart, an idle timeout, a proxy's), the next signal is committed on a new one, not
    answered 503 while the database is up."""
    url, name = await create_pg_database()
    server = ServerProcess(url).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            for _ in range(3):
                posted = await client.post("/api/signals", json=BTC, headers=headers())
                assert posted.status_code == 202, posted.text
                admin = await asyncpg.connect(PG_ADMIN_DSN)
                try:
                    dropped = await admin.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = $1", name)
                finally:
                    await admin.close()
                assert dropped >= 1
    finally:
        server.stop()
        await drop_pg_database(name)


async def post_until_accepted(http: httpx.AsyncClient, base_url: str,
                              failure: str) -> httpx.Response:
    """POST a signal until it is accepted, 503 meanwhile, for 10 s at most."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        posted = await http.post(f"{base_url}/api/signals", json=BTC, headers=headers())
        if posted.status_code == 202:
            return posted
        assert posted.status_code == 503, posted.text
        assert asyncio.get_running_loop().time() < deadline, failure


async def test_an_instance_cut_off_inside_its_commit_does_not_stop_the_others() -> None:
    """An instance that loses the database between locking the log and its COMMIT (a network
    partition, a paused VM, a host that lost power) holds the log's row lock for as long as
    PostgreSQL believes its session alive: hours, by TCP keepalive. Every other instance's
    appends wait for that lock; they must get it back within a commit timeout or so, not
    answer 503 until then."""
    url, name = await create_pg_database()
    env = {"SIGNALBOX_COMMIT_TIMEOUT": "1"}
    try:
        async with TcpProxy(5432) as proxy, httpx.AsyncClient(timeout=30) as http:
            cut_off = ServerProcess(through(proxy, url), env=env)
            other = ServerProcess(url, env=env).start()
            try:
                await asyncio.to_thread(cut_off.start)  # the proxy serves on this event loop
                held = proxy.hold_at(b"COMMIT;")
                lost = asyncio.create_task(http.post(f"{cut_off.base_url}/api/signals",
                                                     json=BTC, headers=headers()))
                await asyncio.wait_for(held.wait(), 10)  # its COMMIT never reaches the server
                assert (await lost).status_code == 503
                posted = await post_until_accepted(
                    http, other.base_url, "the other instance cannot append while one is cut off")
                proxy.thaw()  # and back: it appends again, without a restart
                again = await http.post(f"{cut_off.base_url}/api/signals", json=BTC,
                                        headers=headers())
                assert again.status_code == 202, again.text
                async with httpx.AsyncClient(base_url=other.base_url) as reader:
                    events = await read_all_events(reader)
                verify_chain(events)
                positions = {e["position"] for e in events}
                assert {posted.json()["position"], again.json()["position"]} <= positions
            finally:
                proxy.thaw()
                for server in (other, cut_off):  # from a thread: the proxy serves on this loop
                    await asyncio.to_thread(server.stop)
    finally:
        await drop_pg_database(name)


async def test_a_commit_whose_answer_was_lost_is_not_said_to_have_recorded_nothing() -> None:
    """The link to the database breaks after its COMMIT was sent: whether it committed, the
    instance cannot know. It answers 503 (nothing is acknowledged) but must not tell the
    client that nothing was recorded: it was, and a retry with the same idempotency key
    finds it."""
    async with behind_a_proxy() as (url, proxy, server, http):
        key = {"Idempotency-Key": str(uuid.uuid4())}
        held = proxy.hold_at(b"COMMIT;", answers=True)
        lost = asyncio.create_task(http.post(f"{server.base_url}/api/signals",
                                             json=BTC, headers=headers(**key)))
        await asyncio.wait_for(held.wait(), 10)
        admin = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:  # the COMMIT reached the server: wait for it to take effect
            deadline = asyncio.get_running_loop().time() + 10
            while not await admin.fetchval("SELECT count(*) FROM events"):
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
        finally:
            await admin.close()
        proxy.cut()  # and the link breaks before its answer got through
        answer = await lost
        assert answer.status_code == 503, answer.text
        message = answer.json()["message"]
        assert "nothing was recorded" not in message
        assert "same Idempotency-Key" in message
        retried = await http.post(f"{server.base_url}/api/signals", json=BTC,
                                  headers=headers(**key))
        assert retried.status_code == 200, retried.text
        assert retried.json()["duplicate"] is True


@pytest.mark.parametrize("setting", ["search_path=signalbox",
                                     "options=-csearch_path%3Dsignalbox"])
async def test_instances_keep_the_log_in_the_schema_that_the_url_names(setting: str) -> None:
    """A server setting in the URL's query (``search_path``, or libpq's ``options``) is sent
    by every connection: the schema upgrade, the writer, the readers, LISTEN, the commands."""
    url, name = await create_pg_database()
    plain = url.replace("postgresql+asyncpg://", "postgresql://")
    admin = await asyncpg.connect(plain)
    try:
        await admin.execute("CREATE SCHEMA signalbox")
        in_schema = f"{url}?{setting}"
        with ServerProcess(in_schema).start() as one, \
                ServerProcess(in_schema, args=["--no-migrate"]).start() as two:
            subscriber = await ws_connect(two, cursor=0)
            assert (await next_frame(subscriber))["op"] == "welcome"
            created = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "pipeline", "token", "create", "bot",
                                 "--scope", "ingest", "--database-url", in_schema],
                capture_output=True, text=True, timeout=60, check=False)
            assert created.returncode == 0, created.stderr
            async with httpx.AsyncClient(base_url=one.base_url, timeout=30) as http:
                posted = await http.post("/api/signals", json=BTC,
                                         headers=headers(created.stdout.splitlines()[-1]))
            assert posted.status_code == 202, posted.text
            while (frame := await next_frame(subscriber))["op"] != "event" or \
                    frame["position"] < posted.json()["position"]:
                pass
            await subscriber.close()
        assert not [line for line in one.output + two.output if "LISTEN connection" in line]
        assert await admin.fetchval("SELECT count(*) FROM signalbox.events") >= 2
        assert await admin.fetchval("SELECT to_regclass('public.events')") is None
    finally:
        await admin.close()
        await drop_pg_database(name)


async def test_an_instance_whose_connection_was_silently_lost_commits_again_by_itself() -> None:
    """A NAT, a firewall or a pooler that forgets a connection drops what is sent over it
    without a word to either side. The writer keeps its connection between commits: on such a
    one, its next statement is never answered. The instance must give that connection up and
    commit on a new one within about a commit timeout, not answer every signal 503 for as
    long as TCP retries (a quarter of an hour), or for ever. (Tokens stay cached here, so
    that only the writer's connection matters.)"""
    env = {"SIGNALBOX_COMMIT_TIMEOUT": "1", "SIGNALBOX_TOKEN_CACHE": "3600"}
    async with behind_a_proxy(env) as (_, proxy, server, http):
        first = await http.post(f"{server.base_url}/api/signals", json=BTC,
                                headers=headers())
        assert first.status_code == 202, first.text
        proxy.blackhole()
        posted = await post_until_accepted(
            http, server.base_url,
            "the writer waits for ever on a connection that was lost")
        assert posted.json()["position"] > first.json()["position"]


async def test_an_instance_whose_idle_connections_were_silently_lost_serves_on() -> None:
    """The pooled connections of an instance, idle, are forgotten without a word by a NAT, a
    firewall or a pooler. Its subscribers must go on getting what another instance commits,
    and its reads (a token's check among them) be answered well within TradingView's 3 s,
    on new connections: not wait for ever for a check of a lost one."""
    async with behind_a_proxy(args=["--no-migrate"]) as (url, proxy, cut_off, http):
        with ServerProcess(url).start() as other:
            posted = await heard_before_and_after_a_blackhole(proxy, http, other, cut_off)
            read = await asyncio.wait_for(http.get(
                f"{cut_off.base_url}/api/events", params={"after": 0},
                headers=headers(INGEST_TOKEN.replace("ingest", "unknown"))), 3)
            assert read.status_code == 401, read.text  # a token's check, from the database
            read = await asyncio.wait_for(http.get(
                f"{cut_off.base_url}/api/events", params={"after": 0},
                headers=headers()), 3)
            assert read.status_code == 200, read.text
            assert read.json()["head"] == posted.json()["position"]
            assert "Traceback" not in "".join(cut_off.output), "".join(cut_off.output)


async def heard_before_and_after_a_blackhole(proxy: TcpProxy, http: httpx.AsyncClient,
                                             other: ServerProcess, cut_off: ServerProcess,
                                             within: float = 10) -> httpx.Response:
    """A signal posted to ``other`` before and one after ``proxy`` forgets ``cut_off``'s
    connections without a word: ``cut_off``'s subscriber gets both. The last answer."""
    subscriber = await ws_connect(cut_off, cursor=0)
    try:
        for lost in (False, True):
            if lost:
                proxy.blackhole()
            posted = await http.post(f"{other.base_url}/api/signals", json=BTC,
                                     headers=headers())
            assert posted.status_code == 202, posted.text
            await receive_position(subscriber, posted.json()["position"], within=within)
    finally:
        await subscriber.close()
    return posted


async def receive_position(conn: Any, position: int, within: float = 10) -> None:
    """Wait for the event at ``position`` on a subscriber."""
    async with asyncio.timeout(within):
        while (frame := await next_frame(conn))["op"] != "event" or \
                frame["position"] < position:
            pass
    assert frame["position"] == position


async def test_a_listen_connection_lost_without_a_word_is_made_again() -> None:
    """The LISTEN connection of an instance only ever receives: when a NAT, a firewall or a
    pooler forgets it, nothing tells the instance, which then hears of no other instance's
    commits and sees them only when it polls (here: once a minute). It must notice and
    listen again within seconds."""
    args = ["--no-migrate", "--poll-interval", "60"]
    async with behind_a_proxy(args=args) as (url, proxy, cut_off, http):
        with ServerProcess(url).start() as other:
            await heard_before_and_after_a_blackhole(proxy, http, other, cut_off, within=15)


async def answered_within(http: httpx.AsyncClient, url: str, within: float) -> httpx.Response:
    """GET ``url`` (as admin), failing the test unless it is answered within ``within`` s."""
    try:
        return await asyncio.wait_for(http.get(url, headers=headers()), within)
    except TimeoutError:
        raise AssertionError(f"GET {url} was not answered within {within} s") from None


def assert_unavailable(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"] == "log_unavailable", answer.text
    assert int(answer.headers["Retry-After"]) >= 1


async def test_a_read_that_waits_behind_a_lock_is_answered_503_within_the_read_timeout() -> None:
    """A migration's or an operator's lock on a table (``ALTER TABLE``, ``LOCK TABLE``) makes
    every read of it wait: a token's check on every request, the API's reads, /readyz. Each
    must be answered 503 with Retry-After once it has waited ``SIGNALBOX_READ_TIMEOUT`` (well
    within TradingView's 3 s), not hang for as long as the lock is held, and the instance
    reads as before once the lock is gone."""
    url, name = await create_pg_database()
    env = {"SIGNALBOX_READ_TIMEOUT": "0.5", "SIGNALBOX_TOKEN_CACHE": "0"}
    admin = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        with ServerProcess(url, env=env).start() as server:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
                for table, path in [("events", "/api/events?type=x"),
                                    ("signals", "/api/signals"),
                                    ("tokens", "/api/events"),
                                    ("log_head", "/readyz")]:
                    async with admin.transaction():
                        await admin.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
                        held_up = await answered_within(http, path, 3)
                        assert_unavailable(held_up)
                        assert "SIGNALBOX_READ_TIMEOUT" in held_up.json()["message"], path
                    read = await answered_within(http, path, 3)
                    assert read.status_code == 200, (path, read.text)
    finally:
        await admin.close()
        await drop_pg_database(name)


async def test_a_503_for_a_signal_whose_commit_was_under_way_says_it_may_be_recorded() -> None:
    """An operator's ``LOCK TABLE signals`` holds up a group commit whose unit has already
    run (it looked up its key). Its caller is answered 503 at the commit timeout, but the
    batch it ran in may still commit: the answer must say so, and point to the retry with
    the same key, which is then answered as a repeat if it was recorded."""
    url, name = await create_pg_database()
    admin = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    key = {"Idempotency-Key": f"held-{uuid.uuid4()}"}
    try:
        with ServerProcess(url, env={"SIGNALBOX_COMMIT_TIMEOUT": "1"}).start() as server:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
                async with admin.transaction():
                    await admin.execute("LOCK TABLE signals IN ACCESS EXCLUSIVE MODE")
                    held = await http.post("/api/signals", json=BTC,
                                           headers=headers(INGEST_TOKEN, **key))
                    assert_unavailable(held)
                    assert "may or may not have been recorded" in held.json()["message"]
                    assert "Idempotency-Key" in held.json()["message"]
                retried = await http.post("/api/signals", json=BTC,
                                          headers=headers(INGEST_TOKEN, **key))
                assert retried.status_code in (200, 202), retried.text
                events = await read_all_events(http)
        keyed = [e for e in events if e["type"] == "signal.received"
                 and e["data"]["idempotency_key"] == key["Idempotency-Key"]]
        assert len(keyed) == 1
    finally:
        await admin.close()
        await drop_pg_database(name)


def failed_commits(server: ServerProcess) -> int:
    """How many group commits of the server failed (each says so in a line of its log)."""
    return sum(bool(re.search(r"group commit of \d+ units failed: ", line))
               for line in server.output)


async def test_a_commit_held_up_by_a_lock_fails_and_the_writer_goes_on() -> None:
    """An operator's ``LOCK TABLE signals`` holds up the writer's statements. A group commit
    held up must fail within about a commit timeout, leaving nothing of itself, and the
    writer go on with the next, which fails as soon while the lock is held: not wait in one
    for as long as the lock is held (no other commit meanwhile), then commit signals whose
    senders were answered 503 long before. Once the lock is gone, a post is accepted at
    once."""
    url, name = await create_pg_database()
    admin = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    markers = [f"held-{uuid.uuid4()}" for _ in range(2)]
    loop = asyncio.get_running_loop()
    try:
        with ServerProcess(url, env={"SIGNALBOX_COMMIT_TIMEOUT": "1"}).start() as server:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
                first = await http.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
                assert first.status_code == 202, first.text
                async with admin.transaction():
                    await admin.execute("LOCK TABLE signals IN ACCESS EXCLUSIVE MODE")
                    for failed, marker in enumerate(markers, start=1):
                        held = await http.post(f"/webhooks/tradingview/{INGEST_TOKEN}",
                                               content=json.dumps({**BTC, "strategy": marker}))
                        assert_unavailable(held)
                        await until(lambda n=failed: failed_commits(server) >= n, within=3)
                started = loop.time()
                after = await http.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
                assert after.status_code == 202, after.text
                assert loop.time() - started < 1
                events = await read_all_events(http)
        verify_chain(events)
        for marker in markers:  # the events were written before the signals' rows
            assert not [e for e in events if marker in json.dumps(e)], marker
        assert [e["type"] for e in events].count("signal.received") == 2
    finally:
        await admin.close()
        await drop_pg_database(name)


async def test_a_read_whose_answer_never_comes_is_answered_503_on_a_new_connection_after() -> None:
    """A read's statement reaches the server, but its answer is lost with the connection
    (a NAT, a firewall, a host gone): the server's own limit cannot help, its answer is lost
    too. The read is answered 503 within about ``SIGNALBOX_QUERY_TIMEOUT``, and the
    connection is not given to the next read."""
    env = {"SIGNALBOX_QUERY_TIMEOUT": "0.5", "SIGNALBOX_TOKEN_CACHE": "3600"}
    async with behind_a_proxy(env) as (_, proxy, server, http):
        path = f"{server.base_url}/api/events"
        # Statements are prepared once: what marks the read is a value it sends, a
        # type (read through SQLAlchemy) or a position (read at the driver).
        kind, after = f"held-{uuid.uuid4().hex}", random.randrange(2**40, 2**50)
        for marker, query in [(kind.encode(), f"type={kind}"),
                              (after.to_bytes(8, "big"), f"after={after}")]:
            held = proxy.hold_at(marker, answers=True)
            lost = asyncio.create_task(answered_within(http, f"{path}?{query}", 3))
            await asyncio.wait_for(held.wait(), 10)
            assert_unavailable(await lost)
            for _ in range(3):
                read = await answered_within(http, f"{path}?type=x", 3)
                assert read.status_code == 200, read.text
        assert "Traceback" not in "".join(server.output), "".join(server.output)


async def test_a_read_slower_than_the_read_timeout_is_answered_when_it_runs() -> None:
    """``SIGNALBOX_READ_TIMEOUT`` bounds a read's waits (for a lock, a connection), not its
    run: a read whose answer takes longer than that (a report over a large log; here, an
    answer held up on its way) is answered 200 once it comes, within
    ``SIGNALBOX_QUERY_TIMEOUT``."""
    env = {"SIGNALBOX_READ_TIMEOUT": "0.3", "SIGNALBOX_QUERY_TIMEOUT": "30",
           "SIGNALBOX_TOKEN_CACHE": "3600"}
    async with behind_a_proxy(env) as (_, proxy, server, http):
        kind = f"slow-{uuid.uuid4().hex}"
        held = proxy.hold_at(kind.encode(), answers=True)
        slow = asyncio.create_task(
            answered_within(http, f"{server.base_url}/api/events?type={kind}", 20))
        await asyncio.wait_for(held.wait(), 10)
        await asyncio.sleep(1.0)  # the read's run: three read timeouts
        proxy.thaw()
        read = await slow
        assert read.status_code == 200, read.text
        assert read.json()["events"] == []


async def test_a_read_on_a_database_that_stopped_answering_is_answered_503_in_seconds() -> None:
    """The database stops answering (a partition, a host gone): the pooled connection fails
    its check, and a new one is made, whose connecting never ends either. The read must be
    answered 503 within about the check's second and ``SIGNALBOX_READ_TIMEOUT``, not after
    asyncpg's default of a minute for connecting."""
    env = {"SIGNALBOX_READ_TIMEOUT": "0.5", "SIGNALBOX_TOKEN_CACHE": "3600"}
    async with behind_a_proxy(env) as (_, proxy, server, http):
        path = f"{server.base_url}/api/events?type=x"
        assert (await answered_within(http, path, 3)).status_code == 200
        proxy.freeze()
        assert_unavailable(await answered_within(http, path, 3))
        proxy.thaw()
        assert (await answered_within(http, path, 3)).status_code == 200

async def test_reads_waiting_for_a_busy_pool_are_answered_503_within_the_read_timeout() -> None:
    """Every pooled connection for reads is taken (here: by reads waiting behind a lock), and
    more requests come. Each must be answered within about twice ``SIGNALBOX_READ_TIMEOUT``
    (its wait for a connection, then its read), not queue for SQLAlchemy's 30 s default or
    for as long as the reads before it in the queue take, one pool's worth at a time."""
    url, name = await create_pg_database()
    env = {"SIGNALBOX_READ_TIMEOUT": "0.5", "SIGNALBOX_TOKEN_CACHE": "3600"}
    admin = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        with ServerProcess(url, env=env, args=["--pool-size", "1"]).start() as server:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30,
                                         limits=httpx.Limits(max_connections=None)) as http:
                path = "/api/events?type=x"
                assert (await answered_within(http, path, 3)).status_code == 200  # token cached
                async with admin.transaction():
                    await admin.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
                    answers = await asyncio.gather(
                        *(answered_within(http, path, 2.5) for _ in range(20)))
                for answer in answers:
                    assert_unavailable(answer)
                assert (await answered_within(http, path, 3)).status_code == 200
    finally:
        await admin.close()
        await drop_pg_database(name)


async def test_a_swap_cut_off_inside_its_transaction_does_not_stop_the_appends() -> None:
    """A ``rebuild --swap`` holds the row that every append locks while it replaces the live
    rows. Cut off from the database in the middle (a network partition, a host that lost
    power), its session would keep that lock for as long as PostgreSQL believes it alive:
    hours, by TCP keepalive, with every instance's appends answered 503 meanwhile. They must
    go on within about a commit timeout."""
    url, name = await create_pg_database()
    env = {"SIGNALBOX_COMMIT_TIMEOUT": "1"}
    try:
        async with TcpProxy(5432) as proxy, httpx.AsyncClient(timeout=30) as http:
            with ServerProcess(url, env=env).start() as server:
                first = await http.post(f"{server.base_url}/api/signals", json=BTC,
                                        headers=headers())
                assert first.status_code == 202, first.text
                held = proxy.hold_at(b"DELETE FROM signals")  # the swap has locked the log
                swap = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "pipeline", "rebuild", "--swap", "--database-url",
                    through(proxy, url), env={**os.environ, **env},
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
                try:
                    await asyncio.wait_for(held.wait(), 30)
                    posted = await post_until_accepted(
                        http, server.base_url, "a swap cut off mid-way stops every append")
                    assert posted.json()["position"] > first.json()["position"]
                finally:
                    if swap.returncode is None:
                        swap.kill()
                    await swap.wait()
    finally:
        await drop_pg_database(name)


def tcp_settings(driver_connection: Any) -> dict[str, int]:
    """What the socket of an asyncpg connection was told about a peer that goes silent."""
    sock = driver_connection._transport.get_extra_info("socket")
    return {"keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "user_timeout_ms": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)}


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux's TCP options")
async def test_every_connection_to_postgresql_gives_up_on_a_silent_peer_within_seconds() -> None:
    """A database host that vanished (powered off, partitioned) answers nothing, not even a
    reset: with the kernel's defaults, a connection to it that waits (LISTEN's, the writer's
    COMMIT) is noticed dead only by TCP keepalive, off by default and two hours when on, or
    after a quarter of an hour of unanswered retransmissions. Each connection Signalbox makes
    (the writer's, the readers', LISTEN's, the commands') has keepalive on and a
    ``TCP_USER_TIMEOUT``. Packets cannot be dropped here without a firewall: what is checked
    is what each socket was told."""
    url, name = await create_pg_database()
    try:
        await migrate.upgrade_async(url)
        engines = create_engines(url)
        rebuilding = migration_engine(url)
        sockets = []
        try:
            for engine in (engines.reader, engines.writer, rebuilding):
                assert engine is not None
                async with engine.connect() as conn:
                    raw = await conn.get_raw_connection()
                    sockets.append(tcp_settings(raw.driver_connection))
            listening = await open_connection(asyncpg_connect_args(url))
            try:
                sockets.append(tcp_settings(listening))
            finally:
                await listening.close()
        finally:
            await engines.dispose()
            await rebuilding.dispose()
        for settings in sockets:
            assert settings["keepalive"] == 1, sockets
            assert 0 < settings["user_timeout_ms"] <= 30_000, sockets
    finally:
        await drop_pg_database(name)
