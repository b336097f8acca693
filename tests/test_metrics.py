"""``/metrics`` after known traffic: every family, with the values that traffic must give."""

from __future__ import annotations

import json
import socket

import httpx
import websockets
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    ServerProcess,
    headers,
    next_frame,
    wait_until,
    ws_connect,
)

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: httpx.AsyncClient) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and every family's type, parsed as Prometheus does."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_known_traffic(database_url: str) -> None:
    server = ServerProcess(database_url, env={
        "SIGNALBOX_ALLOWED_SOURCES": "10.1.0.0/16",
        "SIGNALBOX_TRUSTED_PROXIES": "127.0.0.1",
    }, args=["--window", "100"]).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            await run_traffic_and_check(server, client)
    finally:
        server.stop()


async def run_traffic_and_check(server: ServerProcess, client: httpx.AsyncClient) -> None:
    api, webhook = "/api/signals", f"/webhooks/tradingview/{INGEST_TOKEN}"
    ingest = headers(INGEST_TOKEN)
    statuses = []
    # 227 events: more than the window, so a reader from 0 pages; and big ones (over
    # 10 MB in all), so that a reader who does not read stalls the server's sends.
    big = {**BTC, "comment": "x" * 60_000}
    for _ in range(110):
        statuses.append((await client.post(api, json=big, headers=ingest)).status_code)
    statuses.append((await client.post(api, json={"ticker": "X"}, headers=ingest)).status_code)
    for _ in range(2):
        statuses.append((await client.post(api, json=BTC, headers={
            **ingest, "Idempotency-Key": "order-1"})).status_code)
    statuses.append((await client.post(webhook, content=json.dumps(BTC), headers={
        "X-Forwarded-For": "10.1.2.3"})).status_code)
    assert statuses == [202] * 110 + [422, 202, 200, 202]
    ingested = len(statuses)

    # Refusals, one of each reason.
    assert (await client.post(api, json=BTC)).status_code == 401
    assert (await client.post(api, json=BTC, headers=headers("sbx_nope"))).status_code == 401
    assert (await client.get("/api/events", headers=ingest)).status_code == 403
    assert (await client.post(webhook, content=json.dumps(BTC))).status_code == 403

    head = (await client.get("/readyz")).json()["head"]
    # A subscriber from the beginning: what is behind the window (of 100) is paged from the
    # log; pages are bounded in bytes, so the last events may come from the window instead.
    reader = await ws_connect(server, cursor=0)
    assert (await next_frame(reader))["op"] == "welcome"
    received = 0
    while (frame := await next_frame(reader))["op"] != "live":
        received += frame["op"] == "event"
    assert received == head
    paged = scrape_one(server, "signalbox_events_paged_from_log_total")
    assert head - 100 <= paged <= head
    # One that does not read: stuck behind the window, its connection paged from the log.
    stalled = await websockets.connect(server.ws_url, sock=small_window_socket(server.port),
                                       max_size=None, max_queue=1, compression=None)
    await stalled.send(json.dumps({"op": "hello", "token": ADMIN_TOKEN, "cursor": 0}))
    # One connection that never says hello, one closed for garbage, one that closes itself.
    silent = await websockets.connect(server.ws_url)
    garbage = await ws_connect(server, cursor=None)
    await next_frame(garbage)
    await next_frame(garbage)
    await garbage.send("not json")
    assert (await next_frame(garbage))["code"] == 4400
    polite = await ws_connect(server, cursor=None)
    await next_frame(polite)
    await polite.close()

    def closes_counted() -> bool:
        return scrape_one(server, "signalbox_websocket_closes_total", code="1000") == 1

    wait_until(closes_counted, timeout=30)
    samples, types = await scrape(client)

    assert value(samples, "signalbox_signals_received_total", source="api",
                 outcome="accepted") == 111
    assert value(samples, "signalbox_signals_received_total", source="api",
                 outcome="rejected") == 1
    assert value(samples, "signalbox_signals_received_total", source="api",
                 outcome="duplicate") == 1
    assert value(samples, "signalbox_signals_received_total", source="webhook",
                 outcome="accepted") == 1
    assert types["signalbox_signals_received"] == "counter"

    for reason in ("missing_token", "bad_token", "missing_scope", "source_not_allowed"):
        assert value(samples, "signalbox_auth_failures_total", reason=reason) == 1, reason

    # Every acknowledged request waited for one commit; the batches hold exactly those units.
    assert types["signalbox_append_seconds"] == "histogram"
    assert value(samples, "signalbox_append_seconds_count") == ingested
    assert value(samples, "signalbox_append_seconds_bucket", le="+Inf") == ingested
    assert value(samples, "signalbox_append_seconds_sum") > 0
    assert value(samples, "signalbox_commit_batch_units_sum") == ingested
    commits = value(samples, "signalbox_commit_batch_units_count")
    assert 1 <= commits <= ingested
    assert value(samples, "signalbox_commit_seconds_count") == commits
    assert value(samples, "signalbox_commit_seconds_bucket", le="10.0") <= commits

    assert value(samples, "signalbox_events_paged_from_log_total") > paged  # the stalled one's
    assert value(samples, "signalbox_websocket_closes_total", code="4400") == 1
    assert value(samples, "signalbox_websocket_closes_total", code="1000") == 1
    assert value(samples, "signalbox_subscribers_by_state", state="live") == 1  # the reader
    assert value(samples, "signalbox_subscribers_by_state", state="opening") == 1  # silent
    assert value(samples, "signalbox_subscribers_by_state", state="paging") == 1  # stalled
    assert value(samples, "signalbox_subscribers_by_state", state="replaying") == 0
    assert value(samples, "signalbox_subscribers") == 3
    assert value(samples, "signalbox_log_head") == head
    # The window of 100 is cut back to 100 once it is a 64th over: never half again as many.
    assert 100 <= value(samples, "signalbox_hub_window_events") <= 101
    assert value(samples, "signalbox_signals", status="accepted") == 112
    assert value(samples, "signalbox_signals_stuck") == 0
    text = (await client.get("/metrics")).text
    assert INGEST_TOKEN not in text and ADMIN_TOKEN not in text
    await reader.close()
    await silent.close()
    stalled.transport.abort()


def small_window_socket(port: int) -> socket.socket:
    """A connected socket with a small fixed receive buffer (no autotuning to megabytes): a
    client that stops reading stops the server's sends after a few kilobytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def scrape_one(server: ServerProcess, name: str, **labels: str) -> float:
    """One sample, scraped synchronously (for polling with a deadline)."""
    text = httpx.get(server.base_url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def test_the_window_in_memory_is_bounded_in_bytes_and_readers_miss_nothing(
        database_url: str) -> None:
    """Big signals (a webhook body may be 64 KiB) fill the window's bytes long before its
    count: the window keeps no more than ``--window-bytes`` of events' JSON (and a 64th more
    before it is cut back), and a reader from the start still gets every event once, in
    order, the older ones paged from the log."""
    limit = 1024 * 1024
    server = ServerProcess(database_url, args=["--window-bytes", str(limit)]).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            for n in range(40):  # two events of over 60 KB each: about 5 MB in all
                answer = await client.post("/api/signals", headers=headers(INGEST_TOKEN),
                                           json={**BTC, "extras": {"n": n, "pad": "x" * 60_000}})
                assert answer.status_code == 202
            samples, types = await scrape(client)
            assert types["signalbox_hub_window_bytes"] == "gauge"
            held = value(samples, "signalbox_hub_window_bytes")
            assert 0 < held <= limit + limit // 64
            assert 0 < value(samples, "signalbox_hub_window_events") < 20
            head = int(value(samples, "signalbox_log_head"))
            assert head == 80
        conn = await ws_connect(server, cursor=0)
        try:
            assert (await next_frame(conn))["op"] == "welcome"
            positions: list[int] = []
            while len(positions) < head:
                frame = await next_frame(conn)
                if frame["op"] == "event":
                    positions.append(frame["position"])
            assert positions == list(range(1, head + 1))
        finally:
            await conn.close()
    finally:
        server.stop()
