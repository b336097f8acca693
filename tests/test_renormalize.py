"""Re-normalization: recorded bodies read again with today's parsers, on both backends.

The log holds signals recorded by a real server (today's parsers: nothing may be reported for
them) and signals recorded as an older parser read them: their recorded verdict is the reading
of another body. Exactly those must be reported, each with what changed, and ``--apply``
records each change once as a ``signal.renormalized`` event, leaving the old events as they are.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline import migrate
from pipeline.ingest import Ingestor, Submission
from pipeline.log import EventFilter, EventLog, NewEvent
from pipeline.processing.reparse import record_renormalized
from pipeline.signals import parse_tradingview
from replay.audit import Head, ServerSource, verify
from tests.support import ADMIN_TOKEN, INGEST_TOKEN, ServerProcess, headers
from tests.test_cli import create_token
from tests.test_client import hold_write_lock
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


async def renormalize(*args: str, token: str | None = None) -> tuple[int, str, str]:
    env = {**os.environ, "SIGNALBOX_TOKEN": token} if token else None
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "replay", "--renormalize", "--quiet", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def renormalized(server: ServerProcess) -> list[str]:
    """The signals of the log's signal.renormalized events, oldest first."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        page = (await client.get("/api/events", headers=headers(), params={
            "type": "signal.renormalized", "limit": 100})).json()
    return [e["data"]["signal_id"] for e in page["events"]]


def read_report(path: Path) -> dict[str, dict[str, Any]]:
    return {line["signal_id"]: line for line in map(json.loads, path.read_text().splitlines())}


async def test_renormalize_reports_exactly_the_changed_signals_and_apply_records_them(
        database_url: str, tmp_path: Path) -> None:
    server = ServerProcess(database_url).start()
    try:
        genuine = await record_genuine(server)
    finally:
        server.stop()
    forged = await record_forged(database_url)

    report = tmp_path / "changes.jsonl"
    code, out, err = await renormalize("--database-url", database_url, "--report", str(report))
    assert code == 0, err
    found = read_report(report)
    expected = {sid: kind for sid, kind in forged.items() if kind != "unchanged"}
    assert {sid: c["kind"] for sid, c in found.items()} == {
        sid: "values" if kind == "errors" else kind for sid, kind in expected.items()}
    by_kind = {kind: found[sid] for sid, kind in expected.items()}
    assert by_kind["values"]["fields"] == [{"field": "quantity", "recorded": "0.25",
                                            "now": "0.5"}]
    assert [e["code"] for e in by_kind["accepted->rejected"]["now"]["errors"]] == ["unparseable"]
    assert by_kind["rejected->accepted"]["now"]["signal"]["ticker"] == "ETHUSDT"
    assert by_kind["errors"]["fields"] == [{"field": "errors",
                                            "recorded": ["missing_field: ticker"],
                                            "now": ["missing_field: action"]}]
    total = len(genuine) + len(forged)
    assert f"re-read {total} signals: {len(expected)} read differently today" in out
    for signal_id in expected:
        assert f"signal {signal_id}" in out

    server = ServerProcess(database_url).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            before = {sid: (await client.get(f"/api/signals/{sid}", headers=headers())).json()
                      for sid in expected}
            applied = tmp_path / "applied.jsonl"
            code, out, err = await renormalize("--url", server.base_url, "--apply", "--report",
                                               str(applied), token=ADMIN_TOKEN)
            assert code == 0, err
            assert f"appended {len(expected)} signal.renormalized events (0 recorded before)" \
                in out
            code, again, err = await renormalize("--url", server.base_url, "--apply",
                                                 token=ADMIN_TOKEN)
            assert code == 0, err
            assert f"appended 0 signal.renormalized events ({len(expected)} recorded before)" \
                in again
            page = (await client.get("/api/events", headers=headers(), params={
                "type": "signal.renormalized", "limit": 100})).json()
            recorded = {e["data"]["signal_id"]: e for e in page["events"]}
            assert set(recorded) == set(expected)
            assert {sid: line["renormalized_position"] for sid, line
                    in read_report(applied).items()} == {
                sid: e["position"] for sid, e in recorded.items()}
            values = recorded[next(s for s, k in expected.items() if k == "values")]
            assert values["data"]["now"]["signal"]["quantity"] == "0.5"
            assert values["data"]["recorded"]["signal"]["quantity"] == "0.25"
            for sid, old in before.items():
                now = (await client.get(f"/api/signals/{sid}", headers=headers())).json()
                assert now["status"] == old["status"]  # a reading, not a status
                assert now["events"][:len(old["events"])] == old["events"]
                assert now["events"][-1]["type"] == "signal.renormalized"
            # Without the admin scope nothing is recorded, and the run says why.
            code, out, err = await renormalize("--url", server.base_url, "--apply",
                                               token=INGEST_TOKEN)
            assert code == 1
            assert "HTTP 403" in err
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
async def test_renormalize_reads_only_the_selection_and_refuses_bad_usage(
        database_url: str) -> None:
    forged = await record_forged(database_url)
    first_forged = 1  # the log holds only the forged signals: two events each
    values = next(sid for sid, kind in forged.items() if kind == "values")
    code, out, err = await renormalize("--database-url", database_url,
                                       "--to-position", str(first_forged + 1))
    assert code == 0, err
    assert out.splitlines()[-1] == "re-read 1 signals: 1 read differently today (values 1)"
    assert f"signal {values}" in out
    code, out, err = await renormalize("--database-url", database_url, "--apply")
    assert code == 2
    assert "--apply goes with --renormalize and --url" in err
    code, out, err = await renormalize("--database-url", database_url, "--type", "signal.*")
    assert code == 2


async def test_a_change_the_server_refused_is_applied_when_the_run_goes_on(
        database_url: str, tmp_path: Path) -> None:
    """A run stopped by a refused --apply says to run again with the same --checkpoint: that
    run records every change, the refused one too, and counts each once."""
    forged = await record_forged(database_url)
    expected = {sid for sid, kind in forged.items() if kind != "unchanged"}
    reader = create_token(database_url, "reader", "--scope", "read")
    checkpoint, report = tmp_path / "cp.json", tmp_path / "changes.jsonl"
    server = ServerProcess(database_url).start()
    try:
        flags = ("--url", server.base_url, "--apply", "--checkpoint", str(checkpoint),
                 "--report", str(report))
        code, out, err = await renormalize(*flags, token=reader)  # read, not admin
        assert code == 1
        assert "HTTP 403" in err
        code, out, err = await renormalize(*flags, token=ADMIN_TOKEN)
        assert code == 0, err
        assert (f"re-read {len(forged)} signals: {len(expected)} read differently today"
                in out)
        assert f"appended {len(expected)} signal.renormalized events (0 recorded before)" in out
        assert sorted(read_report(report)) == sorted(expected)
        assert len(report.read_text().splitlines()) == len(expected)
        assert sorted(await renormalized(server)) == sorted(expected)
    finally:
        server.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_apply_waits_out_a_log_that_cannot_commit_for_a_while(
        database_url: str, tmp_path: Path) -> None:
    """A server that answers 503 (its log could not commit: here another process holds
    SQLite's write lock) is asked again as it says (`Retry-After`), as the client library
    does, instead of stopping the run at the first change: it records every change once the
    lock is gone."""
    forged = await record_forged(database_url)
    expected = {sid for sid, kind in forged.items() if kind != "unchanged"}
    server = ServerProcess(database_url, env={"SIGNALBOX_COMMIT_TIMEOUT": "0.3"}).start()
    lock = hold_write_lock(database_url)
    try:
        run = asyncio.create_task(renormalize("--url", server.base_url, "--apply",
                                              token=ADMIN_TOKEN))
        # The lock goes once a commit of the run's failed for it, and not before.
        while not any("group commit of" in line for line in server.output):
            assert not run.done(), await run
            await asyncio.sleep(0.05)
        lock.execute("ROLLBACK")
        code, out, err = await asyncio.wait_for(run, 60)
        assert code == 0, err
        # A change whose commit outlasted its 503 may be found recorded when asked again:
        # either way, each is recorded once.
        assert "signal.renormalized events" in out
        assert sorted(await renormalized(server)) == sorted(expected)
    finally:
        lock.close()
        server.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_change_asked_twice_in_one_group_commit_is_recorded_once(
        database_url: str) -> None:
    """Two asks for one change can share a group commit (two runs at once, or a retry beside
    an attempt whose client hung up, which keeps its place): the second finds the first's
    event, which the database does not show yet, and appends nothing."""
    forged = await record_forged(database_url)
    changed = next(sid for sid, kind in forged.items() if kind != "unchanged")
    log = await EventLog.open(database_url)
    lock = hold_write_lock(database_url)
    try:
        # A first group commit that waits for the lock; both asks queue behind it.
        blocked = asyncio.create_task(log.append([NewEvent("s", "test.blocked", {})]))
        asks = [asyncio.create_task(record_renormalized(log, changed, default_max_lag=None))
                for _ in range(2)]
        deadline = time.monotonic() + 10
        while len(log._waiting) < 3:
            assert time.monotonic() < deadline, "the asks were never queued"
            await asyncio.sleep(0.01)
        lock.execute("ROLLBACK")
        await blocked
        outcomes = await asyncio.gather(*asks)
        assert sorted(appended for _, appended in outcomes) == [False, True]
        recorded = await log.read(0, 100, EventFilter(types=("signal.renormalized",)))
        assert [e.data["signal_id"] for e in recorded] == [changed]
    finally:
        lock.close()
        await log.close()
