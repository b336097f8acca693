"""The HTTP contract from a client's side: every status and error code, over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    ServerProcess,
    headers,
    read_all_events,
    wait_until,
)

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}
# Most tests share a server (each asserts only about the signals it posts); between them they
# send more bad tokens than the failed-authentication limit allows one address, so the server
# judges each on its own (the limit is tested in test_security.py).
pytestmark = pytest.mark.server_args("--auth-failures", "0")
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded"]


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error", "message"}, body
    assert body["message"], body
    code: str = body["error"]
    return code


async def timeline(client: httpx.AsyncClient, signal_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/api/signals/{signal_id}", headers=headers())
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


async def test_api_signal_accepted_is_committed_before_the_answer(
        shared_client: httpx.AsyncClient) -> None:
    response = await shared_client.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "accepted" and body["duplicate"] is False
    events = await timeline(shared_client, body["signal_id"])
    assert [e["type"] for e in events] == ["signal.received", "signal.accepted"]
    assert events[-1]["position"] == body["position"]
    assert events[-1]["data"]["signal"]["ticker"] == "BTCUSDT"
    assert events[-1]["data"]["signal"]["quantity"] == "0.01"


async def test_numbers_of_a_json_body_are_read_exactly_and_read_again_alike(
        shared_client: httpx.AsyncClient) -> None:
    # More digits than a float holds: the signal keeps them all, and renormalization, which
    # reads the recorded body again, finds nothing that today's reading would change.
    body = '{"ticker":"BTCUSDT","action":"buy","quantity":0.1,"price":67432.123456789012345678}'
    response = await shared_client.post("/api/signals", content=body,
                                        headers=headers(INGEST_TOKEN))
    assert response.status_code == 202, response.text
    signal_id = response.json()["signal_id"]
    accepted = (await timeline(shared_client, signal_id))[-1]
    assert accepted["data"]["signal"]["price"] == "67432.123456789012345678"
    again = await shared_client.post(f"/api/signals/{signal_id}/renormalize", headers=headers())
    assert again.status_code == 200, again.text
    assert again.json()["changed"] is False


async def test_repeat_of_idempotency_key_answers_the_original(
        shared_client: httpx.AsyncClient) -> None:
    key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    first = await shared_client.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN, **key))
    again = await shared_client.post("/api/signals", json={**BTC, "quantity": "5"},
                                     headers=headers(INGEST_TOKEN, **key))
    assert first.status_code == 202 and again.status_code == 200, again.text
    assert again.json()["signal_id"] == first.json()["signal_id"]
    assert again.json()["duplicate"] is True
    assert again.json()["position"] > first.json()["position"]
    types = [e["type"] for e in await timeline(shared_client, first.json()["signal_id"])]
    assert types == ["signal.received", "signal.accepted", "signal.duplicate"]


async def test_concurrent_repeats_of_one_key_record_one_signal(
        shared_client: httpx.AsyncClient) -> None:
    key = {"Idempotency-Key": f"race-{uuid.uuid4()}"}
    responses = await asyncio.gather(*(
        shared_client.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN, **key))
        for _ in range(20)
    ))
    assert sorted(r.status_code for r in responses) == [200] * 19 + [202]
    assert len({r.json()["signal_id"] for r in responses}) == 1


async def test_id_field_in_the_body_is_an_idempotency_key(
        shared_client: httpx.AsyncClient) -> None:
    body = json.dumps({**BTC, "id": f"tv-{uuid.uuid4()}"})
    url = f"/webhooks/tradingview/{INGEST_TOKEN}"
    first = await shared_client.post(url, content=body)
    again = await shared_client.post(url, content=body)
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["signal_id"] == first.json()["signal_id"]


@pytest.mark.parametrize("route", [f"/webhooks/tradingview/{INGEST_TOKEN}", "/api/signals"],
                         ids=["webhook", "api"])
async def test_an_id_with_a_control_character_is_recorded_and_rejected(
        shared_client: httpx.AsyncClient, route: str) -> None:
    """Not refused unrecorded (TradingView does not resend a 4xx): rejected, for the audit."""
    response = await shared_client.post(route, content=json.dumps({**BTC, "id": "a\u0001b"}),
                                        headers=headers(INGEST_TOKEN))
    assert response.status_code == 422, response.text
    assert [(e["code"], e["field"]) for e in response.json()["errors"]] == [
        ("invalid_value", "id")]
    found = await shared_client.get(f"/api/signals/{response.json()['signal_id']}",
                                    headers=headers())
    assert found.json()["status"] == "rejected"


async def test_invalid_signal_is_recorded_and_answered_422(
        shared_client: httpx.AsyncClient) -> None:
    response = await shared_client.post("/api/signals",
                                        json={"ticker": "BTCUSDT", "action": "hodl"},
                                        headers=headers(INGEST_TOKEN))
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["status"] == "rejected" and body["errors"]
    assert all({"code", "field", "message"} <= set(e) for e in body["errors"])
    types = [e["type"] for e in await timeline(shared_client, body["signal_id"])]
    assert types == ["signal.received", "signal.rejected"]


async def test_body_that_is_not_json_is_400(shared_client: httpx.AsyncClient) -> None:
    response = await shared_client.post("/api/signals", content=b"{not json",
                                        headers=headers(INGEST_TOKEN))
    assert response.status_code == 400 and error_of(response) == "bad_request"


@pytest.mark.parametrize("auth", [None, "Bearer nope", "Basic abc", "Bearer"])
async def test_missing_or_bad_token_is_401(shared_client: httpx.AsyncClient,
                                           auth: str | None) -> None:
    extra = {"Authorization": auth} if auth else {}
    response = await shared_client.post("/api/signals", json=BTC, headers=extra)
    assert response.status_code == 401 and error_of(response) == "unauthorized"
    response = await shared_client.get("/api/events", headers=extra)
    assert response.status_code == 401 and error_of(response) == "unauthorized"


async def test_wrong_scope_is_403(shared_client: httpx.AsyncClient) -> None:
    response = await shared_client.get("/api/events", headers=headers(INGEST_TOKEN))
    assert response.status_code == 403 and error_of(response) == "forbidden"


async def test_webhook_with_bad_token_in_path_is_401_and_not_recorded(
        shared_client: httpx.AsyncClient) -> None:
    head = (await shared_client.get("/readyz")).json()["head"]
    response = await shared_client.post("/webhooks/tradingview/sbx_wrong",
                                        content=json.dumps(BTC))
    assert response.status_code == 401 and error_of(response) == "unauthorized"
    after = await shared_client.get("/api/events", params={"after": head}, headers=headers())
    assert after.json()["events"] == []


async def test_webhook_passphrase_in_body_authenticates_and_is_never_stored(
        shared_client: httpx.AsyncClient) -> None:
    body = json.dumps({**BTC, "passphrase": INGEST_TOKEN})
    response = await shared_client.post("/webhooks/tradingview", content=body)
    assert response.status_code == 202, response.text
    events = await timeline(shared_client, response.json()["signal_id"])
    assert INGEST_TOKEN not in json.dumps(events)
    assert "[redacted]" in events[0]["data"]["body"]
    missing = await shared_client.post("/webhooks/tradingview", content=json.dumps(BTC))
    assert missing.status_code == 401 and error_of(missing) == "unauthorized"
    wrong = await shared_client.post("/webhooks/tradingview",
                                     content=json.dumps({**BTC, "secret": "sbx_nope"}))
    assert wrong.status_code == 401


async def test_body_over_the_limit_is_413(shared_client: httpx.AsyncClient) -> None:
    big = json.dumps({**BTC, "comment": "x" * 70_000})
    response = await shared_client.post(f"/webhooks/tradingview/{INGEST_TOKEN}", content=big)
    assert response.status_code == 413 and error_of(response) == "payload_too_large"

    async def chunks() -> Any:  # no Content-Length: the limit holds while streaming too
        for _ in range(80):
            yield b"x" * 1024

    response = await shared_client.post("/api/signals", content=chunks(),
                                        headers=headers(INGEST_TOKEN))
    assert response.status_code == 413 and error_of(response) == "payload_too_large"


async def test_unknown_route_and_method_are_json_errors(shared_client: httpx.AsyncClient) -> None:
    response = await shared_client.get("/nope")
    assert response.status_code == 404 and error_of(response) == "not_found"
    response = await shared_client.delete("/api/signals")
    assert response.status_code == 405 and error_of(response) == "method_not_allowed"
    # A webhook's URL holds its token: an answer about that URL names it without the token.
    for method, path in (("GET", f"/webhooks/tradingview/{INGEST_TOKEN}"),
                         ("POST", f"/webhooks/tradingview/{INGEST_TOKEN}/x")):
        response = await shared_client.request(method, path)
        assert response.status_code in (404, 405) and INGEST_TOKEN not in response.text
        assert "/webhooks/tradingview/[redacted]" in response.json()["message"]


async def test_a_plain_get_of_the_stream_says_to_upgrade(
        shared_client: httpx.AsyncClient) -> None:
    """A browser's address bar or curl on /ws: the stream is there, for a WebSocket client."""
    response = await shared_client.get("/ws")
    assert response.status_code == 426 and error_of(response) == "upgrade_required"
    assert response.headers["upgrade"] == "websocket"
    assert "WebSocket" in response.json()["message"]


async def test_unknown_signal_is_404(shared_client: httpx.AsyncClient) -> None:
    response = await shared_client.get(f"/api/signals/{uuid.uuid4()}", headers=headers())
    assert response.status_code == 404 and error_of(response) == "not_found"


async def test_a_path_ending_in_a_slash_is_not_found_not_redirected(
        shared_client: httpx.AsyncClient) -> None:
    for method, path in [("GET", "/api/events/"), ("POST", "/api/signals/"),
                         ("POST", "/api/signals/abc%2F/status"), ("GET", "/api/signals/abc%2F")]:
        response = await shared_client.request(method, path, headers=headers(INGEST_TOKEN),
                                               json={"status": "processed"})
        assert response.status_code == 404, (method, path, response.status_code)
        assert error_of(response) == "not_found" and "location" not in response.headers


async def test_health_and_readiness(shared_client: httpx.AsyncClient) -> None:
    assert (await shared_client.get("/healthz")).status_code == 200
    ready = await shared_client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_events_paging_filters_and_next_cursor(shared_client: httpx.AsyncClient) -> None:
    start = (await shared_client.get("/readyz")).json()["head"]
    for ticker in ["EVA", "EVB", "EVA"]:  # tickers of this test alone: the log is shared
        response = await shared_client.post("/api/signals", json={**BTC, "ticker": ticker},
                                            headers=headers(INGEST_TOKEN))
        assert response.status_code == 202
    page = (await shared_client.get("/api/events", params={"after": start, "limit": 2},
                                    headers=headers())).json()
    assert [e["position"] for e in page["events"]] == [start + 1, start + 2]
    assert page["next"] == start + 2 and page["head"] == start + 6
    accepted = (await shared_client.get("/api/events",
                                        params={"type": "signal.acc*", "ticker": "EVA"},
                                        headers=headers())).json()
    assert [e["type"] for e in accepted["events"]] == ["signal.accepted"] * 2
    assert accepted["next"] == start + 6
    assert {e["meta"]["ticker"] for e in accepted["events"]} == {"EVA"}
    bad = await shared_client.get("/api/events", params={"after": "x"}, headers=headers())
    assert bad.status_code == 400 and error_of(bad) == "bad_request"


async def test_events_newest_first_page_down_from_the_head(
        shared_client: httpx.AsyncClient) -> None:
    """order=newest: the end of a ticker's history without reading the rest of it."""
    positions = []
    for ticker in ["NWA", "NWB", "NWA", "NWA", "NWA"]:  # tickers of this test alone
        response = await shared_client.post("/api/signals", json={**BTC, "ticker": ticker},
                                            headers=headers(INGEST_TOKEN))
        assert response.status_code == 202
        if ticker == "NWA":
            positions.append(response.json()["position"])  # its signal.accepted
    query: dict[str, str | int] = {"order": "newest", "type": "signal.accepted", "ticker": "NWA",
                                    "limit": 3}
    first = (await shared_client.get("/api/events", params=query, headers=headers())).json()
    assert [e["position"] for e in first["events"]] == positions[:0:-1]
    assert first["next"] == positions[1]
    second = (await shared_client.get("/api/events", params={**query, "before": first["next"]},
                                      headers=headers())).json()
    assert [e["position"] for e in second["events"]] == positions[:1]
    assert second["next"] == 0  # fewer than limit: the last page
    above = (await shared_client.get("/api/events", params={**query, "after": positions[1]},
                                     headers=headers())).json()
    assert [e["position"] for e in above["events"]] == positions[:1:-1]
    everything = (await shared_client.get("/api/events", params={"order": "newest", "limit": 2},
                                          headers=headers())).json()
    head = everything["head"]
    assert [e["position"] for e in everything["events"]] == [head, head - 1]
    bad = await shared_client.get("/api/events", params={"order": "up"}, headers=headers())
    assert bad.status_code == 400 and error_of(bad) == "bad_request"


async def test_signals_list_filters_and_pages(shared_client: httpx.AsyncClient) -> None:
    ids = []
    for ticker in ["SLA", "SLB", "SLA", "SLC"]:  # tickers of this test alone
        response = await shared_client.post("/api/signals", json={**BTC, "ticker": ticker},
                                            headers=headers(INGEST_TOKEN))
        ids.append(response.json()["signal_id"])
    await shared_client.post("/api/signals", json={"ticker": "SLA"},
                             headers=headers(INGEST_TOKEN))
    listing = (await shared_client.get("/api/signals",
                                       params={"ticker": "SLA", "status": "accepted"},
                                       headers=headers())).json()
    assert [s["signal_id"] for s in listing["signals"]] == [ids[2], ids[0]]
    # Newest first: this test's signals are the newest of the shared log.
    first = (await shared_client.get("/api/signals", params={"limit": 2},
                                     headers=headers())).json()
    second = (await shared_client.get("/api/signals", params={
        "limit": 2, "before": first["next_before"]}, headers=headers())).json()
    assert len(first["signals"]) == 2
    assert first["signals"][1]["signal_id"] == ids[3]  # newest first; [0] is the rejected one
    assert [s["signal_id"] for s in second["signals"]] == [ids[2], ids[1]]


def load_real_world_bodies() -> list[tuple[str, str]]:
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "tradingview-alerts.jsonl"
    if not path.exists():
        return []
    return [(row["name"], row["body"]) for row in map(json.loads, path.read_text().splitlines())]


REAL_WORLD = [
    ("strategy_fill", json.dumps({"ticker": "BTCUSDT", "exchange": "BINANCE", "action": "buy",
                                  "contracts": 0.015, "price": 67432.5})),
    ("crlf_emoji", '{\r\n"ticker": "TSLA",\r\n"action": "buy",\r\n'
                   '"comment": "\U0001f680 to the moon"\r\n}'),
    ("placeholder", '{"ticker": "CL1!", "action": "{{strategy.order.action}}"}'),
    ("invalid_json", '{"ticker":"{{ticker}}","action":"buy","price":{{close}}}'),
    ("key_value", "ticker=ETHUSDT\naction=sell\nqty=2"),
    ("csv", "60123456789,buy,EURUSD,risk=1,sl=10,tp=20"),
    ("free_text", "BTC looks bullish today"),
    ("empty", ""),
    ("binary", "\x00\x01\x02\ufffd"),
    *load_real_world_bodies(),
]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
async def test_real_world_bodies_are_recorded_and_never_5xx(
        shared_client: httpx.AsyncClient, content_type: str) -> None:
    outcomes = {}
    for name, body in REAL_WORLD:
        response = await shared_client.post(f"/webhooks/tradingview/{INGEST_TOKEN}",
                                             content=body.encode("utf-8"),
                                             headers={"Content-Type": content_type})
        assert response.status_code in (202, 422), (name, response.text)
        outcomes[name] = response.status_code
        events = await timeline(shared_client, response.json()["signal_id"])
        assert events[0]["type"] == "signal.received"
        assert events[0]["data"]["body"] == body.replace("\x00", "\x00")
        assert events[1]["type"] == ("signal.accepted" if response.status_code == 202
                                     else "signal.rejected")
    assert outcomes["strategy_fill"] == 202
    assert outcomes["key_value"] == 202
    assert outcomes["placeholder"] == 422
    assert outcomes["invalid_json"] == 422
    assert outcomes["free_text"] == 422


async def test_invalid_utf8_is_recorded_with_a_flag(shared_client: httpx.AsyncClient) -> None:
    response = await shared_client.post(f"/webhooks/tradingview/{INGEST_TOKEN}",
                                        content=b'{"ticker": "\xff\xfe", "action": "buy"}')
    assert response.status_code in (202, 422)
    events = await timeline(shared_client, response.json()["signal_id"])
    assert events[0]["data"]["invalid_utf8"] is True


async def test_placeholder_rejection_names_the_field(shared_client: httpx.AsyncClient) -> None:
    response = await shared_client.post(
               f"/webhooks/tradingview/{INGEST_TOKEN}",
               content='{"ticker":"CL1!","action":"buy","quantity":"{{strategy.order.contracts}}"}')
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert any(e["code"] == "unreplaced_placeholder" and e["field"] == "quantity"
               for e in errors), errors


async def test_expired_signal_is_rejected(shared_client: httpx.AsyncClient) -> None:
    response = await shared_client.post(
               f"/webhooks/tradingview/{INGEST_TOKEN}",
               content=json.dumps({**BTC, "time": "2020-01-01T00:00:00Z", "max_lag": 60}))
    assert response.status_code == 422
    assert [e["code"] for e in response.json()["errors"]] == ["expired"]


async def test_metrics_are_prometheus_text(client: httpx.AsyncClient) -> None:
    await client.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
    await client.post("/api/signals", json={"ticker": "X"}, headers=headers(INGEST_TOKEN))
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = set(response.text.splitlines())
    assert {"signalbox_log_head 4.0", 'signalbox_signals{status="accepted"} 1.0',
            'signalbox_signals{status="rejected"} 1.0', "signalbox_signals_stuck 0.0"} <= lines
    assert INGEST_TOKEN not in response.text and ADMIN_TOKEN not in response.text


async def test_admin_token_has_every_scope(shared_client: httpx.AsyncClient) -> None:
    posted = await shared_client.post("/api/signals", json=BTC, headers=headers(ADMIN_TOKEN))
    assert posted.status_code == 202
    assert (await shared_client.get("/api/events", headers=headers(ADMIN_TOKEN))).status_code == 200


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_source_allowlist_and_trusted_proxies(database_url: str) -> None:
    server = ServerProcess(database_url, env={
        "SIGNALBOX_ALLOWED_SOURCES": "10.1.0.0/16",
        "SIGNALBOX_TRUSTED_PROXIES": "127.0.0.1",
    }).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            url = f"/webhooks/tradingview/{INGEST_TOKEN}"
            denied = await client.post(url, content=json.dumps(BTC))
            assert denied.status_code == 403 and error_of(denied) == "source_not_allowed"
            forwarded = await client.post(url, content=json.dumps(BTC),
                                          headers={"X-Forwarded-For": "10.1.2.3"})
            assert forwarded.status_code == 202, forwarded.text
            spoofed = await client.post(url, content=json.dumps(BTC),
                                        headers={"X-Forwarded-For": "10.1.2.3, 8.8.8.8"})
            assert spoofed.status_code == 403
            api = await client.post("/api/signals", json=BTC, headers={
                **headers(INGEST_TOKEN), "X-Forwarded-For": "10.1.9.9"})
            assert api.status_code == 202, api.text
            received = [e["data"] for e in await read_all_events(client)
                        if e["type"] == "signal.received"]
            assert [d["remote_addr"] for d in received] == ["10.1.2.3", "10.1.9.9"]
    finally:
        server.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_forwarded_for_counts_only_from_a_trusted_proxy(database_url: str) -> None:
    """With no trusted proxy, X-Forwarded-For is the client's own word: a local process
    cannot pass the allowlist, hide from the failure limit or sign the audit trail with it."""
    server = ServerProcess(database_url, env={
        "SIGNALBOX_ALLOWED_SOURCES": "10.1.0.0/16", "SIGNALBOX_AUTH_FAILURES": "2",
    }).start()
    forged = {"X-Forwarded-For": "10.1.2.3", "X-Forwarded-Proto": "https"}
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            hook = await client.post(f"/webhooks/tradingview/{INGEST_TOKEN}",
                                     content=json.dumps(BTC), headers=forged)
            assert hook.status_code == 403 and error_of(hook) == "source_not_allowed"
            api = await client.post("/api/signals", json=BTC,
                                    headers={**headers(INGEST_TOKEN), **forged})
            assert api.status_code == 202, api.text
            received = [e["data"] for e in await read_all_events(client)
                        if e["type"] == "signal.received"]
            assert [d["remote_addr"] for d in received] == ["127.0.0.1"]
            for n in range(2):  # each failure under another forged address
                failed = await client.get("/api/signals", headers={
                    "Authorization": "Bearer wrong", "X-Forwarded-For": f"10.1.3.{n}"})
                assert failed.status_code == 401
            refused = await client.get("/api/signals", headers={
                **headers(ADMIN_TOKEN), "X-Forwarded-For": "10.1.3.7"})
            assert refused.status_code == 429, refused.text
            assert error_of(refused) == "too_many_auth_failures"
            assert "127.0.0.1" in refused.json()["message"]
        # Said once, for the operator of a proxy not listed: what went unheeded, and what to do.
        wait_until(lambda: any("X-Forwarded-For from 127.0.0.1 ignored" in line
                               for line in server.output))
        warned = [line for line in server.output if "X-Forwarded-For" in line]
        assert len(warned) == 1 and "SIGNALBOX_TRUSTED_PROXIES" in warned[0]
    finally:
        server.stop()


def test_a_client_that_leaves_before_its_body_costs_a_line_not_a_traceback(
        server: ServerProcess) -> None:
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(f"POST /api/signals HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    f"{INGEST_TOKEN}\r\nContent-Length: 1000\r\n\r\n{{\"ticker\"".encode())
    wait_until(lambda: any("client went away" in line for line in server.output))
    assert not [line for line in server.output if "Traceback" in line or "unhandled" in line]
