"""``signalbox replay``: the recorded log read again, run as the real command against real
servers and databases: a dry run through a handler gives the live outcomes and leaves the log
alone; pacing, selection, JSON lines, POSTs, determinism, checkpoints and errors."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import pty
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from pipeline.log.model import GENESIS_HASH, Event, canonical_json, chain_hash, format_time
from pipeline.log.schema import events as events_table
from pipeline.log.schema import log_head
from pipeline.migrate import upgrade_async
from replay._sinks import Post, ReplayError
from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    ServerProcess,
    headers,
    read_all_events,
    wait_until,
)
from tests.test_runner import calls, post_all, runner_server, wait_for_outcomes

HANDLER = "tests.handler_fixture:record"
FINAL = ("signal.processed", "signal.failed", "signal.expired")


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "replay", *args]


def replay(*args: str, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args), check=False, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, cwd=cwd)


def stop_paced(flags: Sequence[str], ready: Callable[[], bool], *,
               stop: signal.Signals = signal.SIGINT, timeout: float = 30,
               cwd: Path | None = None) -> tuple[int, str]:
    """A replay paced in real time (``--speed 1``), sent ``stop`` once ``ready()``: its exit
    code and what it wrote on stderr."""
    process = subprocess.Popen(command(*flags, "--speed", "1"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, cwd=cwd)
    try:
        wait_until(ready, timeout=timeout)
        process.send_signal(stop)
        code = process.wait(30)
    finally:
        process.kill()
    assert process.stderr is not None
    return code, process.stderr.read()


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stdout_events(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # not a terminal: no progress bar
    return [json.loads(line) for line in done.stdout.splitlines()]


async def crafted_log(url: str, times: Sequence[datetime],
                      accepted: bool = False) -> list[dict[str, Any]]:
    """A log whose events were recorded at ``times``, hashes chained as the log does: test
    events, or ``signal.accepted`` ones (``accepted``) of signals without any status since."""
    await upgrade_async(url)
    rows: list[dict[str, Any]] = []
    previous = GENESIS_HASH
    for position, moment in enumerate(times, start=1):
        event_id, signal_id, recorded = str(uuid.uuid4()), str(uuid.uuid4()), format_time(moment)
        body: dict[str, Any] = {"n": position}
        kind, stream = "test.event", f"stream-{position}"
        if accepted:
            kind, stream = "signal.accepted", f"signal-{signal_id}"
            body = {"signal_id": signal_id, "signal": {
                "action": "buy", "extras": {}, "order_type": "market", "quantity": "1",
                "ticker": "T"}}
        data, meta = canonical_json(body), canonical_json({"ticker": "T"})
        previous = chain_hash(previous, position, event_id, stream, kind, data, meta, recorded)
        rows.append({"position": position, "id": event_id, "stream": stream, "type": kind,
                     "data": data, "meta": meta, "time": recorded, "hash": previous,
                     "ticker": "T"})
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(events_table.insert(), rows)
            await conn.execute(log_head.update().values(position=len(rows), hash=previous))
    finally:
        await engine.dispose()
    return rows


def spaced(count: int, seconds: float) -> list[datetime]:
    start = datetime(2025, 1, 15, 14, 0, tzinfo=UTC)
    return [start + timedelta(seconds=seconds * i) for i in range(count)]


# -- a dry run through the handler gives what the live runner gave ---------------------------


async def test_a_dry_run_gives_the_live_outcomes_and_leaves_the_log_alone(
        database_url: str, tmp_path: Path) -> None:
    server = runner_server(database_url, tmp_path / "live-calls.jsonl")
    try:
        comments = ["", "permanent", "fail-once", "always", "fail-twice", ""]
        ids = await post_all(server, [{"ticker": f"T{i % 3}", "action": "buy", "quantity": "1",
                                       "comment": comments[i % len(comments)]}
                                      for i in range(12)])
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            rejected = await client.post("/api/signals", json={"ticker": "X", "action": "hodl"},
                                         headers=headers(INGEST_TOKEN))
            assert rejected.status_code == 422
            before = await wait_for_outcomes(server, len(ids))
            dry_calls = tmp_path / "dry-calls.jsonl"
            flags = ["--handler", HANDLER, "--handler-attempts", "3",
                     "--handler-backoff", "0.01"]
            env = {"SIGNALBOX_TEST_RECORD": str(dry_calls), "SIGNALBOX_TOKEN": ADMIN_TOKEN}
            offline = replay("--database-url", database_url, *flags,
                             "--report", str(tmp_path / "offline.jsonl"), env=env)
            online = replay("--url", server.base_url, *flags,
                            "--report", str(tmp_path / "online.jsonl"), env=env)
            after = await read_all_events(client)
    finally:
        server.stop()
    assert offline.returncode == 0, offline.stderr
    assert online.returncode == 0, online.stderr
    assert offline.stderr == online.stderr == ""
    assert after == before  # the same events, head and count: nothing was written
    assert (tmp_path / "offline.jsonl").read_bytes() == (tmp_path / "online.jsonl").read_bytes()

    final = {e["data"]["signal_id"]: e for e in before if e["type"] in FINAL}
    accepted = [e for e in before if e["type"] == "signal.accepted"]
    report = lines(tmp_path / "offline.jsonl")
    assert [r["position"] for r in report] == [e["position"] for e in accepted]
    assert sorted(r["signal_id"] for r in report) == sorted(ids)
    for line in report:
        live = final[line["signal_id"]]
        assert line["replay"] == {"status": live["data"]["status"],
                                  "detail": live["data"]["detail"]}
        assert line["live"]["status"] == live["data"]["status"]
        assert line["live"]["position"] == live["position"]
        assert line["same"] is True
    assert {r["replay"]["status"] for r in report} == {"processed", "failed"}
    assert "12 same status, 0 different" in offline.stdout
    # The handler ran twice per signal (once per replay), retries included, as it did live.
    assert len(calls(dry_calls)) == 2 * len(calls(tmp_path / "live-calls.jsonl"))


# -- pacing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_speed_keeps_the_recorded_gaps_scaled(database_url: str) -> None:
    asyncio.run(crafted_log(database_url, spaced(5, 2.0)))
    process = subprocess.Popen(command("--database-url", database_url, "--speed", "10"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    arrivals: list[tuple[float, int]] = []
    for line in process.stdout:
        arrivals.append((time.monotonic(), json.loads(line)["position"]))
    assert process.wait(30) == 0
    assert [p for _, p in arrivals] == [1, 2, 3, 4, 5]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    # 2 s apart, ten times faster: 0.2 s (a line read late makes one gap longer, the next shorter)
    assert all(0.05 < gap < 0.6 for gap in gaps), gaps
    assert 0.15 < sum(gaps) / len(gaps) < 0.3, gaps


# -- selection, JSON lines, sources ----------------------------------------------------------


async def test_selection_by_position_time_ticker_strategy_and_type(
        server: ServerProcess, client: httpx.AsyncClient) -> None:
    for i in range(9):  # one at a time: each its own commit and time
        body = {"ticker": "ABC"[i % 3], "action": "sell" if i == 4 else "buy",
                "strategy": f"s{i % 2}"}
        if i == 7:
            body["action"] = "hodl"  # rejected
        answer = await client.post("/api/signals", json=body, headers=headers(INGEST_TOKEN))
        assert answer.status_code in (202, 422)
    recorded = await read_all_events(client)
    since, until = recorded[4]["time"], recorded[11]["time"]
    cases: list[tuple[list[str], list[dict[str, Any]]]] = [
        ([], recorded),
        (["--from-position", "3", "--to-position", "7"], recorded[2:7]),
        (["--since", since, "--until", until],
         [e for e in recorded if since <= e["time"] < until]),
        (["--ticker", "A", "--ticker", "C"],
         [e for e in recorded if e["meta"].get("ticker") in ("A", "C")]),
        (["--strategy", "s1"], [e for e in recorded if e["meta"].get("strategy") == "s1"]),
        (["--type", "signal.rej*", "--type", "signal.accepted"],
         [e for e in recorded if e["type"] in ("signal.rejected", "signal.accepted")]),
        (["--ticker", "B", "--type", "signal.*ed", "--from-position", "5"],
         [e for e in recorded if e["position"] >= 5 and e["meta"].get("ticker") == "B"
          and e["type"].endswith("ed")]),
    ]
    for flags, expected in cases:
        assert expected, flags
        offline = replay("--database-url", server.database_url, *flags)
        online = replay("--url", server.base_url, *flags, env={"SIGNALBOX_TOKEN": ADMIN_TOKEN})
        assert stdout_events(offline) == expected, flags
        assert online.stdout == offline.stdout, flags


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_same_log_gives_the_same_bytes(database_url: str, tmp_path: Path) -> None:
    await crafted_log(database_url, spaced(50, 0.5))
    for name in ("a", "b"):
        done = replay("--database-url", database_url, "--output", str(tmp_path / name))
        assert done.returncode == 0 and done.stdout == f"wrote 50 events to {tmp_path / name}\n"
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert len(lines(tmp_path / "a")) == 50


# -- POST --------------------------------------------------------------------------------------


class Receiver:
    """A real HTTP server on 127.0.0.1 that records what it is sent, and when (monotonic).
    ``script`` gives, per request number (from 1), the status to answer, or the status and
    headers to add; others get 200. ``every`` answers all the others instead."""

    def __init__(self, script: dict[int, int | tuple[int, dict[str, str]]], *,
                 every: int | tuple[int, dict[str, str]] = 200) -> None:
        self.script = script
        self.requests: list[tuple[str | None, dict[str, Any], int]] = []
        self.times: list[float] = []
        self.wall: list[float] = []
        outer = self

        class Handle(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                answer = outer.script.get(len(outer.requests) + 1, every)
                status, extra = answer if isinstance(answer, tuple) else (answer, {})
                outer.times.append(time.monotonic())
                outer.wall.append(time.time())
                outer.requests.append((self.headers.get("Idempotency-Key"), body, status))
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                return None

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hook"

    def __enter__(self) -> Receiver:
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.shutdown()
        self.http.server_close()

    def accepted(self) -> list[tuple[str | None, dict[str, Any]]]:
        return [(key, body) for key, body, status in self.requests if status == 200]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_post_retries_5xx_and_sends_each_event_with_its_id_as_key(
        database_url: str) -> None:
    rows = await crafted_log(database_url, spaced(6, 1.0))
    expected = stdout_events(replay("--database-url", database_url))
    with Receiver({2: 503, 3: 502, 5: 500}) as receiver:
        done = replay("--database-url", database_url, "--post", receiver.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"posted 6 events to {receiver.url}\n"
    assert receiver.accepted() == [(row["id"], event) for row, event in zip(rows, expected,
                                                                               strict=True)]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_post_stops_on_a_4xx_and_resumes_from_the_checkpoint(
        database_url: str, tmp_path: Path) -> None:
    rows = await crafted_log(database_url, spaced(5, 1.0))
    checkpoint = tmp_path / "cp.json"
    with Receiver({3: 422}) as receiver:
        refused = replay("--database-url", database_url, "--post", receiver.url,
                         "--checkpoint", str(checkpoint))
        assert refused.returncode == 1
        assert len(refused.stderr.splitlines()) == 1
        assert "refused the event at position 3 (HTTP 422" in refused.stderr
        assert json.loads(checkpoint.read_text())["position"] == 2
        resumed = replay("--database-url", database_url, "--post", receiver.url,
                         "--checkpoint", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr
    assert [key for key, _ in receiver.accepted()] == [row["id"] for row in rows]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_post_waits_as_a_rate_limiting_receiver_asks(database_url: str) -> None:
    """A receiver that answers 429 Too Many Requests is asked again once the wait it gave has
    passed: its Retry-After in seconds, or as an HTTP date (counted from the answer's Date),
    or, without one, a short backoff. Every event arrives, once and in order."""
    rows = await crafted_log(database_url, spaced(4, 1.0))
    not_before = math.ceil(time.time()) + 5
    date = formatdate(not_before, usegmt=True)
    with Receiver({2: (429, {"Retry-After": "2"}), 3: (429, {"Retry-After": date}),
                   4: 429}) as receiver:
        done = replay("--database-url", database_url, "--post", receiver.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"posted 4 events to {receiver.url}\n"
    assert [key for key, _ in receiver.accepted()] == [row["id"] for row in rows]
    assert [key for key, _, _ in receiver.requests[1:5]] == [rows[1]["id"]] * 4
    assert receiver.times[2] - receiver.times[1] >= 2 - 0.05
    assert receiver.wall[3] >= not_before - 0.05


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_post_stops_on_a_wait_too_long_and_resumes_from_the_checkpoint(
        database_url: str, tmp_path: Path) -> None:
    rows = await crafted_log(database_url, spaced(4, 1.0))
    checkpoint = tmp_path / "cp.json"
    flags = ["--database-url", database_url, "--checkpoint", str(checkpoint)]
    with Receiver({2: (429, {"Retry-After": "3600"})}) as receiver:
        started = time.monotonic()
        stopped = replay(*flags, "--post", receiver.url)
        assert time.monotonic() - started < 60  # not an hour
        assert stopped.returncode == 1
        assert len(stopped.stderr.splitlines()) == 1
        assert "asked to wait 3600 s" in stopped.stderr
        assert "run again later with the same --checkpoint" in stopped.stderr
        assert json.loads(checkpoint.read_text())["position"] == 1
        resumed = replay(*flags, "--post", receiver.url)
    assert resumed.returncode == 0, resumed.stderr
    assert [key for key, _ in receiver.accepted()] == [row["id"] for row in rows]


async def test_post_gives_up_an_event_refused_for_longer_than_its_patience() -> None:
    """A receiver that answers 429 to every try is asked again as it says, but not forever:
    once the next wait would take an event past the patience, the replay stops, with one line
    saying how to go on."""
    event = Event(1, str(uuid.uuid4()), "stream-1", "test.event", "{}", "{}",
                  format_time(datetime.now(UTC)), "0" * 64)
    with Receiver({}, every=(429, {"Retry-After": "1"})) as receiver:
        post = Post(receiver.url, {}, patience=2.5)
        try:
            with pytest.raises(ReplayError) as stopped:
                await post.put(event)
        finally:
            await post.close()
    assert len(receiver.requests) == 3
    assert all(b - a >= 1 - 0.05 for a, b in itertools.pairwise(receiver.times))
    assert "\n" not in stopped.value.message
    assert stopped.value.message.startswith(f"{receiver.url} did not take the event at "
                                            "position 1 in 3 attempts")
    assert stopped.value.message.endswith("run again with the same --checkpoint to go on")


# -- checkpoints -------------------------------------------------------------------------------


def test_an_interrupted_replay_resumes_with_every_event_once(
        database_url: str, tmp_path: Path) -> None:
    asyncio.run(crafted_log(database_url, spaced(60, 0.1)))
    out, checkpoint = tmp_path / "out.jsonl", tmp_path / "cp.json"
    flags = ["--database-url", database_url, "--output", str(out), "--checkpoint",
             str(checkpoint)]
    stopped = stop_paced(flags, lambda: out.exists() and out.read_text().count("\n") >= 10)
    assert stopped == (130, "")
    partial = lines(out)
    assert 10 <= len(partial) < 60
    assert json.loads(checkpoint.read_text())["position"] == partial[-1]["position"]

    resumed = replay(*flags)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == f"wrote 60 events to {out}\n"
    assert [e["position"] for e in lines(out)] == list(range(1, 61))
    whole = tmp_path / "whole.jsonl"
    assert replay("--database-url", database_url, "--output", str(whole)).returncode == 0
    assert out.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_interrupted_dry_run_resumes_with_every_signal_once(database_url: str,
                                                                tmp_path: Path) -> None:
    asyncio.run(crafted_log(database_url, spaced(40, 0.1), accepted=True))
    report, checkpoint = tmp_path / "report.jsonl", tmp_path / "cp.json"
    flags = ["--database-url", database_url, "--handler", "log", "--report", str(report),
             "--checkpoint", str(checkpoint)]
    code, _ = stop_paced(flags, lambda: report.exists() and report.read_text().count("\n") >= 8)
    assert code == 130
    assert len(lines(report)) < 40
    resumed = replay(*flags)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["position"] for r in lines(report)] == list(range(1, 41))
    assert {r["live"]["status"] for r in lines(report)} == {"accepted"}
    assert resumed.stdout.splitlines()[:2] == [
        "replayed 40 signals through log: 40 processed, 0 failed, 0 expired",
        "against the live log: 0 same status, 0 different, 40 not finished there"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_lines_written_after_the_last_checkpoint_of_a_killed_run_are_not_repeated(
        database_url: str, tmp_path: Path) -> None:
    # More than a page (2000 events): the checkpoint is saved once, then the run is killed
    # with lines written past it that the checkpoint does not know of.
    asyncio.run(crafted_log(database_url, spaced(3500, 0.001)))
    out, checkpoint = tmp_path / "out.jsonl", tmp_path / "cp.json"
    flags = ["--database-url", database_url, "--output", str(out), "--checkpoint",
             str(checkpoint)]
    stop_paced(flags, lambda: checkpoint.exists() and out.read_text().count("\n") > 2050,
               stop=signal.SIGKILL, timeout=60)
    assert json.loads(checkpoint.read_text())["position"] == 2000
    assert replay(*flags).returncode == 0
    assert [e["position"] for e in lines(out)] == list(range(1, 3501))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_replay_resumed_from_another_folder_goes_on_with_its_own_file(
        database_url: str, tmp_path: Path) -> None:
    """A relative --output names another file in another folder: resumed from there, the
    replay is refused (nothing written anywhere) rather than go on in a file that lacks the
    beginning; given the file it began, from any folder, it ends it."""
    asyncio.run(crafted_log(database_url, spaced(30, 0.1)))
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    out, checkpoint = first / "out.jsonl", tmp_path / "cp.json"
    flags = ["--database-url", database_url, "--checkpoint", str(checkpoint)]
    stopped = stop_paced([*flags, "--output", "out.jsonl"],
                         lambda: out.exists() and out.read_text().count("\n") >= 5, cwd=first)
    assert stopped == (130, "")
    kept = out.read_bytes()

    elsewhere = replay(*flags, "--output", "out.jsonl", cwd=second)
    assert elsewhere.returncode == 2
    assert len(elsewhere.stderr.splitlines()) == 1
    assert f"goes on writing {out}, not {second / 'out.jsonl'}" in elsewhere.stderr
    assert not (second / "out.jsonl").exists()
    assert out.read_bytes() == kept

    resumed = replay(*flags, "--output", str(out), cwd=second)
    assert resumed.returncode == 0, resumed.stderr
    assert [e["position"] for e in lines(out)] == list(range(1, 31))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_replay_whose_file_is_gone_or_cut_short_is_refused(database_url: str,
                                                                   tmp_path: Path) -> None:
    await crafted_log(database_url, spaced(10, 1.0))
    out, checkpoint = tmp_path / "out.jsonl", tmp_path / "cp.json"
    flags = ["--database-url", database_url, "--output", str(out), "--checkpoint",
             str(checkpoint)]
    assert replay(*flags).returncode == 0
    whole = out.read_bytes()
    for damaged in (None, whole[:len(whole) // 2]):
        if damaged is None:
            out.unlink()
        else:
            out.write_bytes(damaged)
        refused = replay(*flags)
        assert refused.returncode == 1
        assert len(refused.stderr.splitlines()) == 1
        assert f"{out} is not the file the checkpoint {checkpoint} goes on" in refused.stderr
        assert (out.read_bytes() if out.exists() else None) == damaged
    out.write_bytes(whole)
    again = replay(*flags)
    assert again.returncode == 0, again.stderr
    assert out.read_bytes() == whole


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_checkpoint_of_other_options_or_another_log_is_refused(
        database_url: str, tmp_path: Path) -> None:
    await crafted_log(database_url, spaced(10, 1.0))
    out, checkpoint = tmp_path / "out.jsonl", tmp_path / "cp.json"
    flags = ["--output", str(out), "--checkpoint", str(checkpoint)]
    assert replay("--database-url", database_url, "--to-position", "4", *flags).returncode == 0
    kept = out.read_bytes()

    other_options = replay("--database-url", database_url, "--to-position", "6", *flags)
    assert other_options.returncode == 2
    assert "was made with other options (to_position: 4 then, 6 now)" in other_options.stderr

    other = f"sqlite+aiosqlite:///{tmp_path / 'other.db'}"
    await crafted_log(other, spaced(10, 1.0))
    other_log = replay("--database-url", other, "--to-position", "4", *flags)
    assert other_log.returncode == 1
    assert "belongs to another log" in other_log.stderr
    assert len(other_log.stderr.splitlines()) == 1
    assert out.read_bytes() == kept  # refused before anything was written


# -- errors, usage, progress -------------------------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_server_source_with_a_bad_token_says_so(server: ServerProcess) -> None:
    for token, status in (("sbx_wrong", "401"), (INGEST_TOKEN, "403")):
        done = replay("--url", server.base_url, env={"SIGNALBOX_TOKEN": token})
        assert done.returncode == 1 and done.stdout == ""
        assert len(done.stderr.splitlines()) == 1
        assert f"HTTP {status}" in done.stderr and "SIGNALBOX_TOKEN" in done.stderr


@pytest.mark.parametrize(("flags", "words"), [
    (["--speed", "0"], "--speed"),
    (["--since", "yesterday"], "--since 'yesterday' is not an ISO 8601 time"),
    (["--since", "2025-01-02", "--until", "2025-01-01"], "--until must be after --since"),
    (["--since", "0001-01-01T00:00:00+01:00"], "--since '0001-01-01T00:00:00+01:00' is out of"),
    (["--until", "9999-12-31T23:00:00-05:00"], "--until '9999-12-31T23:00:00-05:00' is out of"),
    (["--from-position", "5", "--to-position", "4"], "--to-position"),
    (["--handler", HANDLER], "--handler needs --report"),
    (["--report", "r.jsonl"], "--report goes with --handler"),
    (["--handler", HANDLER, "--report", "r.jsonl", "--type", "signal.*"], "--type"),
    (["--handler", "no_such_module:f", "--report", "r.jsonl"], "cannot load handler"),
])
def test_bad_usage_exits_2_with_one_line(flags: list[str], words: str, tmp_path: Path) -> None:
    done = replay("--database-url", f"sqlite+aiosqlite:///{tmp_path / 'none.db'}", *flags)
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and words in done.stderr


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    main, side = pty.openpty()
    yield main, side
    os.close(main)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_progress_goes_to_a_terminal_unless_quiet(database_url: str,
                                                        terminal: tuple[int, int],
                                                        tmp_path: Path) -> None:
    asyncio.run(crafted_log(database_url, spaced(20, 0.05)))
    main, side = terminal
    shown = []
    for quiet in ([], ["--quiet"]):
        process = subprocess.Popen(
            command("--database-url", database_url, "--speed", "1", "--output",
                    str(tmp_path / "out.jsonl"), *quiet),
            stdout=subprocess.DEVNULL, stderr=side)
        assert process.wait(30) == 0
        os.write(side, b"|end|\n")
        text = ""
        while "|end|" not in text:
            text += os.read(main, 4096).decode()
        shown.append(text.split("|end|")[0])
    os.close(side)
    assert "20 events" in shown[0] and "100%" in shown[0] and "ETA 0:00" in shown[0]
    assert shown[1].strip() == ""
