"""Text the database or UTF-8 cannot carry. A JSON escape of half a surrogate pair
(``"\\ud800"``) decodes to a lone surrogate, which UTF-8 cannot carry: every door refuses
it with a clear answer, and an answer never fails on such text already recorded. NUL, which
JSON allows and PostgreSQL's text does not, is kept in events and left out of columns."""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx
import pytest
import websockets

from pipeline import migrate
from pipeline.ingest import Ingestor, Submission
from pipeline.log import EventLog, utc_now
from pipeline.signals import parse_api_signal
from tests.support import INGEST_TOKEN, ServerProcess, headers, next_frame

LONE = "\\ud800"  # as it appears in the body: six characters of ASCII
BODIES = [body.replace("@", LONE) for body in (
    '{"ticker": "AAPL", "action": "@"}',  # a checked field: its error would quote it
    '{"ticker": "AAPL", "action": "buy", "strategy": "trend @"}',
    '{"ticker": "AAPL", "action": "buy", "comment": "a@b"}'.replace("@", "\\udfff"),
    '{"ticker": "AAPL", "action": "buy", "extras": {"k@": 1}}',
    '{"ticker": "AAPL", "action": "buy", "@": 1}',  # an unknown field's name
)]
ROUTES = [f"/webhooks/tradingview/{INGEST_TOKEN}", "/api/signals"]


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
@pytest.mark.parametrize("route", ROUTES, ids=["webhook", "api"])
async def test_a_lone_surrogate_is_refused_and_recorded_as_such(
        client: httpx.AsyncClient, route: str, body: str) -> None:
    response = await client.post(route, content=body, headers=headers(INGEST_TOKEN))
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["status"] == "rejected"
    assert [e["code"] for e in answer["errors"]] == ["invalid_value"]
    assert "lone surrogate" in answer["errors"][0]["message"]
    # What was recorded is readable, and holds the body as it was sent.
    found = await client.get(f"/api/signals/{answer['signal_id']}", headers=headers())
    assert found.status_code == 200, found.text
    received = found.json()["events"][0]
    assert received["type"] == "signal.received"
    assert received["data"]["body"] == body


async def test_a_pair_of_escapes_is_one_character(client: httpx.AsyncClient) -> None:
    body = '{"ticker": "AAPL", "action": "buy", "comment": "rocket \\ud83d\\ude80"}'
    response = await client.post("/api/signals", content=body, headers=headers(INGEST_TOKEN))
    assert response.status_code == 202, response.text
    found = await client.get(f"/api/signals/{response.json()['signal_id']}", headers=headers())
    assert found.json()["signal"]["normalized"]["comment"] == "rocket \U0001f680"


async def test_a_status_report_with_a_lone_surrogate_is_refused(
        client: httpx.AsyncClient) -> None:
    posted = await client.post("/api/signals", json={"ticker": "AAPL", "action": "buy"},
                               headers=headers(INGEST_TOKEN))
    signal_id = posted.json()["signal_id"]
    response = await client.post(
        f"/api/signals/{signal_id}/status", headers=headers(),
        content='{"status": "failed", "detail": {"error": "x@"}}'.replace("@", LONE))
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request"
    assert "lone surrogate" in response.json()["message"]
    found = await client.get(f"/api/signals/{signal_id}", headers=headers())
    assert found.json()["status"] == "accepted"


async def test_a_websocket_frame_with_a_lone_surrogate_is_refused(
        server: ServerProcess) -> None:
    async with websockets.connect(server.ws_url) as conn:
        await conn.send('{"op": "hello", "token": "@", "consumer": "bot#"}'
                        .replace("@", INGEST_TOKEN).replace("#", LONE))
        frame = await next_frame(conn)
        assert frame["op"] == "error", frame
        assert "lone surrogate" in frame["message"]


async def test_text_recorded_before_surrogates_were_refused_is_still_answered(
        database_url: str) -> None:
    """A log written by an earlier version may hold such text: reading it answers with an
    ASCII escape instead of failing."""
    await migrate.upgrade_async(database_url)
    log = await EventLog.open(database_url)
    try:
        parsed = parse_api_signal({"ticker": "AAPL", "action": "buy"}, now=utc_now())
        assert parsed.signal is not None
        old = parsed.signal.model_copy(update={"strategy": "trend \ud800"})
        outcome = await Ingestor(log).submit(Submission(
            source="api", raw="{}", parsed=dataclasses.replace(parsed, signal=old),
            token_name="old", remote_addr=None, content_type="application/json"))
    finally:
        await log.close()
    server = ServerProcess(database_url).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            found = await client.get(f"/api/signals/{outcome.signal_id}", headers=headers())
            listed = await client.get("/api/signals", headers=headers())
    finally:
        server.stop()
    assert found.status_code == 200, found.text
    normalized: dict[str, Any] = found.json()["signal"]["normalized"]
    assert normalized["strategy"] == "trend \ud800"
    assert listed.status_code == 200, listed.text


async def test_a_failure_whose_error_holds_a_nul_is_recorded(
        client: httpx.AsyncClient) -> None:
    """NUL is a character JSON allows and PostgreSQL's text does not: the event keeps the
    error as sent, its column the rest of it (it once failed every signal of the commit)."""
    posted = await client.post("/api/signals", json={"ticker": "AAPL", "action": "buy"},
                               headers=headers(INGEST_TOKEN))
    signal_id = posted.json()["signal_id"]
    for status, detail in (("processing", {}), ("failed", {"error": "broker\u0000 down"})):
        response = await client.post(f"/api/signals/{signal_id}/status", headers=headers(),
                                     json={"status": status, "consumer": "bot",
                                           "detail": detail})
        assert response.status_code == 200, response.text
    found = (await client.get(f"/api/signals/{signal_id}", headers=headers())).json()
    assert found["signal"]["last_error"] == "broker down"
    assert found["events"][-1]["data"]["detail"] == {"error": "broker\u0000 down"}
