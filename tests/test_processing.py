"""Status reports, claims, the signals projection, durable consumers and consumer groups."""

from __future__ import annotations

import asyncio
import json
import uuid
import zlib
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from pipeline import migrate
from pipeline.errors import IllegalTransition
from pipeline.ingest import Ingestor, Submission
from pipeline.log import Event, EventLog, utc_now
from pipeline.log.model import canonical_json
from pipeline.log.schema import signals
from pipeline.processing.projection import Status, fold
from pipeline.processing.status import StatusReport, report_status
from pipeline.signals import parse_api_signal
from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    ServerProcess,
    headers,
    next_frame,
    read_all_events,
    repo_root,
    ws_connect,
)

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}


def frame(op: str, **fields: Any) -> str:
    return json.dumps({"op": op, **fields})


async def new_signal(client: httpx.AsyncClient, **fields: Any) -> str:
    response = await client.post("/api/signals", json={**BTC, **fields},
                                 headers=headers(INGEST_TOKEN))
    assert response.status_code in (202, 422), response.text
    signal_id: str = response.json()["signal_id"]
    return signal_id


async def report(client: httpx.AsyncClient, signal_id: str, status: str,
                 token: str = ADMIN_TOKEN, **body: Any) -> httpx.Response:
    return await client.post(f"/api/signals/{signal_id}/status",
                             json={"status": status, **body}, headers=headers(token))


async def test_processing_then_processed_lands_in_the_log_and_the_projection(
        shared_client: httpx.AsyncClient) -> None:
    signal_id = await new_signal(shared_client)
    claimed = await report(shared_client, signal_id, "processing", consumer="bot-1")
    assert claimed.status_code == 200, claimed.text
    done = await report(shared_client, signal_id, "processed", consumer="bot-1",
                        detail={"order": "X-1"})
    assert done.status_code == 200
    assert done.json()["position"] > claimed.json()["position"]
    timeline = (await shared_client.get(f"/api/signals/{signal_id}", headers=headers())).json()
    assert timeline["status"] == "processed"
    assert [e["type"] for e in timeline["events"]] == [
        "signal.received", "signal.accepted", "signal.processing", "signal.processed"]
    assert timeline["events"][-1]["data"]["detail"] == {"order": "X-1"}
    assert timeline["events"][-1]["data"]["consumer"] == "bot-1"
    summary = timeline["signal"]
    assert summary["claimed_by"] == "bot-1" and summary["attempts"] == 1
    assert set(summary["steps"]) == {"processing", "processed"}


async def test_failed_records_the_error(shared_client: httpx.AsyncClient) -> None:
    signal_id = await new_signal(shared_client)
    await report(shared_client, signal_id, "processing")
    failed = await report(shared_client, signal_id, "failed",
                          detail={"error": "insufficient margin"})
    assert failed.status_code == 200
    summary = (await shared_client.get(f"/api/signals/{signal_id}", headers=headers())).json()
    assert summary["signal"]["last_error"] == "insufficient margin"


async def test_an_error_that_is_no_string_is_recorded_as_the_browser_writes_it(
        shared_client: httpx.AsyncClient) -> None:
    """As JSON, keys in the log's order, not as Python's repr (web/src/client/signals.ts)."""
    signal_id = await new_signal(shared_client)
    await report(shared_client, signal_id, "failed",
                 detail={"error": {"where": "broker", "code": 7, "retry": True}})
    summary = (await shared_client.get(f"/api/signals/{signal_id}", headers=headers())).json()
    assert summary["signal"]["last_error"] == '{"code":7,"retry":true,"where":"broker"}'


FOLD_CASES = json.loads(
    (repo_root() / "web" / "test" / "fold-cases.json").read_text(encoding="utf-8"))["cases"]
RECEIVED = {"type": "signal.received", "data": {"signal_id": "s", "source": "api"},
            "meta": {"ticker": "AAPL", "strategy": "trend"}}


@pytest.mark.parametrize("case", FOLD_CASES, ids=[c["name"] for c in FOLD_CASES])
def test_the_projection_folds_as_the_browser_does(case: dict[str, Any]) -> None:
    """The cases web/test/signals.test.ts folds with the browser's SignalTable: the same rows.
    Each event is read back from its canonical encoding, as from the log."""
    steps = case["events"]
    if steps[0]["type"] != "signal.received":
        steps = [RECEIVED, *steps]
    row = None
    for position, step in enumerate(steps, 1):
        event = Event(position, f"e{position}", "signal-s", step["type"],
                      canonical_json(step["data"]), canonical_json(step.get("meta", {})),
                      f"2026-01-01T00:00:0{position}.000000Z", "")
        row = fold(row, event)
    assert row is not None
    assert {name: row[name] for name in case["row"]} == case["row"]


@pytest.mark.parametrize(("history", "then", "code"), [
    ([], "processing", 200),
    (["processing"], "processing", 409),
    (["processed"], "processed", 409),
    (["processing", "processed"], "failed", 409),
    (["failed"], "processing", 409),
    (["dispatched", "dispatched"], "processing", 200),
    (["expired"], "processed", 409),
])
async def test_transition_rules(shared_client: httpx.AsyncClient, history: list[str], then: str,
                                code: int) -> None:
    signal_id = await new_signal(shared_client)
    for status in history:
        assert (await report(shared_client, signal_id, status)).status_code == 200
    response = await report(shared_client, signal_id, then)
    assert response.status_code == code, response.text
    if code == 409:
        assert response.json()["error"] == "illegal_transition"


async def test_nothing_follows_a_rejection(shared_client: httpx.AsyncClient) -> None:
    signal_id = await new_signal(shared_client, action="teleport")
    response = await report(shared_client, signal_id, "processing")
    assert response.status_code == 409 and response.json()["error"] == "illegal_transition"


async def test_only_the_claimer_reports_the_outcome(shared_client: httpx.AsyncClient) -> None:
    signal_id = await new_signal(shared_client)
    await report(shared_client, signal_id, "processing", consumer="bot-1")
    stolen = await report(shared_client, signal_id, "processed", consumer="bot-2")
    assert stolen.status_code == 409 and "bot-1" in stolen.json()["message"]


async def test_an_outcome_naming_no_consumer_cannot_finish_a_named_claim(
        shared_server: ServerProcess, shared_client: httpx.AsyncClient) -> None:
    signal_id = await new_signal(shared_client)
    await report(shared_client, signal_id, "processing", consumer="bot-1")
    for status in ("processed", "failed", "expired"):
        anonymous = await report(shared_client, signal_id, status, detail={"error": "not mine"})
        assert anonymous.status_code == 409, anonymous.text
        assert anonymous.json()["error"] == "illegal_transition"
        assert '"consumer": "bot-1"' in anonymous.json()["message"]
    timeline = (await shared_client.get(f"/api/signals/{signal_id}", headers=headers())).json()
    assert timeline["status"] == "processing" and timeline["signal"]["claimed_by"] == "bot-1"
    conn = await ws_connect(shared_server, cursor=None)  # a connection without a consumer
    try:
        await next_frame(conn)
        await next_frame(conn)  # live
        await conn.send(frame("status", ref=1, signal_id=signal_id, status="failed"))
        refused = await next_frame(conn)
        assert refused["op"] == "status_error" and refused["error"] == "illegal_transition"
        assert '"consumer": "bot-1"' in refused["message"]
        await conn.send(frame("status", ref=2, signal_id=signal_id, status="processed",
                              consumer="bot-1"))
        answers = [await next_frame(conn) for _ in range(2)]  # the answer, and the event
        assert any(a["op"] == "status_ok" and a["ref"] == 2 for a in answers), answers
    finally:
        await conn.close()


async def test_status_errors_use_the_contract_codes(shared_client: httpx.AsyncClient) -> None:
    signal_id = await new_signal(shared_client)
    unknown = await report(shared_client, "no-such-signal", "processing")
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    wrong_scope = await report(shared_client, signal_id, "processing", token=INGEST_TOKEN)
    assert wrong_scope.status_code == 403 and wrong_scope.json()["error"] == "forbidden"
    bad = await report(shared_client, signal_id, "done")
    assert bad.status_code == 400 and bad.json()["error"] == "bad_request"
    bad_detail = await report(shared_client, signal_id, "processing", detail=[1])
    assert bad_detail.status_code == 400
    for constant in ("NaN", "Infinity", "-Infinity"):  # Python's JSON extensions, not JSON
        not_json = await shared_client.post(
            f"/api/signals/{signal_id}/status", headers=headers(ADMIN_TOKEN),
            content=f'{{"status": "processing", "detail": {{"score": {constant}}}}}')
        assert not_json.status_code == 400 and not_json.json()["error"] == "bad_request"
    no_token = await shared_client.post(f"/api/signals/{signal_id}/status",
                                        json={"status": "processing"})
    assert no_token.status_code == 401


async def test_racing_claims_only_one_wins(shared_client: httpx.AsyncClient) -> None:
    signal_id = await new_signal(shared_client)
    # No consumer names: only the status check (which must see the claims that earlier units
    # of the same group commit made) can refuse the later claims.
    responses = await asyncio.gather(*(
        report(shared_client, signal_id, "processing") for _ in range(20)))
    assert sorted(r.status_code for r in responses) == [200] + [409] * 19
    events = await read_all_events(shared_client, type="signal.processing",
                                   stream=f"signal-{signal_id}")
    assert len(events) == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_claim_older_than_the_lease_is_listed_as_stuck(database_url: str) -> None:
    server = ServerProcess(database_url, args=["--claim-lease", "0.2"]).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            stuck_id = await new_signal(client)
            done_id = await new_signal(client)
            await report(client, stuck_id, "processing")
            await report(client, done_id, "processing")
            await report(client, done_id, "processed")
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                listing = (await client.get("/api/signals", params={"stuck": "true"},
                                            headers=headers())).json()["signals"]
                if listing or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert [s["signal_id"] for s in listing] == [stuck_id]
            metrics = (await client.get("/metrics")).text
            assert "signalbox_signals_stuck 1.0" in metrics
            assert 'signalbox_signals{status="processed"} 1.0' in metrics
    finally:
        server.stop()


async def test_status_over_the_websocket_is_answered_without_closing(
        shared_server: ServerProcess, shared_client: httpx.AsyncClient) -> None:
    signal_id = await new_signal(shared_client)
    conn = await ws_connect(shared_server, cursor=None, consumer="ws-bot")
    try:
        await next_frame(conn)
        await next_frame(conn)  # live
        await conn.send(frame("status", ref=1, signal_id=signal_id, status="processing"))
        frames = [await next_frame(conn) for _ in range(2)]
        ok = next(f for f in frames if f["op"] == "status_ok")
        assert ok["ref"] == 1 and ok["status"] == "processing"
        event = next(f for f in frames if f["op"] == "event")
        assert event["type"] == "signal.processing"
        assert event["data"]["consumer"] == "ws-bot"  # the connection's consumer
        await conn.send(frame("status", ref=2, signal_id=signal_id, status="processing"))
        refused = await next_frame(conn)
        assert refused == {"op": "status_error", "ref": 2, "signal_id": signal_id,
                           "error": "illegal_transition", "message": refused["message"]}
        await conn.send('{"op": "pong"}')  # still open
        await conn.send(frame("status", ref=3, signal_id=signal_id, status="processed"))
        frames = [await next_frame(conn) for _ in range(2)]
        assert any(f["op"] == "status_ok" and f["ref"] == 3 for f in frames)
    finally:
        await conn.close()


async def test_durable_consumer_resumes_after_its_ack(shared_server: ServerProcess,
                                                     shared_client: httpx.AsyncClient) -> None:
    name = f"bot-{uuid.uuid4().hex[:8]}"  # a consumer of this test alone: the log is shared
    start = (await shared_client.get("/readyz")).json()["head"]
    await new_signal(shared_client)  # before the consumer first connects: it starts live
    conn = await ws_connect(shared_server, cursor=None, consumer=name)
    welcome = await next_frame(conn)
    assert welcome["cursor"] == welcome["head"] == start + 2
    await next_frame(conn)  # live
    await new_signal(shared_client)
    first = await next_frame(conn)
    await conn.send(frame("ack", position=first["position"]))
    await next_frame(conn)  # the accepted event, not acknowledged
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # the ack is stored asynchronously of this client: poll with a deadline
        consumers = (await shared_client.get("/api/consumers", headers=headers())).json()
        stored = {c["name"]: c for c in consumers["consumers"]}
        if name in stored or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.02)
    await conn.close()
    assert stored[name]["position"] == first["position"] == start + 3
    assert stored[name]["lag"] == consumers["head"] - (start + 3)
    await new_signal(shared_client)
    again = await ws_connect(shared_server, cursor=None, consumer=name)
    assert (await next_frame(again))["cursor"] == start + 3
    replayed = [await next_frame(again) for _ in range(3)]
    assert [f["position"] for f in replayed] == [start + 4, start + 5, start + 6]
    await again.close()


async def test_ack_without_a_consumer_is_refused(shared_server: ServerProcess) -> None:
    conn = await ws_connect(shared_server, cursor=None)
    await next_frame(conn)
    await next_frame(conn)
    await conn.send('{"op": "ack", "position": 0}')
    error = await next_frame(conn)
    assert error["op"] == "error" and error["code"] == 4400


async def test_consumer_group_members_split_the_signals_by_ticker(
        shared_server: ServerProcess, shared_client: httpx.AsyncClient) -> None:
    group = f"bots-{uuid.uuid4().hex[:8]}"  # a group of this test alone: the log is shared
    start = (await shared_client.get("/readyz")).json()["head"]
    tickers = [f"T{i}" for i in range(12)]
    members = []
    for member in range(3):
        conn = await ws_connect(shared_server, cursor=start,
                                filter={"types": ["signal.accepted"]},
                                group={"name": group, "member": member, "size": 3})
        await next_frame(conn)
        await next_frame(conn)
        members.append(conn)
    for ticker in tickers * 2:
        await new_signal(shared_client, ticker=ticker)
    received: list[list[str]] = [[], [], []]
    for member, conn in enumerate(members):
        expected = [t for t in tickers * 2 if zlib.crc32(t.encode()) % 3 == member]
        while len(received[member]) < len(expected):
            last = await next_frame(conn)
            if last["op"] == "event":
                received[member].append(last["meta"]["ticker"])
        assert received[member] == expected
        await conn.send(frame("ack", position=last["position"]))
    assert sorted(t for member_tickers in received for t in member_tickers) == sorted(
        tickers * 2)
    # A member that restarts resumes from its own ack.
    await members[0].close()
    head = (await shared_client.get("/readyz")).json()["head"]
    names = {f"{group}/{member}" for member in range(3)}
    deadline = asyncio.get_running_loop().time() + 10
    while asyncio.get_running_loop().time() < deadline:
        consumers = (await shared_client.get("/api/consumers", headers=headers())).json()
        stored = {c["name"]: c["position"] for c in consumers["consumers"]
                  if c["name"].startswith(f"{group}/")}
        if len(stored) == 3:
            break
        await asyncio.sleep(0.02)
    assert set(stored) == names
    rejoined = await ws_connect(shared_server, cursor=None, filter={"types": ["signal.accepted"]},
                                group={"name": group, "member": 0, "size": 3})
    welcome = await next_frame(rejoined)
    assert welcome["cursor"] == stored[f"{group}/0"] <= head
    for conn in (rejoined, *members[1:]):
        await conn.close()


async def test_projection_is_the_fold_of_the_log(database_url: str,
                                                 server: ServerProcess,
                                                 client: httpx.AsyncClient) -> None:
    ids = [await new_signal(client, ticker=f"R{i}") for i in range(6)]
    await new_signal(client, action="teleport")
    await client.post("/api/signals", json=BTC,
                      headers=headers(INGEST_TOKEN, **{"Idempotency-Key": "k"}))
    await client.post("/api/signals", json=BTC,
                      headers=headers(INGEST_TOKEN, **{"Idempotency-Key": "k"}))
    await report(client, ids[0], "processing", consumer="a")
    await report(client, ids[0], "processed", consumer="a")
    await report(client, ids[1], "dispatched")
    await report(client, ids[2], "processing")
    await report(client, ids[2], "failed", detail={"error": "boom"})
    await report(client, ids[3], "expired")
    events = await read_all_events(client)
    log = await EventLog.open(database_url)
    try:
        rebuilt: dict[str, dict[str, Any]] = {}
        for event in await log.read(0, 10_000):
            signal_id = event.data["signal_id"]
            rebuilt[signal_id] = fold(rebuilt.get(signal_id), event)
        async with log.engines.reader.connect() as conn:
            live = {r.signal_id: dict(r._mapping)
                    for r in (await conn.execute(select(signals))).all()}
    finally:
        await log.close()
    assert len(live) == len({e["data"]["signal_id"] for e in events}) == 8
    assert live == rebuilt


async def test_claims_racing_inside_one_group_commit_only_one_wins(database_url: str) -> None:
    """Claims queued together share one transaction: the later ones must see the first."""
    await migrate.upgrade_async(database_url)
    log = await EventLog.open(database_url)
    try:
        parsed = parse_api_signal(BTC, now=utc_now())
        outcome = await Ingestor(log).submit(Submission("api", "{}", parsed, "t", None, None))
        claims = [report_status(log, StatusReport(outcome.signal_id, Status.PROCESSING, {},
                                                  None)) for _ in range(20)]
        results = await asyncio.gather(*claims, return_exceptions=True)
        assert sum(not isinstance(r, BaseException) for r in results) == 1
        assert all(isinstance(r, IllegalTransition) for r in results
                   if isinstance(r, BaseException))
    finally:
        await log.close()
