"""Ingestion under stress: a log that cannot commit, repeats, hostile bodies, other writers."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import (
    INGEST_TOKEN,
    ServerProcess,
    fresh_connections,
    headers,
    next_frame,
    read_all_events,
    verify_chain,
    ws_connect,
)

# The examples send bad tokens on purpose, and each must be judged on its own: the server
# does not refuse the address after failed authentications (tested in test_security.py).
pytestmark = pytest.mark.server_args("--auth-failures", "0")


BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}


@asynccontextmanager
async def write_lock_held(database_url: str) -> AsyncIterator[None]:
    """Another client holds the log's write lock, as a stuck or slow writer would."""
    if database_url.startswith("sqlite"):
        connection = sqlite3.connect(database_url.split("///", 1)[1], isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            connection.execute("ROLLBACK")
            connection.close()
        return
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT position FROM log_head FOR UPDATE")
            yield
    finally:
        await conn.close()


async def test_log_that_cannot_commit_answers_503_and_recovers_by_itself(
        database_url: str) -> None:
    server = ServerProcess(database_url, env={"SIGNALBOX_COMMIT_TIMEOUT": "0.5"}).start()
    key = {"Idempotency-Key": f"locked-{uuid.uuid4()}"}
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            async with write_lock_held(database_url):
                refused = await client.post("/api/signals", json=BTC,
                                            headers=headers(INGEST_TOKEN, **key))
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"] == "log_unavailable"
                assert refused.headers["retry-after"]
                webhook = await client.post(f"/webhooks/tradingview/{INGEST_TOKEN}",
                                            content=json.dumps(BTC))
                assert webhook.status_code == 503  # TradingView resends on 503
            # The lock is gone: the same request, retried, is answered without a restart,
            # and the key makes the retry safe whether or not the first one got through.
            retried = await client.post("/api/signals", json=BTC,
                                        headers=headers(INGEST_TOKEN, **key))
            assert retried.status_code in (200, 202), retried.text
            again = await client.post("/api/signals", json=BTC,
                                      headers=headers(INGEST_TOKEN, **key))
            assert again.status_code == 200
            assert again.json()["signal_id"] == retried.json()["signal_id"]
            events = await read_all_events(client)
        verify_chain(events)
        keyed = [e for e in events if e["type"] == "signal.received"
                 and e["data"]["idempotency_key"] == key["Idempotency-Key"]]
        assert len(keyed) == 1
    finally:
        server.stop()


def signals_marked(events: list[dict[str, Any]], marker: str) -> list[dict[str, Any]]:
    """The ``signal.received`` events whose body holds ``marker``."""
    return [e for e in events if e["type"] == "signal.received" and marker in json.dumps(e)]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_signal_answered_503_before_its_commit_began_is_never_recorded(
        database_url: str) -> None:
    """The log is locked elsewhere past the commit timeout: the requests waiting are answered
    503, nothing recorded. Their units must not be committed once the lock is gone: a sender
    told so sends again, and a signal without a key (a TradingView alert without an id) would
    be recorded twice; one with a key would be answered as a repeat of a signal it was told
    had not been recorded."""
    server = ServerProcess(database_url, env={"SIGNALBOX_COMMIT_TIMEOUT": "0.5"}).start()
    marker = f"unkeyed-{uuid.uuid4()}"
    key = {"Idempotency-Key": f"refused-{uuid.uuid4()}"}
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            async with write_lock_held(database_url):
                webhook = await client.post(f"/webhooks/tradingview/{INGEST_TOKEN}",
                                            content=json.dumps({**BTC, "strategy": marker}))
                keyed = await client.post("/api/signals", json=BTC,
                                          headers=headers(INGEST_TOKEN, **key))
                for refused in (webhook, keyed):
                    assert refused.status_code == 503, refused.text
                    assert "nothing was recorded" in refused.json()["message"], refused.text
            retried = await client.post("/api/signals", json=BTC,
                                        headers=headers(INGEST_TOKEN, **key))
            assert retried.status_code == 202, retried.text  # not a repeat: a first
            events = await read_all_events(client)
        assert signals_marked(events, marker) == []
        assert len(signals_marked(events, key["Idempotency-Key"])) == 1
        verify_chain(events)
    finally:
        server.stop()


async def post_and_hang_up(server: ServerProcess, path: str, body: bytes) -> None:
    """POST ``body``, then close the connection without waiting for the answer, as a sender
    that gives up does (TradingView after 3 s). The body is sent once the server asks for it
    (``Expect: 100-continue``): the request is then waiting for the log, not for its body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     "Expect: 100-continue\r\n\r\n".encode())
        continued = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert continued.startswith(b"HTTP/1.1 100"), continued
        writer.write(body)
        await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_signal_whose_sender_hung_up_while_it_waited_is_still_recorded(
        database_url: str) -> None:
    """A sender that stopped waiting for its answer hears no 503: its signal, which was
    waiting for the log, is recorded once the log can commit, as it would have been had the
    answer been quick. Only a caller that is answered 503 has its unit dropped."""
    server = ServerProcess(database_url, env={"SIGNALBOX_COMMIT_TIMEOUT": "0.5"}).start()
    marker = f"gone-{uuid.uuid4()}"
    key = {"Idempotency-Key": f"refused-{uuid.uuid4()}"}
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            async with write_lock_held(database_url):
                await post_and_hang_up(server, f"/webhooks/tradingview/{INGEST_TOKEN}",
                                       json.dumps({**BTC, "strategy": marker}).encode())
                # Queued after it, so answered after its deadline too.
                refused = await client.post("/api/signals", json=BTC,
                                            headers=headers(INGEST_TOKEN, **key))
                assert refused.status_code == 503, refused.text
            after = await client.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
            assert after.status_code == 202, after.text  # queued after both
            events = await read_all_events(client)
        assert len(signals_marked(events, marker)) == 1
        assert signals_marked(events, key["Idempotency-Key"]) == []
        verify_chain(events)
    finally:
        server.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_content_dedupe_window_answers_repeats_of_a_body(database_url: str) -> None:
    server = ServerProcess(database_url, args=["--dedupe-window", "60"]).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            url = f"/webhooks/tradingview/{INGEST_TOKEN}"
            first = await client.post(url, content=json.dumps(BTC))
            repeat = await client.post(url, content=json.dumps(BTC))
            other = await client.post(url, content=json.dumps({**BTC, "quantity": "2"}))
        assert (first.status_code, repeat.status_code, other.status_code) == (202, 200, 202)
        assert repeat.json()["signal_id"] == first.json()["signal_id"]
        assert repeat.json()["duplicate"] is True
    finally:
        server.stop()


@pytest.mark.parametrize("shared_database_url", ["sqlite"], indirect=True)
async def test_dedupe_is_off_by_default(shared_server: ServerProcess,
                                        shared_client: httpx.AsyncClient) -> None:
    url = f"/webhooks/tradingview/{INGEST_TOKEN}"
    statuses = [(await shared_client.post(url, content=json.dumps(BTC))).status_code
                for _ in range(2)]
    assert statuses == [202, 202]


async def test_subscribers_see_events_appended_by_another_process(database_url: str) -> None:
    """Two servers on one database: what one appends, the other's subscribers receive."""
    fast_poll = {"SIGNALBOX_POLL_INTERVAL": "0.1"}
    first = ServerProcess(database_url, env=fast_poll).start()
    second = ServerProcess(database_url, env=fast_poll, args=["--no-migrate"]).start()
    try:
        conn = await ws_connect(first, cursor=0)
        assert (await next_frame(conn))["op"] == "welcome"
        async with httpx.AsyncClient(base_url=second.base_url) as client:
            posted = await asyncio.gather(*(
                client.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
                for _ in range(20)))
        head = max(r.json()["position"] for r in posted)
        positions: list[int] = []
        while not positions or positions[-1] < head:
            frame = await next_frame(conn)
            if frame["op"] == "event":
                positions.append(frame["position"])
        assert positions == list(range(1, head + 1))
        await conn.close()
    finally:
        second.stop()
        first.stop()


BODIES = st.one_of(
    st.binary(max_size=2000),
    st.text(max_size=500).map(str.encode),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                 lambda inner: st.lists(inner, max_size=4)
                 | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                 max_leaves=20).map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"[" * 5000, b'{"a":' * 3000, b'{"price": 1e999999}',
                     b'{"ticker": "\\ud800", "action": "buy"}', b"\x00" * 100,
                     b'{"ticker":"BTC","action":"buy","quantity":' + b"9" * 5000 + b"}"]),
)


async def test_no_body_is_ever_answered_with_a_5xx(shared_server: ServerProcess) -> None:
    routes: list[tuple[str, dict[str, str]]] = [
        (f"/webhooks/tradingview/{INGEST_TOKEN}", {}),
        ("/webhooks/tradingview", {}),
        ("/api/signals", headers(INGEST_TOKEN)),
    ]

    http = fresh_connections(shared_server.base_url)

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(BODIES, st.sampled_from(routes),
           st.sampled_from(["application/json", "text/plain", ""]))
    def property_(body: bytes, route: tuple[str, dict[str, str]], content_type: str) -> None:
        path, extra = route
        response = http.post(path, content=body, headers={**extra, "Content-Type": content_type})
        assert response.status_code < 500, (body[:200], response.text)
        payload: Any = response.json()
        if response.status_code >= 400 and response.status_code != 422:
            assert set(payload) == {"error", "message"}

    run: Callable[[], None] = property_
    with http:
        await asyncio.get_running_loop().run_in_executor(None, run)
    async with httpx.AsyncClient(base_url=shared_server.base_url) as client:
        verify_chain(await read_all_events(client))


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_notify_wakes_other_instances_long_before_their_poll(database_url: str) -> None:
    """With a 60 s poll, only LISTEN/NOTIFY can bring another instance's events within 10 s."""
    slow_poll = {"SIGNALBOX_POLL_INTERVAL": "60"}
    first = ServerProcess(database_url, env=slow_poll).start()
    second = ServerProcess(database_url, env=slow_poll, args=["--no-migrate"]).start()
    try:
        conn = await ws_connect(first, cursor=None)
        assert (await next_frame(conn))["op"] == "welcome"
        assert (await next_frame(conn))["op"] == "live"
        async with httpx.AsyncClient(base_url=second.base_url) as client:
            for round_ in range(4):
                if round_ == 2:  # the LISTEN connection dies: it must come back by itself
                    await terminate_listeners(database_url)
                posted = await client.post("/api/signals", json=BTC,
                                           headers=headers(INGEST_TOKEN))
                head = posted.json()["position"]
                positions: list[int] = []
                while not positions or positions[-1] < head:
                    frame = await next_frame(conn, 10)
                    if frame["op"] == "event":
                        positions.append(frame["position"])
                assert positions == [head - 1, head]
        await conn.close()
    finally:
        second.stop()
        first.stop()


async def terminate_listeners(database_url: str) -> None:
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        ended = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN%'")
        assert ended >= 2  # one per instance
    finally:
        await conn.close()
