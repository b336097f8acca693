"""The WebSocket stream from a subscriber's side: hello, replay, live, resume, close codes."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Literal

import httpx
import psutil
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode

from pipeline.ws import CLOSE_TIMEOUT
from pipeline.wsprotocol import text_frame_header
from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    FastClient,
    ServerProcess,
    TcpProxy,
    headers,
    next_frame,
    sqlite_only,
    wait_until,
    ws_connect,
)
from tests.test_faults import through
from tests.test_metrics import scrape_one
from tests.wsraw import TEXT, RawClient, encode_frame

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}


async def post(client: httpx.AsyncClient, ticker: str = "BTCUSDT", **extra: Any) -> int:
    response = await client.post("/api/signals", json={**BTC, "ticker": ticker, **extra},
                                 headers=headers(INGEST_TOKEN))
    assert response.status_code in (202, 422), response.text
    position: int = response.json()["position"]
    return position


async def expect_close(conn: ClientConnection, code: int) -> dict[str, Any]:
    """The error frame that precedes the close, and the close code."""
    error = await next_frame(conn)
    assert error["op"] == "error" and error["code"] == code, error
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(conn.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code
    return error


async def collect_until(conn: ClientConnection, position: int) -> list[dict[str, Any]]:
    """Events until one at or after ``position`` (skipping pings)."""
    events: list[dict[str, Any]] = []
    while not events or events[-1]["position"] < position:
        frame = await next_frame(conn)
        if frame["op"] == "event":
            events.append(frame)
    return events


async def head_of(client: httpx.AsyncClient) -> int:
    """The log's head: the cursor after which a test on a shared server finds its own events."""
    head: int = (await client.get("/readyz")).json()["head"]
    return head


async def test_welcome_replay_then_live(shared_server: ServerProcess,
                                        shared_client: httpx.AsyncClient) -> None:
    start = await head_of(shared_client)
    await post(shared_client)
    conn = await ws_connect(shared_server, cursor=start)
    try:
        welcome = await next_frame(conn)
        assert welcome["op"] == "welcome" and welcome["cursor"] == start
        assert welcome["head"] == start + 2 and welcome["heartbeat"] == 15
        replayed = [await next_frame(conn), await next_frame(conn)]
        assert [f["position"] for f in replayed] == [start + 1, start + 2]
        assert set(replayed[0]) == {"op", "position", "id", "stream", "type", "data", "meta",
                                    "time", "hash"}
        assert await next_frame(conn) == {"op": "live", "position": start + 2}
        await post(shared_client)
        live = [await next_frame(conn), await next_frame(conn)]
        assert [f["position"] for f in live] == [start + 3, start + 4]
    finally:
        await conn.close()


async def test_live_only_and_header_auth(shared_server: ServerProcess,
                                         shared_client: httpx.AsyncClient) -> None:
    position = await post(shared_client)
    conn = await websockets.connect(shared_server.ws_url,
                                    additional_headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    try:
        await conn.send(json.dumps({"op": "hello", "cursor": None}))
        welcome = await next_frame(conn)
        assert welcome["cursor"] == welcome["head"] == position
        assert await next_frame(conn) == {"op": "live", "position": position}
        await post(shared_client)
        assert (await next_frame(conn))["position"] == position + 1
    finally:
        await conn.close()


async def test_filters_and_live_position_cover_skipped_events(
        shared_server: ServerProcess, shared_client: httpx.AsyncClient) -> None:
    start = await head_of(shared_client)
    await post(shared_client, "AAA")
    await post(shared_client, "BBB")
    conn = await ws_connect(shared_server, cursor=start,
                            filter={"types": ["signal.acc*"], "tickers": ["BBB"]})
    try:
        await next_frame(conn)
        event = await next_frame(conn)
        assert (event["type"], event["meta"]["ticker"], event["position"]) == (
            "signal.accepted", "BBB", start + 4)
        assert await next_frame(conn) == {"op": "live", "position": start + 4}
        await post(shared_client, "AAA")
        await post(shared_client, "BBB")
        event = await next_frame(conn)
        assert (event["meta"]["ticker"], event["position"]) == ("BBB", start + 8)
    finally:
        await conn.close()


async def test_batch_mode_packs_frames(shared_server: ServerProcess,
                                       shared_client: httpx.AsyncClient) -> None:
    start = await head_of(shared_client)
    for _ in range(5):
        await post(shared_client)
    conn = await ws_connect(shared_server, cursor=start, batch=True)
    try:
        await next_frame(conn)
        message = await asyncio.wait_for(conn.recv(), 10)
        frames = [json.loads(line) for line in str(message).split("\n")]
        assert [f["position"] for f in frames] == list(range(start + 1, start + 11))
    finally:
        await conn.close()


async def test_every_event_is_a_message_of_its_own_whatever_its_size(
        shared_server: ServerProcess, shared_client: httpx.AsyncClient) -> None:
    """A page of events goes out in one write per 64 KiB, its frames built by the server when
    the connection has no compression: events of every frame-header size (up to over 64 KiB,
    the raw body of a webhook), in pages larger than a write, arrive one message each, as
    ``/api/events`` holds them."""
    await every_event_arrives(shared_server, shared_client, None)


async def test_permessage_deflate_is_declined_unless_turned_on(
        shared_server: ServerProcess) -> None:
    """Browsers and ``websockets`` clients (ours too) offer permessage-deflate; accepted, it
    would compress every event for each subscriber alone and hold zlib's state for each."""
    conn = await websockets.connect(shared_server.ws_url)  # offers it, as by default
    try:
        assert conn.protocol.extensions == []
        await conn.send(hello(token=ADMIN_TOKEN, cursor=None))
        assert (await next_frame(conn))["op"] == "welcome"
    finally:
        await conn.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_with_ws_compression_every_event_arrives_compressed(database_url: str) -> None:
    server = ServerProcess(database_url, args=["--ws-compression"]).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            await every_event_arrives(server, client, "deflate")
    finally:
        server.stop()


async def every_event_arrives(server: ServerProcess, client: httpx.AsyncClient,
                              compression: Literal["deflate"] | None) -> None:
    start = await head_of(client)
    for size in [1, 90, 500, 20_000, 65_000, 3, 60_000]:
        body = "x" * size  # not an alert: rejected, but received and logged as it came
        response = await client.post(f"/webhooks/tradingview/{INGEST_TOKEN}", content=body)
        assert response.status_code in (202, 422), response.text
    for i in range(300):
        await post(client, ticker=f"T{i}")
    head = await head_of(client)
    expected = await read_events(client, start, head)
    assert max(len(json.dumps(e)) for e in expected) > 1 << 16
    conn = await websockets.connect(server.ws_url, compression=compression, max_size=None,
                                    max_queue=None)
    try:
        assert bool(conn.protocol.extensions) == (compression is not None)
        await conn.send(hello(token=ADMIN_TOKEN, cursor=start))
        assert (await next_frame(conn))["op"] == "welcome"
        received = await collect_until(conn, head)
        assert received == [{"op": "event", **event} for event in expected]
    finally:
        await conn.close()


@pytest.mark.server_args("--window", "100", "--page-size", "10")
async def test_catch_up_from_the_log_sends_the_events_as_the_api_holds_them(
        server: ServerProcess, client: httpx.AsyncClient) -> None:
    """Behind the hub's window (101 events at most here), pages come from the log's rows as
    frames, without an event object each: frame for frame, they are the events of
    ``/api/events``."""
    for i in range(180):
        await post(client, ticker=f"T{i}")
    head = await head_of(client)
    expected = await read_events(client, 0, head)
    conn = await ws_connect(server, cursor=0)
    try:
        assert (await next_frame(conn))["op"] == "welcome"
        received = await collect_until(conn, head)
        assert received == [{"op": "event", **event} for event in expected]
    finally:
        await conn.close()


async def read_events(client: httpx.AsyncClient, after: int, until: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    while after < until:
        response = await client.get("/api/events", headers=headers(),
                                    params={"after": after, "limit": 1000})
        page = [e for e in response.json()["events"] if e["position"] <= until]
        found += page
        after = page[-1]["position"]
    return found


def test_frame_headers_are_those_of_websockets() -> None:
    for length in [0, 1, 125, 126, 127, 65_535, 65_536, 1 << 20]:
        payload = b"a" * length
        framed = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
        assert text_frame_header(length) + payload == framed, length


def hello(**fields: Any) -> str:
    return json.dumps({"op": "hello", **fields})


@pytest.mark.parametrize(("frame", "code"), [
    ("not json", 4400),
    ('{"no": "op"}', 4400),
    ('{"op": "ack", "position": 1}', 4400),
    (hello(token=ADMIN_TOKEN, cursor=-1), 4400),
    (hello(token=ADMIN_TOKEN, cursor=True), 4400),
    (hello(token=ADMIN_TOKEN, filter={"types": "signal.*"}), 4400),
    (hello(token=ADMIN_TOKEN, filter={"types": ""}), 4400),
    (hello(token=ADMIN_TOKEN, filter={"tickers": 0}), 4400),
    (hello(token=ADMIN_TOKEN, filter={"streams": {}}), 4400),
    (hello(token=ADMIN_TOKEN, filter={"colour": ["red"]}), 4400),
    (hello(token=ADMIN_TOKEN, filter={"types": ["[a]"]}), 4400),
    (hello(cursor=0), 4401),
    (hello(token="sbx_wrong", cursor=0), 4401),
    (hello(token=INGEST_TOKEN, cursor=0), 4403),
    (hello(token=ADMIN_TOKEN, cursor=10**9), 4409),  # ahead of any head in this module
    (hello(token=ADMIN_TOKEN, cursor=0, epoch="other"), 4409),
], ids=lambda value: (value.replace(ADMIN_TOKEN, "<admin>").replace(INGEST_TOKEN, "<ingest>")
                      if isinstance(value, str) else None))
async def test_bad_hello_gets_the_right_close_code(shared_server: ServerProcess, frame: str,
                                                  code: int) -> None:
    async with websockets.connect(shared_server.ws_url) as conn:
        await conn.send(frame)
        await expect_close(conn, code)


async def test_binary_oversized_and_unknown_frames_close_4400_and_others_go_on(
        shared_server: ServerProcess, shared_client: httpx.AsyncClient) -> None:
    bystander = await ws_connect(shared_server, cursor=None)
    await next_frame(bystander)
    await next_frame(bystander)
    try:
        for bad in (b"\x00\x01", "x" * 70_000, '{"op": "teleport"}', '{"op": "hello"}'):
            conn = await ws_connect(shared_server, cursor=None)
            await next_frame(conn)  # welcome
            await next_frame(conn)  # live
            await conn.send(bad)
            await expect_close(conn, 4400)
        # Over the protocol layer's limit: refused once the frame's header says so. (Sent
        # whole, without compression, the rest of it would still be arriving when the server
        # closes, and the reset that follows can overtake the close frame.)
        raw = await RawClient.connect(shared_server.port)
        raw.send(encode_frame(TEXT, b"x" * 1000, declared=2 << 20))
        assert (await raw.until_close()).close_code == 1009
        position = await post(shared_client)
        frames = await collect_until(bystander, position)
        assert frames[-1]["position"] == position
    finally:
        await bystander.close()


async def test_the_message_limit_counts_bytes_not_characters(
        shared_server: ServerProcess) -> None:
    """SIGNALBOX_WS_MAX_MESSAGE (64 KiB) is in bytes: 30,000 characters of 3 bytes each are
    over it, though fewer than 65,536 characters; 21,000 of them are within it."""
    conn = await ws_connect(shared_server, cursor=None)
    await next_frame(conn)  # welcome
    await next_frame(conn)  # live
    await conn.send(json.dumps({"op": "ping", "padding": "€" * 21_000}, ensure_ascii=False))
    while (frame := await next_frame(conn))["op"] != "pong":
        assert frame["op"] in ("event", "ping"), frame
    await conn.send(json.dumps({"op": "ping", "padding": "€" * 30_000}, ensure_ascii=False))
    while (frame := await next_frame(conn))["op"] in ("event", "ping"):
        pass
    assert frame["op"] == "error" and frame["code"] == 4400, frame
    assert "65536 bytes" in frame["message"]
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(conn.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4400


@pytest.mark.parametrize("op", ["x" * 200, "é" * 200, "€" * 50, "\U0001f680" * 40],
                         ids=["ascii", "utf8-2-bytes", "utf8-3-bytes", "utf8-4-bytes"])
async def test_a_message_quoting_the_client_fits_the_close_frame(shared_server: ServerProcess,
                                                                 op: str) -> None:
    """The close frame's reason holds 123 bytes of UTF-8: a message quoting what the client
    sent is cut there, between characters; the error frame has it whole."""
    async with websockets.connect(shared_server.ws_url) as conn:
        await conn.send(hello(token=ADMIN_TOKEN, cursor=None))
        assert (await next_frame(conn))["op"] == "welcome"
        assert (await next_frame(conn))["op"] == "live"
        await conn.send(json.dumps({"op": op}))
        error = await expect_close(conn, 4400)
        assert op in error["message"]
        assert conn.close_reason and error["message"].startswith(conn.close_reason)


async def test_a_status_report_for_an_id_no_signal_has_is_answered_before_the_database(
        shared_server: ServerProcess, shared_client: httpx.AsyncClient) -> None:
    """A signal_id holding NUL, which PostgreSQL refuses in text, or longer than any signal's
    is answered as over HTTP (400 for a NUL in the URL, 404 for an unknown id), without a
    query; the connection goes on, and so does the database."""
    posted = await shared_client.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
    signal_id = posted.json()["signal_id"]
    conn = await ws_connect(shared_server, cursor=None)
    try:
        assert (await next_frame(conn))["op"] == "welcome"
        reports = [("abc\x00", "bad_request"), (signal_id + "\x00", "bad_request"),
                   ("\x00" + signal_id[1:], "bad_request"), ("x" * 10_000, "not_found"),
                   (signal_id, None)]
        for ref, (reported, error) in enumerate(reports):
            await conn.send(json.dumps({"op": "status", "ref": ref, "signal_id": reported,
                                        "status": "processing"}))
            while (answer := await next_frame(conn))["op"] not in ("status_ok", "status_error"):
                pass
            assert answer["ref"] == ref
            if error is None:
                assert answer["op"] == "status_ok", answer
            else:
                assert (answer["op"], answer["error"]) == ("status_error", error), answer
    finally:
        await conn.close()


async def test_epoch_mismatch_tells_the_right_epoch(shared_server: ServerProcess,
                                                   shared_client: httpx.AsyncClient) -> None:
    epoch = (await shared_client.get("/readyz")).json()["epoch"]
    conn = await ws_connect(shared_server, cursor=0, epoch=str(uuid.uuid4()))
    error = await expect_close(conn, 4409)
    assert error["epoch"] == epoch
    conn = await ws_connect(shared_server, cursor=0, epoch=epoch)
    assert (await next_frame(conn))["op"] == "welcome"
    while (await next_frame(conn))["op"] != "live":  # the replay read: none unread at close
        pass
    await conn.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_hello_that_never_comes_and_silent_clients_are_closed_4408(
        database_url: str) -> None:
    server = ServerProcess(database_url, env={"SIGNALBOX_HELLO_TIMEOUT": "0.5"},
                           args=["--heartbeat", "0.3"]).start()
    try:
        async with websockets.connect(server.ws_url) as conn:
            await expect_close(conn, 4408)
        conn = await ws_connect(server, cursor=None)
        assert (await next_frame(conn))["heartbeat"] == 0.3
        frames = []
        while True:  # pings arrive; without a pong the server gives up after 2 x heartbeat
            frame = await next_frame(conn)
            frames.append(frame["op"])
            if frame["op"] == "error":
                assert frame["code"] == 4408
                break
        assert "ping" in frames
        answering = await ws_connect(server, cursor=None)
        pings = 0
        while pings < 6:  # 6 x 0.3 s: well past 2 x heartbeat, and still open
            frame = await next_frame(answering)
            if frame["op"] == "ping":
                pings += 1
                await answering.send('{"op": "pong"}')
            assert frame["op"] != "error", frame
        await answering.close()
    finally:
        server.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_silent_client_is_closed_soon_after_twice_the_heartbeat(
        database_url: str) -> None:
    """The contract closes a client silent for 2 x heartbeat. A client whose last frame came
    just after the server's ping is the worst case for a server that looks only when it
    pings (every heartbeat): it would be closed a whole heartbeat late, after 3 x. It is
    closed within a quarter of a heartbeat of 2 x (plus the scheduler's slack)."""
    heartbeat = 2.0
    server = ServerProcess(database_url, args=["--heartbeat", str(heartbeat)]).start()
    try:
        conn = await ws_connect(server, cursor=None)
        assert (await next_frame(conn))["op"] == "welcome"
        while (await next_frame(conn))["op"] != "ping":
            pass
        await conn.send('{"op": "pong"}')  # the last frame, right after a look
        last = asyncio.get_running_loop().time()
        while (frame := await next_frame(conn))["op"] != "error":
            assert frame["op"] == "ping", frame
        silent = asyncio.get_running_loop().time() - last
        assert frame["code"] == 4408
        assert 2 * heartbeat <= silent < 2.5 * heartbeat, silent
    finally:
        server.stop()


async def test_shutdown_closes_subscribers_with_1001(database_url: str) -> None:
    server = ServerProcess(database_url).start()
    conn = await ws_connect(server, cursor=None)
    await next_frame(conn)
    stopping = asyncio.get_running_loop().run_in_executor(None, server.stop)
    frames: list[dict[str, Any]] = []
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            frames.append(await next_frame(conn))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert await stopping == 0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_database_trouble_closes_1013_reconnect_later(database_url: str) -> None:
    """While the database is away, a hello whose token must be looked up, a subscriber paged
    from the log and an ack end as the protocol says of trouble that will pass: 1013, to
    reconnect later, not 1011 and a traceback as for a fault of the server's own."""
    async with TcpProxy(5432) as proxy:
        server = ServerProcess(through(proxy, database_url),
                               env={"SIGNALBOX_COMMIT_TIMEOUT": "1"},
                               args=["--window", "100", "--page-size", "10",
                                     "--token-cache", "600", "--heartbeat", "300"])
        await asyncio.to_thread(server.start)  # from a thread: the proxy serves on this loop
        try:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
                for _ in range(60):  # 120 events: the first ones are behind the window
                    await post(client)
            consumer = await ws_connect(server, cursor=None, consumer="bot")  # token cached
            assert (await next_frame(consumer))["op"] == "welcome"
            assert (await next_frame(consumer))["op"] == "live"
            proxy.fail()
            async with websockets.connect(server.ws_url) as looked_up:
                await looked_up.send(hello(token="sbx_never_seen", cursor=None))
                closing = await expect_close(looked_up, 1013)
                assert closing["message"] == "the log is unavailable right now: reconnect later"
            paged = await ws_connect(server, cursor=0)
            assert (await next_frame(paged))["op"] == "welcome"
            await expect_close(paged, 1013)
            await consumer.send(json.dumps({"op": "ack", "position": 1}))
            while (frame := await next_frame(consumer))["op"] == "ping":
                pass
            assert frame["op"] == "error" and frame["code"] == 1013, frame
        finally:
            proxy.recover()
            await asyncio.to_thread(server.stop)
        assert "websocket session failed" not in "".join(server.output)


FILTERS = st.sampled_from([
    None,
    {"types": ["signal.accepted"]},
    {"tickers": ["AAA"]},
    {"types": ["signal.*"], "tickers": ["BBB", "CCC"]},
])


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_resume_after_random_disconnects_loses_nothing(
        server: ServerProcess, client: httpx.AsyncClient) -> None:
    """Property: whatever the disconnect points and the filter, a subscriber that reconnects
    with the last position it saw ends with exactly the matching sequence."""
    tickers = ["AAA", "BBB", "CCC"]

    async def run(disconnects: list[int], event_filter: dict[str, Any] | None) -> None:
        start = (await client.get("/readyz")).json()["head"]
        writers_done = asyncio.Event()
        last_written = start

        async def write() -> None:
            nonlocal last_written
            async with FastClient(server.base_url, connections=2) as fast:
                for i in range(60):
                    status, body = await fast.post("/api/signals",
                                                   {**BTC, "ticker": tickers[i % 3]},
                                                   INGEST_TOKEN)
                    assert status == 202
                    last_written = max(last_written, body["position"])
            writers_done.set()

        async def next_or_idle(conn: ClientConnection) -> dict[str, Any] | None:
            """The next frame; None once the writers are done and 1 s passes without one (in
            1 s steps: the writers may finish while it waits)."""
            while True:
                try:
                    return await next_frame(conn, 1.0)
                except TimeoutError:
                    if writers_done.is_set():
                        return None

        writer = asyncio.create_task(write())
        seen: list[dict[str, Any]] = []
        cursor = start
        budget = list(disconnects)
        while True:
            # An unbounded receive queue: a connection left with frames unread still reads
            # the server's close frame, instead of waiting out the 10 s closing timeout.
            conn = await websockets.connect(server.ws_url, max_size=None, max_queue=None)
            await conn.send(json.dumps({"op": "hello", "token": ADMIN_TOKEN, "cursor": cursor,
                                        "filter": event_filter}))
            try:
                assert (await next_frame(conn))["op"] == "welcome"
                taken = 0
                limit = budget.pop(0) if budget else None
                while limit is None or taken < limit:
                    if limit is not None and writers_done.is_set() and cursor >= last_written:
                        break  # nothing is left for this connection: on to the next one
                    frame = await next_or_idle(conn)
                    if frame is None:
                        break
                    if frame["op"] == "event":
                        seen.append(frame)
                        cursor = frame["position"]
                        taken += 1
                    elif frame["op"] == "live":
                        cursor = max(cursor, frame["position"])
            finally:
                await conn.close()
            if writers_done.is_set() and not budget and limit is None:
                break
        await writer
        expected = await expected_events(client, start, event_filter)
        positions = [e["position"] for e in seen]
        assert positions == sorted(set(positions)), "out of order or repeated"
        assert positions == [e["position"] for e in expected], "gap"

    @settings(max_examples=5, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.integers(min_value=0, max_value=40), max_size=4), FILTERS)
    def property_(disconnects: list[int], event_filter: dict[str, Any] | None) -> None:
        asyncio.run_coroutine_threadsafe(run(disconnects, event_filter), loop).result(120)

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, property_)


async def expected_events(client: httpx.AsyncClient, after: int,
                          event_filter: dict[str, Any] | None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"after": after, "limit": 1000}
    if event_filter:
        params["type"] = ",".join(event_filter.get("types", []))
        params["ticker"] = ",".join(event_filter.get("tickers", []))
    response = await client.get("/api/events", params=params, headers=headers())
    events: list[dict[str, Any]] = response.json()["events"]
    return events


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_slow_reader_does_not_grow_server_memory_and_gets_everything(
        database_url: str) -> None:
    # The heartbeat outlasts the test: a reader that does not read cannot answer pings.
    server = ServerProcess(database_url, env={"SIGNALBOX_WINDOW": "1000"},
                           args=["--heartbeat", "300"]).start()
    try:
        assert server.process is not None
        process = psutil.Process(server.process.pid)
        reader = await websockets.connect(server.ws_url, max_size=None, max_queue=1,
                                          ping_interval=None)
        await reader.send(json.dumps({"op": "hello", "token": ADMIN_TOKEN, "cursor": 0}))
        baseline = 0
        async with FastClient(server.base_url) as client:
            for batch in range(25):
                statuses = await asyncio.gather(*(
                    client.post("/api/signals", {**BTC, "ticker": f"T{i}"}, INGEST_TOKEN)
                    for i in range(1000)))
                assert {status for status, _ in statuses} == {202}
                if batch == 2:
                    baseline = process.memory_info().rss
        grown = process.memory_info().rss - baseline
        head = 50_000
        # The reader took nothing while 50,000 events were appended: the server must not
        # have buffered them for it.
        assert grown < 30 * 1024 * 1024, f"server grew by {grown / 1e6:.1f} MB"
        positions: list[int] = []
        while not positions or positions[-1] < head:
            frame = json.loads(await asyncio.wait_for(reader.recv(), 30))
            if frame["op"] == "event":
                positions.append(frame["position"])
        assert positions == list(range(1, head + 1))
        await reader.close()
    finally:
        server.stop()


@sqlite_only("the subject is the server's writes to one socket, after the log was read")
async def test_a_reader_that_stops_reading_holds_a_chunk_not_the_backlog(
        database_url: str) -> None:
    """Pages of large events, without compression: the server writes a page 64 KiB at a
    time and waits for the socket between writes, so a client that reads nothing makes it
    hold about one chunk, not the 24 MB of events it is behind by."""
    server = ServerProcess(database_url, env={"SIGNALBOX_WINDOW": "100",
                                              "SIGNALBOX_PAGE_SIZE": "10"},
                           args=["--heartbeat", "300"]).start()
    try:
        assert server.process is not None
        process = psutil.Process(server.process.pid)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            for _ in range(400):  # rejected (not an alert), but logged as received
                response = await client.post(f"/webhooks/tradingview/{INGEST_TOKEN}",
                                             content="x" * 60_000)
                assert response.status_code == 422, response.text
            head = await head_of(client)
        baseline = process.memory_info().rss
        reader = await websockets.connect(server.ws_url, compression=None, max_size=None,
                                          max_queue=1, ping_interval=None)
        try:
            await reader.send(hello(token=ADMIN_TOKEN, cursor=0))
            # The server would have buffered the backlog within a fraction of this.
            deadline = asyncio.get_running_loop().time() + 3
            peak = baseline
            while asyncio.get_running_loop().time() < deadline:
                peak = max(peak, process.memory_info().rss)
                await asyncio.sleep(0.05)
            assert peak - baseline < 8 * 1024 * 1024, \
                f"server grew by {(peak - baseline) / 1e6:.1f} MB"
            positions = [frame["position"]
                         for frame in await collect_until(reader, head) if "position" in frame]
            assert positions == list(range(1, head + 1))
        finally:
            await reader.close()
    finally:
        server.stop()


@sqlite_only("the subject is the server's writes to one socket, after the log was read")
async def test_a_reader_that_stops_reading_is_dropped_after_twice_the_heartbeat(
        database_url: str) -> None:
    """A client that says hello and then neither reads nor sends, behind more than its socket
    holds: the stream waits in a write that never ends, so the 4408's error frame and close
    cannot be written, and closing the socket would wait for it to drain. The server drops
    the connection instead, letting go of its session, pages and socket."""
    heartbeat = 0.5
    server = ServerProcess(database_url, env={"SIGNALBOX_WINDOW": "100",
                                              "SIGNALBOX_PAGE_SIZE": "10"},
                           args=["--heartbeat", str(heartbeat)]).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            for _ in range(100):  # 6 MB: far more than the two ends' socket buffers take
                response = await client.post(f"/webhooks/tradingview/{INGEST_TOKEN}",
                                             content="x" * 60_000)
                assert response.status_code == 422, response.text
        raw = await RawClient.connect(server.port, receive_buffer=4096)
        raw.send(encode_frame(TEXT, hello(token=ADMIN_TOKEN, cursor=0).encode()))
        assert json.loads(await raw.text())["op"] == "welcome"
        assert scrape_one(server, "signalbox_subscribers") == 1
        # Silent for 2 x heartbeat, found so at the next beat, then the close's own timeout.
        deadline = 3 * heartbeat + CLOSE_TIMEOUT + 5
        wait_until(lambda: scrape_one(server, "signalbox_subscribers") == 0, deadline, 0.2)
        # Dropped, not closed: what the client had not read went with the connection.
        assert (await raw.until_close(deadline)).close_code is None
    finally:
        server.stop()
