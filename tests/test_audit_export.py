"""``signalbox audit export``: the events as the API gives them, as JSON lines and as CSV that
parses back to the same values, with filters; the signals projection likewise; from a
database and from a server."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from replay.export import EVENT_COLUMNS, SIGNAL_COLUMNS
from tests.support import (
    ADMIN_TOKEN,
    ServerProcess,
    TcpProxy,
    headers,
    read_all_events,
    repo_root,
)

API_KEYS = ("position", "id", "stream", "type", "data", "meta", "time", "hash")
AWKWARD = 'he said "buy, now"\nthen left; ünïcode, tab\there'


def export_cli(out: Path, *args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "pipeline", "audit", "export",
                           "--output", str(out), *args],
                          capture_output=True, text=True, timeout=120, cwd=repo_root(),
                          check=False,
                          env={"PATH": "/usr/bin:/bin", "SIGNALBOX_TOKEN": ADMIN_TOKEN})
    assert done.returncode == 0, done.stderr
    return out.read_text(encoding="utf-8").splitlines()


def jsonl(out: Path, *args: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in export_cli(out, "--format", "jsonl", *args)]


def csv_rows(out: Path, *args: str) -> list[dict[str, str]]:
    export_cli(out, "--format", "csv", *args)
    with out.open(encoding="utf-8", newline="") as file:
        return list(csv.DictReader(file))


async def recorded(client: httpx.AsyncClient) -> None:
    """Signals of every kind: accepted with awkward text, rejected, claimed, processed."""
    ids = []
    for ticker in ("BTCUSDT", "ETHUSDT", "SOLUSDT"):
        posted = await client.post("/api/signals", headers=headers(),
                                   json={"ticker": ticker, "action": "buy", "quantity": "1",
                                         "comment": AWKWARD, "strategy": "trend"})
        assert posted.status_code == 202
        ids.append(posted.json()["signal_id"])
    rejected = await client.post("/api/signals", headers=headers(),
                                 json={"ticker": "XRPUSDT", "action": "hold"})
    assert rejected.status_code == 422
    for status in ("processing", "processed"):
        reported = await client.post(f"/api/signals/{ids[0]}/status", headers=headers(),
                                     json={"status": status, "consumer": "bot"})
        assert reported.status_code == 200


@pytest.fixture(scope="module")
async def recorded_server(shared_server: ServerProcess) -> ServerProcess:
    """A server per backend whose log holds what ``recorded`` records; the tests only read."""
    async with httpx.AsyncClient(base_url=shared_server.base_url, timeout=30) as client:
        await recorded(client)
    return shared_server


def as_api_event(line: dict[str, Any]) -> dict[str, Any]:
    assert line["ticker"] == line["meta"].get("ticker")
    assert line["strategy"] == line["meta"].get("strategy")
    return {k: line[k] for k in API_KEYS}


def from_csv(row: dict[str, str]) -> dict[str, Any]:
    """A CSV row as an event of the API (and its ticker and strategy columns checked)."""
    meta = json.loads(row["meta"])
    assert row["ticker"] == (meta.get("ticker") or "")
    assert row["strategy"] == (meta.get("strategy") or "")
    return {**{k: row[k] for k in ("id", "stream", "type", "time", "hash")},
            "position": int(row["position"]), "data": json.loads(row["data"]), "meta": meta}


async def test_events_export_as_the_api_gives_them(recorded_server: ServerProcess,
                                                   tmp_path: Path) -> None:
    server, database_url = recorded_server, recorded_server.database_url
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        api = await read_all_events(client)
    sources = (["--database-url", database_url], ["--url", server.base_url])
    lines = [jsonl(tmp_path / f"e{i}.jsonl", *s) for i, s in enumerate(sources)]
    texts = [(tmp_path / f"e{i}.jsonl").read_text() for i in range(2)]
    rows = [csv_rows(tmp_path / f"e{i}.csv", *s) for i, s in enumerate(sources)]
    assert len(api) == 10
    assert texts[0] == texts[1]
    assert [as_api_event(line) for line in lines[0]] == api
    assert list(lines[0][0]) == list(EVENT_COLUMNS)
    header = (tmp_path / "e0.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == ",".join(EVENT_COLUMNS)
    assert rows[0] == rows[1]
    assert [from_csv(row) for row in rows[0]] == api
    assert any(AWKWARD in (from_csv(r)["data"].get("signal") or {}).get("comment", "")
               for r in rows[0])


async def test_events_export_filters(recorded_server: ServerProcess, tmp_path: Path) -> None:
    server, database_url = recorded_server, recorded_server.database_url
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        api = await read_all_events(client)
    stream = api[0]["stream"]
    since, until = api[2]["time"], api[9]["time"]
    cases: list[tuple[list[str], list[dict[str, Any]]]] = [
        (["--type", "signal.accepted"], [e for e in api if e["type"] == "signal.accepted"]),
        (["--type", "signal.re*", "--type", "signal.processed"],
         [e for e in api if e["type"] in ("signal.received", "signal.rejected",
                                          "signal.processed")]),
        (["--stream", stream], [e for e in api if e["stream"] == stream]),
        (["--since", since, "--until", until],
         [e for e in api if since <= e["time"] < until]),
        (["--since", since, "--type", "signal.accepted"],
         [e for e in api if since <= e["time"] and e["type"] == "signal.accepted"]),
    ]
    for i, (flags, expected) in enumerate(cases):
        assert expected, flags
        for source in (["--database-url", database_url], ["--url", server.base_url]):
            found = jsonl(tmp_path / f"f{i}.jsonl", *source, *flags)
            assert [as_api_event(line) for line in found] == expected, (flags, source)


async def test_signals_export_one_row_per_signal(recorded_server: ServerProcess,
                                                 tmp_path: Path) -> None:
    server, database_url = recorded_server, recorded_server.database_url
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        listed = (await client.get("/api/signals", headers=headers())).json()["signals"]
    offline = jsonl(tmp_path / "s.jsonl", "--signals", "--database-url", database_url)
    remote = jsonl(tmp_path / "r.jsonl", "--signals", "--url", server.base_url)
    table = csv_rows(tmp_path / "s.csv", "--signals", "--database-url", database_url)
    since = listed[1]["received_at"]  # newest first: the two newest signals
    recent = jsonl(tmp_path / "n.jsonl", "--signals", "--database-url", database_url,
                   "--since", since)
    assert len(offline) == 4
    assert [list(row) for row in offline] == [list(SIGNAL_COLUMNS)] * 4
    assert offline == sorted(remote, key=lambda row: row["first_position"])
    for row, summary in zip(offline, reversed(listed), strict=True):
        assert row["signal_id"] == summary["signal_id"]
        assert row["status"] == summary["status"]
        assert row["first_position"] == summary["position"]
        steps = {k.removesuffix("_at"): v for k, v in row.items()
                 if k.endswith("_at") and k not in ("received_at", "updated_at") and v}
        assert steps == summary["steps"]
    assert offline[0]["status"] == "processed" and offline[3]["status"] == "rejected"
    assert [r["signal_id"] for r in table] == [r["signal_id"] for r in offline]
    assert [int(r["attempts"]) for r in table] == [r["attempts"] for r in offline]
    assert table[0]["processed_at"] == offline[0]["processed_at"]
    assert table[1]["processed_at"] == ""
    assert [r["signal_id"] for r in recent] == [s["signal_id"] for s in reversed(listed[:2])]


def test_signals_and_event_filters_do_not_mix(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline", "audit", "export", "--signals",
                           "--type", "signal.*", "--database-url",
                           f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"],
                          capture_output=True, text=True, timeout=60, cwd=repo_root(),
                          check=False, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert "--type and --stream select events" in done.stderr


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("words", [["audit", "export"], ["audit", "verify"], ["replay"],
                                   ["audit", "report"]])
async def test_reading_over_http_waits_out_a_server_restarting_behind_a_proxy(
        server: ServerProcess, tmp_path: Path, words: list[str]) -> None:
    """A server that restarts behind a reverse proxy answers 502 for a moment: the export, the
    verification and the replay wait for it, and then read every event once."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        await recorded(client)
        expected = await read_all_events(client)
    out = tmp_path / "out.jsonl"
    extra = ["--output", str(out)] if words in (["audit", "export"], ["replay"]) else []
    async with TcpProxy(server, gateway=True) as proxy:
        server.stop()
        reading = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline", *words, "--url", proxy.base_url, *extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=repo_root(),
            env={**os.environ, "SIGNALBOX_TOKEN": ADMIN_TOKEN})
        deadline = time.monotonic() + 30
        while proxy.bad_gateways == 0 and reading.returncode is None:
            assert time.monotonic() < deadline, "the command never asked"
            await asyncio.sleep(0.02)
        await asyncio.to_thread(server.restart)
        stdout, stderr = await reading.communicate()
    assert reading.returncode == 0, stderr.decode()
    assert proxy.bad_gateways >= 1
    if extra:
        assert [json.loads(line)["position"] for line in out.read_text().splitlines()] == [
            e["position"] for e in expected]
    elif words == ["audit", "verify"]:
        assert f"verified {len(expected)} events" in stdout.decode()
    else:
        assert "by status: accepted 2, rejected 1, processed 1" in stdout.decode()


async def test_ticker_and_strategy_are_those_of_meta_however_long(server: ServerProcess,
                                                                  tmp_path: Path) -> None:
    """The events table keeps a strategy cut to 200 characters for filtering; the export's
    column is the one in ``meta``, whole, from the database as from the API."""
    strategy = "-".join(["mean-reversion"] * 20)  # 299 characters
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        posted = await client.post("/api/signals", headers=headers(), json={
            "ticker": "BTCUSDT", "action": "buy", "quantity": "1", "strategy": strategy})
        assert posted.status_code == 202
    for i, source in enumerate((["--database-url", server.database_url],
                                ["--url", server.base_url])):
        lines = jsonl(tmp_path / f"e{i}.jsonl", "--type", "signal.accepted", *source)
        assert [line["strategy"] for line in lines] == [strategy], source
        assert [line["ticker"] for line in lines] == ["BTCUSDT"]
        (row,) = csv_rows(tmp_path / f"e{i}.csv", "--type", "signal.accepted", *source)
        assert row["strategy"] == strategy
