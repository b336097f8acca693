"""Re-normalization: recorded bodies read again with today's parsers, on both backends.

The log holds signals recorded by a real server (today's parsers: nothing may be reported for
them) and signals recorded as an older parser read them: their recorded verdict is the reading
of another body. Exactly those must be reported, each with what changed, and ``--apply``
records each change once as a ``signal.renormalized`` event, leaving the old events as they are.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from pipeline import migrate
from pipeline.ingest import Ingestor, Submission
from pipeline.log import EventLog
from pipeline.signals import parse_tradingview
from replay.audit import DatabaseSource, Head, ServerSource, verify
from replay.renormalize import Applier, Summary, changes
from tests.support import ADMIN_TOKEN, INGEST_TOKEN, ServerProcess, headers
from tests.test_signals import EMBEDDED_ALERTS

NOW = datetime(2025, 3, 5, 12, 0, tzinfo=UTC)
API_BODIES = [
    '{"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}',
    '{"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01", "colour": "red"}',  # rejected
]

# (what the body says, what an older parser made of it, the change expected today)
FORGED = {
    "values": ('{"ticker":"BTCUSDT","action":"buy","quantity":"0.5"}',
               '{"ticker":"BTCUSDT","action":"buy","quantity":"0.25"}'),
    "accepted->rejected": ("BTC looks bullish today",
                           '{"ticker":"BTCUSDT","action":"buy"}'),
    "rejected->accepted": ('{"ticker":"ETHUSDT","action":"sell","price":"3000"}',
                           "nothing to see here"),
    "errors": ('{"ticker":"SOLUSDT"}', '{"action":"buy"}'),
    "unchanged": ('{"ticker":"ADAUSDT","action":"buy"}', '{"ticker":"ADAUSDT","action":"buy"}'),
}


async def record_genuine(server: ServerProcess) -> list[str]:
    ids = []
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        for body in EMBEDDED_ALERTS.values():
            response = await client.post(f"/webhooks/tradingview/{INGEST_TOKEN}", content=body)
            ids.append(response.json()["signal_id"])
        response = await client.post("/webhooks/tradingview", json={
            "passphrase": INGEST_TOKEN, "ticker": "XAUUSD", "action": "buy"})
        assert response.status_code == 202, response.text
        ids.append(response.json()["signal_id"])
        for body in API_BODIES:
            response = await client.post("/api/signals", content=body, headers=headers())
            assert response.status_code in (202, 422), response.text
            ids.append(response.json()["signal_id"])
    return ids


async def record_forged(url: str) -> dict[str, str]:
    """Signals as an older parser recorded them: signal id -> the change expected today."""
    await migrate.upgrade_async(url)
    log = await EventLog.open(url)
    try:
        ingestor = Ingestor(log)
        forged = {}
        for kind, (body, read_as) in FORGED.items():
            outcome = await ingestor.submit(Submission(
                source="webhook", raw=body, parsed=parse_tradingview(read_as, now=NOW),
                token_name="webhook", remote_addr="127.0.0.1", content_type="text/plain"))
            forged[outcome.signal_id] = kind
        return forged
    finally:
        await log.close()


async def found_changes(source: DatabaseSource | ServerSource) -> tuple[dict[str, Any], Summary]:
    summary = Summary()
    found = {c.signal_id: c async for c in changes(source.after(0), summary,
                                                     default_max_lag=None)}
    return found, summary


async def test_renormalize_reports_exactly_the_changed_signals_and_apply_records_them(
        database_url: str) -> None:
    server = ServerProcess(database_url).start()
    try:
        genuine = await record_genuine(server)
    finally:
        server.stop()
    forged = await record_forged(database_url)

    source = DatabaseSource(database_url)
    try:
        found, summary = await found_changes(source)
    finally:
        await source.close()
    expected = {sid: kind for sid, kind in forged.items() if kind != "unchanged"}
    assert summary.read == len(genuine) + len(forged)
    assert {sid: c.kind for sid, c in found.items()} == {
        sid: "values" if kind == "errors" else kind for sid, kind in expected.items()}
    by_kind = {kind: found[sid] for sid, kind in expected.items()}
    assert by_kind["values"].fields == [{"field": "quantity", "recorded": "0.25", "now": "0.5"}]
    assert by_kind["accepted->rejected"].now.reasons() == {("unparseable", None)}
    assert by_kind["rejected->accepted"].now.signal is not None
    assert by_kind["rejected->accepted"].now.signal["ticker"] == "ETHUSDT"
    assert by_kind["errors"].fields == [{"field": "errors",
                                         "recorded": ["missing_field: ticker"],
                                         "now": ["missing_field: action"]}]

    server = ServerProcess(database_url).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            before = {sid: (await client.get(f"/api/signals/{sid}", headers=headers())).json()
                      for sid in expected}
            answers: dict[str, int] = {}
            for attempt in range(2):  # a second run records nothing new
                applier = Applier(server.base_url, ADMIN_TOKEN)
                applied = Summary()
                try:
                    for change in found.values():
                        answer = await applier.apply(change, applied)
                        answers[change.signal_id] = answer["position"]
                        assert answer["received_position"] == change.position
                finally:
                    await applier.close()
                assert (applied.appended, applied.already) == (
                    (len(expected), 0) if attempt == 0 else (0, len(expected)))
            page = (await client.get("/api/events", headers=headers(), params={
                "type": "signal.renormalized", "limit": 100})).json()
            recorded = {e["data"]["signal_id"]: e for e in page["events"]}
            assert set(recorded) == set(expected)
            assert answers == {sid: e["position"] for sid, e in recorded.items()}
            values = recorded[next(s for s, k in expected.items() if k == "values")]
            assert values["data"]["now"]["signal"]["quantity"] == "0.5"
            assert values["data"]["recorded"]["signal"]["quantity"] == "0.25"
            for sid, old in before.items():
                now = (await client.get(f"/api/signals/{sid}", headers=headers())).json()
                assert now["status"] == old["status"]  # a reading, not a status
                assert now["events"][:len(old["events"])] == old["events"]
                assert now["events"][-1]["type"] == "signal.renormalized"
        # The log still verifies, and the changes found through the server are the same.
        server_source = ServerSource(server.base_url, ADMIN_TOKEN)
        try:
            assert (await verify(server_source, Head(0, "0" * 64))).ok
        finally:
            await server_source.close()
    finally:
        server.stop()


async def test_renormalize_route_answers_and_refuses(database_url: str) -> None:
    server = ServerProcess(database_url).start()
    try:
        genuine = await record_genuine(server)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            response = await client.post(f"/api/signals/{genuine[0]}/renormalize",
                                         headers=headers())
            assert response.status_code == 200
            assert response.json() == {"signal_id": genuine[0], "changed": False,
                                       "appended": False, "position": None}
            response = await client.post("/api/signals/nope/renormalize", headers=headers())
            assert response.status_code == 404
            assert response.json()["error"] == "not_found"
            response = await client.post(f"/api/signals/{genuine[0]}/renormalize",
                                         headers=headers(INGEST_TOKEN))
            assert response.status_code == 403
            response = await client.post(f"/api/signals/{genuine[0]}/renormalize")
            assert response.status_code == 401
    finally:
        server.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_renormalize_selection_keeps_only_the_chosen_received_events(
        database_url: str) -> None:
    forged = await record_forged(database_url)
    chosen = next(sid for sid, kind in forged.items() if kind == "values")
    source = DatabaseSource(database_url)
    try:
        summary = Summary()
        found = [c async for c in changes(source.after(0), summary, default_max_lag=None,
                                          keep=lambda e: e.data["signal_id"] == chosen)]
    finally:
        await source.close()
    assert [c.signal_id for c in found] == [chosen]
    assert summary.read == 1
