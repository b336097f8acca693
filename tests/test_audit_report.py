"""The audit report: every count and every timing of a log whose events happened at known
moments, the same JSON from the route and from the command (on a database or a server), and
the route's answers to bad parameters and tokens."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from pipeline.log import GENESIS_HASH, Event
from pipeline.log.model import canonical_json, chain_hash, format_time
from pipeline.log.schema import events, log_head, signals
from pipeline.migrate import upgrade_async
from pipeline.processing.projection import Row, fold
from pipeline.processing.report import STUCK_LISTED
from pipeline.processing.window import parse_moment, parse_span
from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    ServerProcess,
    headers,
    repo_root,
    sqlite_only,
)

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
WINDOW = {"since": "2026-11-20", "until": "2026-11-21T00:00:00Z", "stuck_after": "1h"}


class CraftedLog:
    """A log written directly, with a correct hash chain and the projection folded by the
    project's own ``fold``, whose events happened at the moments the test chooses."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.rows: dict[str, Row] = {}
        self.previous = GENESIS_HASH

    def add(self, signal_id: str, type_: str, at: datetime, **data: Any) -> None:
        position = len(self.events) + 1
        stream = f"signal-{signal_id}"
        data_json = canonical_json({"signal_id": signal_id, **data})
        meta_json = canonical_json({"signal_id": signal_id, "ticker": "BTCUSDT"})
        event_id, time = str(uuid.uuid4()), format_time(at)
        digest = chain_hash(self.previous, position, event_id, stream, type_, data_json,
                            meta_json, time)
        event = Event(position, event_id, stream, type_, data_json, meta_json, time, digest)
        self.rows[signal_id] = fold(self.rows.get(signal_id), event)
        self.events.append(event)
        self.previous = digest

    def signal(self, at: datetime, *steps: tuple[str, float], errors: list[str] | None = None,
               consumer: str = "bot") -> str:
        """A signal received at ``at``: accepted (or rejected with ``errors``), then each
        ``(status, seconds after received)``."""
        signal_id = str(uuid.uuid4())
        self.add(signal_id, "signal.received", at, source="api", token="admin", body="{}")
        if errors is not None:
            self.add(signal_id, "signal.rejected", at, errors=[
                {"code": code, "field": "f", "message": "m"} for code in errors])
            return signal_id
        self.add(signal_id, "signal.accepted", at,
                 signal={"ticker": "BTCUSDT", "action": "buy", "quantity": "1"})
        for status, seconds in steps:
            self.add(signal_id, f"signal.{status}", at + timedelta(seconds=seconds),
                     status=status, consumer=consumer, detail={}, attempt=1)
        return signal_id

    def duplicate(self, signal_id: str, at: datetime) -> None:
        self.add(signal_id, "signal.duplicate", at, source="api", token="admin")

    async def write(self, url: str) -> None:
        await upgrade_async(url)
        engine = create_async_engine(url)
        try:
            async with engine.begin() as conn:
                if not self.events:
                    return
                await conn.execute(events.insert(), [
                    {"position": e.position, "id": e.id, "stream": e.stream, "type": e.type,
                     "data": e.data_json, "meta": e.meta_json, "time": e.time, "hash": e.hash,
                     "ticker": e.ticker, "strategy": e.strategy} for e in self.events])
                await conn.execute(signals.insert(), list(self.rows.values()))
                await conn.execute(log_head.update().values(position=len(self.events),
                                                            hash=self.previous))
        finally:
            await engine.dispose()


def known_outcomes() -> tuple[CraftedLog, dict[str, str]]:
    log = CraftedLog()
    ids: dict[str, str] = {}
    for k in range(1, 21):  # processed after k seconds, claimed after k/2; five dispatched first
        steps = [("processing", k / 2), ("processed", k)]
        if k <= 5:
            steps.insert(0, ("dispatched", 0.25))
        ids[f"processed-{k}"] = log.signal(T0 + timedelta(minutes=k), *steps)
    log.signal(T0 + timedelta(hours=1), errors=["unknown_action"])
    log.signal(T0 + timedelta(hours=1, seconds=1), errors=["unknown_action"])
    log.signal(T0 + timedelta(hours=1, seconds=2), errors=["invalid_value", "placeholder"])
    log.signal(T0 + timedelta(hours=2), ("processing", 1), ("failed", 30))
    log.signal(T0 + timedelta(hours=2, minutes=1), ("processing", 1), ("failed", 90))
    log.signal(T0 + timedelta(hours=3), ("expired", 3))
    ids["claimed"] = log.signal(T0 + timedelta(hours=5), ("processing", 2), consumer="bot-7")
    ids["waiting"] = log.signal(T0 + timedelta(hours=6))
    log.duplicate(ids["processed-1"], T0 + timedelta(hours=7))
    log.duplicate(ids["processed-1"], T0 + timedelta(hours=7, seconds=1))
    log.duplicate(ids["processed-2"], T0 + timedelta(hours=7, seconds=2))
    # Outside the window (since included, until excluded): counted nowhere.
    before = log.signal(datetime(2026, 11, 19, 23, 59, 59, 999999, tzinfo=UTC))
    log.duplicate(before, T0)
    log.signal(datetime(2026, 11, 21, tzinfo=UTC), errors=["unknown_action"])
    log.signal(datetime(2026, 11, 21, tzinfo=UTC))
    return log, ids


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "audit", *args],
                          capture_output=True, text=True, timeout=120, cwd=repo_root(),
                          check=False,
                          env={"PATH": "/usr/bin:/bin", "SIGNALBOX_TOKEN": ADMIN_TOKEN})


def report_flags() -> list[str]:
    return ["--since", WINDOW["since"], "--until", WINDOW["until"],
            "--stuck-after", WINDOW["stuck_after"]]


def cli_report(*source: str) -> dict[str, Any]:
    done = audit_cli("report", *source, *report_flags(), "--json")
    assert done.returncode == 0, done.stderr
    value: dict[str, Any] = json.loads(done.stdout)
    return value


def figures(count: int, p50: float | None, p95: float | None, p99: float | None,
            longest: float | None) -> dict[str, Any]:
    return {"count": count, "p50": p50, "p95": p95, "p99": p99, "max": longest}


async def test_the_report_counts_every_outcome_and_times_every_step(database_url: str) -> None:
    log, ids = known_outcomes()
    await log.write(database_url)
    report = cli_report("--database-url", database_url)
    assert (report["since"], report["until"]) == ("2026-11-20T00:00:00.000000Z",
                                                  "2026-11-21T00:00:00.000000Z")
    assert report["signals"] == 28
    assert report["statuses"] == {"received": 0, "accepted": 1, "rejected": 3, "dispatched": 0,
                                  "processing": 1, "processed": 20, "failed": 2, "expired": 1}
    assert report["rejections"] == {"signals": 3, "reasons": {
        "unknown_action": 2, "invalid_value": 1, "placeholder": 1}}
    assert report["duplicates"] == {"events": 3, "signals": 2}
    # Nearest rank: p of n durations is the ceil(p/100 * n)-th smallest.
    assert report["timings"] == {
        "dispatched": figures(5, 0.25, 0.25, 0.25, 0.25),
        "processing": figures(23, 4.5, 9.5, 10.0, 10.0),  # 0.5..10 by halves, 1, 1, 2
        "processed": figures(20, 10.0, 19.0, 20.0, 20.0),
        "failed": figures(2, 30.0, 90.0, 90.0, 90.0),
        "expired": figures(1, 3.0, 3.0, 3.0, 3.0),
    }
    assert report["stuck"] == {"after_seconds": 3600.0, "total": 2, "signals": [
        {"signal_id": ids["claimed"], "status": "processing",
         "since": "2026-11-20T15:00:02.000000Z", "ticker": "BTCUSDT", "claimed_by": "bot-7"},
        {"signal_id": ids["waiting"], "status": "accepted",
         "since": "2026-11-20T16:00:00.000000Z", "ticker": "BTCUSDT", "claimed_by": None},
    ]}
    text = audit_cli("report", "--database-url", database_url, *report_flags())
    assert text.returncode == 0, text.stderr
    assert "signals received from 2026-11-20T00:00:00.000000Z" in text.stdout
    assert "processed 20" in text.stdout and "unknown_action 2" in text.stdout
    assert "3 repeats of 2 signals" in text.stdout
    assert f"{ids['claimed']}  processing since 2026-11-20T15:00:02.000000Z" in text.stdout


async def test_the_route_and_the_command_give_the_same_report(database_url: str) -> None:
    log, _ = known_outcomes()
    await log.write(database_url)
    server = ServerProcess(database_url).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            response = await client.get("/api/audit/report", params=WINDOW, headers=headers())
            assert response.status_code == 200, response.text
            over_http = response.json()
        offline = cli_report("--database-url", database_url)
        remote = cli_report("--url", server.base_url)
    finally:
        server.stop()
    for report in (over_http, offline, remote):
        report.pop("generated_at")
    assert over_http == offline == remote
    assert over_http["signals"] == 28


@pytest.mark.parametrize("params", [
    {"since": "last tuesday"}, {"until": "2026-13-01"}, {"stuck_after": "soon"},
    {"since": "2026-11-21", "until": "2026-11-20"},
    # Out of the range of a time: each was once answered 500.
    {"since": "99999999999d"}, {"since": "3000000d"}, {"stuck_after": "9" * 400},
    {"since": "0001-01-01T00:00:00+01:00"}, {"until": "9999-12-31T23:59:59-01:00"},
    {"until": "0001-01-01"},
], ids=["since", "until", "stuck_after", "empty-window", "span-beyond-timedelta",
        "span-before-year-1", "infinite-span", "before-year-1-in-utc", "after-9999-in-utc",
        "no-room-for-the-default-span"])
async def test_bad_parameters_are_refused_with_the_error_body(
        shared_client: httpx.AsyncClient, params: dict[str, str]) -> None:
    response = await shared_client.get("/api/audit/report", params=params, headers=headers())
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "bad_request" and set(body) == {"error", "message"}
    assert next(iter(params)) in body["message"]


async def test_the_route_needs_a_read_token(shared_client: httpx.AsyncClient) -> None:
    missing = await shared_client.get("/api/audit/report")
    assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
    wrong = await shared_client.get("/api/audit/report", headers=headers(INGEST_TOKEN))
    assert wrong.status_code == 403 and wrong.json()["error"] == "forbidden"
    assert (await shared_client.get("/api/audit/report", headers=headers())).status_code == 200


@sqlite_only("the command refuses the window before it opens the database")
async def test_a_bad_window_fails_the_command_in_one_line(database_url: str) -> None:
    await CraftedLog().write(database_url)
    done = audit_cli("report", "--database-url", database_url, "--since", "whenever")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "since" in done.stderr


async def test_the_stuck_list_is_capped_oldest_first_with_the_total(tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'stuck.db'}"
    log = CraftedLog()
    waiting = [log.signal(T0 + timedelta(seconds=i)) for i in range(STUCK_LISTED + 5)]
    await log.write(url)
    stuck = cli_report("--database-url", url)["stuck"]
    assert stuck["total"] == STUCK_LISTED + 5
    assert [s["signal_id"] for s in stuck["signals"]] == waiting[:STUCK_LISTED]
    text = audit_cli("report", "--database-url", url, *report_flags()).stdout
    assert "… and 5 more" in text


def test_times_and_spans_take_iso_dates_and_relative_forms() -> None:
    now = datetime(2026, 11, 26, 9, 30, tzinfo=UTC)
    assert parse_moment("24h", "since", now) == now - timedelta(days=1)
    assert parse_moment("7d", "since", now) == now - timedelta(days=7)
    assert parse_moment("90m", "since", now) == now - timedelta(minutes=90)
    assert parse_moment("2026-11-20", "since", now) == datetime(2026, 11, 20, tzinfo=UTC)
    assert parse_moment("2026-11-20T08:00:00", "since", now) == datetime(
        2026, 11, 20, 8, tzinfo=UTC)
    assert parse_moment("2026-11-20T08:00:00+01:00", "since", now) == datetime(
        2026, 11, 20, 7, tzinfo=UTC)
    assert parse_moment("2026-11-20T08:00:00Z", "since", now) == datetime(
        2026, 11, 20, 8, tzinfo=UTC)
    assert parse_span("15m", "stuck_after") == timedelta(minutes=15)
    assert parse_span("300", "stuck_after") == timedelta(seconds=300)


async def test_relative_windows_are_taken_back_from_now(client: httpx.AsyncClient) -> None:
    for ticker in ("AAA", "BBB"):
        posted = await client.post("/api/signals", headers=headers(),
                                   json={"ticker": ticker, "action": "buy", "quantity": "1"})
        assert posted.status_code == 202
    recent = await client.get("/api/audit/report", params={"since": "1h"}, headers=headers())
    assert recent.status_code == 200
    assert recent.json()["signals"] == 2 and recent.json()["statuses"]["accepted"] == 2
    default = (await client.get("/api/audit/report", headers=headers())).json()
    assert default["signals"] == 2  # the last 24 hours
    before = await client.get("/api/audit/report", params={"since": "2d", "until": "1d"},
                              headers=headers())
    assert before.status_code == 200 and before.json()["signals"] == 0
    stuck = (await client.get("/api/audit/report", params={"stuck_after": "0"},
                              headers=headers())).json()["stuck"]
    assert stuck["total"] == 2 and stuck["after_seconds"] == 0


async def test_a_window_from_before_the_year_1000_holds_everything_since(
        client: httpx.AsyncClient) -> None:
    """Times are compared as text: a year before 1000 is written with four digits too."""
    posted = await client.post("/api/signals", headers=headers(),
                               json={"ticker": "AAA", "action": "buy", "quantity": "1"})
    assert posted.status_code == 202
    for since in ("0999-01-01", "0001-01-01", "1000-01-01"):
        report = await client.get("/api/audit/report", params={"since": since},
                                  headers=headers())
        assert report.status_code == 200, report.text
        assert report.json()["signals"] == 1, since
        assert report.json()["since"] == f"{since}T00:00:00.000000Z"
