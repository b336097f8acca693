"""`signalbox send` and `signalbox tail` against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ADMIN_TOKEN, INGEST_TOKEN, ServerProcess, headers, verify_chain

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def signalbox(server: ServerProcess, token: str, *args: str,
              stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SIGNALBOX_TOKEN": token, "SIGNALBOX_URL": server.base_url}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, text=True,
                          capture_output=True, timeout=60, input=stdin, check=False)


def lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line]


def test_send_from_flags_and_file_with_a_safe_retry(server: ServerProcess,
                                                    tmp_path: Path) -> None:
    sent = signalbox(server, INGEST_TOKEN, "send", "--ticker", "BTCUSDT", "--action", "buy",
                     "--quantity", "0.1", "--idempotency-key", "cli-1")
    assert sent.returncode == 0, sent.stderr
    (first,) = lines(sent.stdout)
    assert first["status"] == "accepted" and first["duplicate"] is False
    again = signalbox(server, INGEST_TOKEN, "send", "--ticker", "BTCUSDT", "--action", "buy",
                      "--idempotency-key", "cli-1")
    assert lines(again.stdout)[0]["signal_id"] == first["signal_id"]
    assert lines(again.stdout)[0]["duplicate"] is True
    signal_file = tmp_path / "signal.json"
    signal_file.write_text(json.dumps({"ticker": "ETHUSDT", "action": "sell"}))
    from_file = signalbox(server, INGEST_TOKEN, "send", "--file", str(signal_file),
                          "--quantity", "2")
    assert lines(from_file.stdout)[0]["status"] == "accepted"
    rejected = signalbox(server, INGEST_TOKEN, "send", "--ticker", "X", "--action", "hodl")
    assert rejected.returncode == 1
    assert lines(rejected.stdout)[0]["status"] == "rejected"
    no_token = signalbox(server, "", "send", "--ticker", "X", "--action", "buy")
    assert no_token.returncode != 0 and "SIGNALBOX_TOKEN" in no_token.stderr


async def post_two_signals(client: httpx.AsyncClient) -> None:
    for ticker in ("AAA", "BBB"):
        answer = await client.post("/api/signals", json={"ticker": ticker, "action": "buy"},
                                   headers=headers(INGEST_TOKEN))
        assert answer.status_code == 202


async def test_tail_prints_the_log_and_resumes_from_a_cursor_file(
        server: ServerProcess, client: httpx.AsyncClient, tmp_path: Path) -> None:
    await post_two_signals(client)  # four events
    cursor_file = tmp_path / "cursor.json"
    first = signalbox(server, ADMIN_TOKEN, "tail", "--cursor-file", str(cursor_file))
    assert first.returncode == 0, first.stderr
    events = lines(first.stdout)
    assert [e["position"] for e in events] == [1, 2, 3, 4]
    verify_chain(events)  # printed exactly as recorded: the hashes still check out
    await client.post("/api/signals", json={"ticker": "CCC", "action": "buy"},
                      headers=headers(INGEST_TOKEN))
    second = signalbox(server, ADMIN_TOKEN, "tail", "--cursor-file", str(cursor_file))
    assert [e["position"] for e in lines(second.stdout)] == [5, 6]
    filtered = signalbox(server, ADMIN_TOKEN, "tail", "--cursor", "0", "--type",
                         "signal.accepted", "--ticker", "BBB")
    assert [(e["type"], e["meta"]["ticker"]) for e in lines(filtered.stdout)] == [
        ("signal.accepted", "BBB")]


def test_tail_with_a_consumer_but_without_follow_is_refused(server: ServerProcess) -> None:
    """Without --follow, tail reads pages over HTTP, where no consumer position is kept:
    the name is refused rather than ignored."""
    refused = signalbox(server, ADMIN_TOKEN, "tail", "--consumer", "bot")
    assert refused.returncode == 2 and refused.stdout == ""
    assert "--consumer needs --follow" in refused.stderr


async def test_tail_follow_prints_new_events_as_they_come(
        server: ServerProcess, client: httpx.AsyncClient) -> None:
    env = {**os.environ, "SIGNALBOX_TOKEN": ADMIN_TOKEN, "SIGNALBOX_URL": server.base_url}
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "tail", "--cursor", "0", "--follow", env=env,
        stdout=asyncio.subprocess.PIPE)
    try:
        assert follower.stdout is not None
        await client.post("/api/signals", json={"ticker": "F", "action": "buy"},
                          headers=headers(INGEST_TOKEN))
        seen = [json.loads(await asyncio.wait_for(follower.stdout.readline(), 30))["position"]
                for _ in range(2)]
        for _ in range(2):  # these commit while it follows: they come live
            await client.post("/api/signals", json={"ticker": "F", "action": "buy"},
                              headers=headers(INGEST_TOKEN))
        seen += [json.loads(await asyncio.wait_for(follower.stdout.readline(), 30))["position"]
                 for _ in range(4)]
        assert seen == [1, 2, 3, 4, 5, 6]
    finally:
        follower.terminate()
        await follower.wait()


def test_send_and_tail_fail_in_one_line_without_a_traceback(server: ServerProcess,
                                                            tmp_path: Path) -> None:
    not_json, not_cursor = tmp_path / "signal.json", tmp_path / "cursor.json"
    not_json.write_text("{ticker: BTCUSDT")
    not_cursor.write_text('{"position": "x"}')
    for token, args, says in (
            (INGEST_TOKEN, ["send", "--file", str(tmp_path / "missing.json")],
             str(tmp_path / "missing.json")),
            (INGEST_TOKEN, ["send", "--file", str(not_json)], f"{not_json} is not JSON"),
            (ADMIN_TOKEN, ["tail", "--cursor-file", str(not_cursor)],
             f"{not_cursor} is not a cursor file"),
            (ADMIN_TOKEN, ["tail", "--follow", "--cursor-file", str(not_cursor)],
             f"{not_cursor} is not a cursor file"),
            (ADMIN_TOKEN, ["tail", "--url", "localhost:8000"], "localhost:8000"),
            (ADMIN_TOKEN, ["tail", "--follow", "--url", "localhost:8000"], "localhost:8000"),
            (INGEST_TOKEN, ["send", "--url", "localhost:8000", "--ticker", "X"],
             "localhost:8000")):
        done = signalbox(server, token, *args)
        assert done.returncode == 1, (args, done.stderr)
        assert "Traceback" not in done.stderr, (args, done.stderr)
        assert len(done.stderr.splitlines()) == 1 and says in done.stderr, (args, done.stderr)


def test_tail_into_a_closed_pipe_stops_quietly(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for _ in range(40):
            client.post("/api/signals", json={"ticker": "P", "action": "buy"},
                        headers=headers(INGEST_TOKEN)).raise_for_status()
    env = {**os.environ, "SIGNALBOX_TOKEN": ADMIN_TOKEN, "SIGNALBOX_URL": server.base_url}
    for follow in ([], ["--follow"]):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first line: `signalbox tail | head -0`
        try:
            done = subprocess.run([sys.executable, "-m", "pipeline", "tail", "--cursor", "0",
                                   *follow], env=env, stdout=write, stderr=subprocess.PIPE,
                                  text=True, timeout=60, check=False)
        finally:
            os.close(write)
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr, done.stderr


async def test_a_cursor_flag_wins_over_the_cursor_file_with_and_without_follow(
        server: ServerProcess, client: httpx.AsyncClient, tmp_path: Path) -> None:
    await post_two_signals(client)  # four events
    cursor_file = tmp_path / "cursor.json"
    assert signalbox(server, ADMIN_TOKEN, "tail", "--cursor-file", str(cursor_file)
                     ).returncode == 0  # the file is at the head now: 4
    again = signalbox(server, ADMIN_TOKEN, "tail", "--cursor", "2",
                      "--cursor-file", str(cursor_file))
    assert [e["position"] for e in lines(again.stdout)] == [3, 4]
    env = {**os.environ, "SIGNALBOX_TOKEN": ADMIN_TOKEN, "SIGNALBOX_URL": server.base_url}
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "tail", "--follow", "--cursor", "2",
        "--cursor-file", str(cursor_file), env=env, stdout=asyncio.subprocess.PIPE)
    try:
        assert follower.stdout is not None
        await client.post("/api/signals", json={"ticker": "CCC", "action": "buy"},
                          headers=headers(INGEST_TOKEN))
        seen = [json.loads(await asyncio.wait_for(follower.stdout.readline(), 30))["position"]
                for _ in range(4)]
        assert seen == [3, 4, 5, 6]
    finally:
        follower.terminate()
        await follower.wait()
