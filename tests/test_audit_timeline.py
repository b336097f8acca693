"""``signalbox audit SIGNAL_ID``: a signal's events, oldest first, with the time between steps,
the same from a database and from a server; an unknown id fails in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from typing import Any

import httpx
import pytest

from pipeline.http import MAX_TIMELINE
from pipeline.log import EventLog, NewEvent
from replay import Client
from tests.support import ADMIN_TOKEN, ServerProcess, headers, repo_root


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "audit", *args],
                          capture_output=True, text=True, timeout=120, cwd=repo_root(),
                          check=False,
                          env={"PATH": "/usr/bin:/bin", "SIGNALBOX_TOKEN": ADMIN_TOKEN})


def seconds_between(earlier: str, later: str) -> float:
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


async def processed_signal(client: httpx.AsyncClient) -> tuple[str, dict[str, Any]]:
    """A signal received, accepted, claimed and processed; its ``GET /api/signals/{id}``."""
    posted = await client.post("/api/signals", headers=headers(),
                               json={"ticker": "ETHUSDT", "action": "sell", "quantity": "2"})
    assert posted.status_code == 202
    signal_id = posted.json()["signal_id"]
    for status, detail in (("processing", {}), ("processed", {"order": "o-17"})):
        reported = await client.post(f"/api/signals/{signal_id}/status", headers=headers(),
                                     json={"status": status, "consumer": "bot-1",
                                           "detail": detail})
        assert reported.status_code == 200, reported.text
    answer = await client.get(f"/api/signals/{signal_id}", headers=headers())
    return signal_id, answer.json()


async def test_a_timeline_shows_every_step_with_its_gaps(
        shared_server: ServerProcess, shared_client: httpx.AsyncClient) -> None:
    database_url = shared_server.database_url
    signal_id, api = await processed_signal(shared_client)
    offline = audit_cli("timeline", signal_id, "--database-url", database_url, "--json")
    remote = audit_cli(signal_id, "--url", shared_server.base_url, "--json")  # the short form
    text = audit_cli(signal_id, "--database-url", database_url)
    assert offline.returncode == 0, offline.stderr
    assert remote.returncode == 0, remote.stderr
    timeline = json.loads(offline.stdout)
    assert timeline == json.loads(remote.stdout)
    assert timeline["signal_id"] == signal_id and timeline["status"] == "processed"
    steps, recorded = timeline["events"], api["events"]
    assert [s["type"] for s in steps] == ["signal.received", "signal.accepted",
                                          "signal.processing", "signal.processed"]
    assert [(s["position"], s["time"]) for s in steps] == [(e["position"], e["time"])
                                                            for e in recorded]
    assert steps[0]["since_previous"] is None and steps[0]["since_received"] == 0
    for i in range(1, len(steps)):
        assert steps[i]["since_previous"] == pytest.approx(
            seconds_between(recorded[i - 1]["time"], recorded[i]["time"]), abs=1e-6)
        assert steps[i]["since_received"] == pytest.approx(
            seconds_between(recorded[0]["time"], recorded[i]["time"]), abs=1e-6)
    assert steps[3]["since_received"] > 0
    assert steps[0]["details"]["source"] == "api"
    assert steps[1]["details"] == {"signal": api["signal"]["normalized"]}
    assert steps[2]["details"] == {"consumer": "bot-1", "attempt": 1}
    assert steps[3]["details"] == {"consumer": "bot-1", "attempt": 1,
                                   "detail": {"order": "o-17"}}
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"signal {signal_id}: processed, 4 events")
    for event in recorded:
        assert any(line.split()[:3] == [str(event["position"]), event["time"], event["type"]]
                   for line in lines)
    assert 'detail: {"order": "o-17"}' in text.stdout


async def test_a_rejected_signal_shows_its_errors(shared_server: ServerProcess,
                                                  shared_client: httpx.AsyncClient) -> None:
    posted = await shared_client.post("/api/signals", headers=headers(),
                                      json={"ticker": "ETHUSDT", "action": "hold"})
    assert posted.status_code == 422
    signal_id = posted.json()["signal_id"]
    done = audit_cli(signal_id, "--url", shared_server.base_url, "--json")
    steps = json.loads(done.stdout)["events"]
    assert [s["type"] for s in steps] == ["signal.received", "signal.rejected"]
    assert steps[1]["details"] == {"errors": posted.json()["errors"]}


async def test_an_unknown_signal_fails_in_one_line(shared_server: ServerProcess) -> None:
    for source in (["--database-url", shared_server.database_url],
                   ["--url", shared_server.base_url]):
        done = audit_cli("no-such-signal", *source)
        assert done.returncode == 1, done.stdout
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1 and "no signal 'no-such-signal'" in done.stderr


async def test_a_timeline_over_its_limit_says_so_and_where_the_rest_is(
        server: ServerProcess) -> None:
    """A signal's stream can outgrow what one answer holds (an alert with a fixed id repeats
    every minute, each repeat a ``signal.duplicate``): the answer, the client and the audit
    command say that the timeline is cut, rather than pass it off as whole."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        posted = await client.post("/api/signals", headers=headers(),
                                   json={"ticker": "X", "action": "buy", "id": "fixed"})
        signal_id = posted.json()["signal_id"]
        log = await EventLog.open(server.database_url)
        try:  # as many repeats as fill the timeline, appended straight to the log
            for _ in range(MAX_TIMELINE // 1000):
                await log.append([NewEvent(f"signal-{signal_id}", "signal.duplicate",
                                           {"signal_id": signal_id}) for _ in range(1000)])
        finally:
            await log.close()
        answer = (await client.get(f"/api/signals/{signal_id}", headers=headers())).json()
        assert len(answer["events"]) == MAX_TIMELINE and answer["truncated"] is True
        async with Client(server.base_url, ADMIN_TOKEN) as python_client:
            assert (await python_client.signal(signal_id)).truncated is True
        other = await client.post("/api/signals", headers=headers(),
                                  json={"ticker": "Y", "action": "buy"})
        whole = await client.get(f"/api/signals/{other.json()['signal_id']}", headers=headers())
        assert whole.json()["truncated"] is False
    for source in (["--database-url", server.database_url], ["--url", server.base_url]):
        done = audit_cli(signal_id, *source)
        assert done.returncode == 0, done.stderr
        assert f"the first {MAX_TIMELINE:,} events only" in done.stdout, source
        assert f"stream signal-{signal_id}" in done.stdout
