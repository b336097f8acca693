"""docs/operations.md, done: back up the log while a server takes signals, verify the copy,
restore it and serve from it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.log.backends import sqlite_path
from tests.support import (
    INGEST_TOKEN,
    PG_ADMIN_DSN,
    ServerProcess,
    create_pg_database,
    drop_pg_database,
    headers,
)

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}


def online_backup(source: Path, target: Path) -> None:
    """The SQLite online backup of docs/operations.md: one consistent snapshot, taken while
    the server goes on writing (WAL: readers do not block the writer)."""
    with sqlite3.connect(source) as live, sqlite3.connect(target) as copy:
        live.backup(copy)
    live.close()
    copy.close()


def audit_verify(database_url: str, *options: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "audit", "verify", "--database-url", database_url,
         "--json", *options], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


async def post_steadily(base_url: str, started: asyncio.Event, stop: asyncio.Event) -> int:
    """Post signals one after another: tell when 50 are in, go on until told to stop, then
    post 50 more; the last position acknowledged."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        count = after_stop = 0
        while after_stop < 50:
            response = await client.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
            assert response.status_code == 202, response.text
            count += 1
            after_stop += stop.is_set()
            if count == 50:
                started.set()
    position: int = response.json()["position"]
    return position


async def back_up_while_serving(server: ServerProcess, backup: Any) -> int:
    """Run ``backup()`` (in a thread) while signals are being posted; the last position
    acknowledged."""
    started, stop = asyncio.Event(), asyncio.Event()
    poster = asyncio.create_task(post_steadily(server.base_url, started, stop))
    await started.wait()
    await asyncio.to_thread(backup)
    stop.set()
    return await poster


async def check_restored(database_url: str, report: dict[str, Any], last: int,
                         live_url: str) -> None:
    """The copy verifies, is a prefix of the live log, and serves."""
    copied = report["head"]
    assert report["ok"] and report["finding"] is None
    assert 100 <= copied["position"] < last  # taken mid-stream, not before or after it
    assert report["verified"] == copied["position"]
    async with httpx.AsyncClient(base_url=live_url) as client:
        page = (await client.get("/api/events", params={"after": copied["position"] - 1,
                                                        "limit": 1}, headers=headers())).json()
    assert page["events"][0]["hash"] == copied["hash"]
    restored = ServerProcess(database_url).start()
    try:
        async with httpx.AsyncClient(base_url=restored.base_url) as client:
            assert (await client.get("/readyz")).json()["head"] == copied["position"]
            posted = await client.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
            assert posted.json()["position"] == copied["position"] + 2
    finally:
        restored.stop()
    report = await asyncio.to_thread(audit_verify, database_url)
    assert report["head"]["position"] == copied["position"] + 2


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_sqlite_online_backup_while_serving_verifies_and_restores(
        database_url: str, tmp_path: Path) -> None:
    source = sqlite_path(database_url)
    assert source is not None
    copy = tmp_path / "backup.db"
    server = ServerProcess(database_url).start()
    try:
        last = await back_up_while_serving(server, lambda: online_backup(source, copy))
        copy_url = f"sqlite+aiosqlite:///{copy}"
        report = await asyncio.to_thread(audit_verify, copy_url)
        await check_restored(copy_url, report, last, server.base_url)
    finally:
        server.stop()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_pg_dump_while_serving_restores_and_verifies(database_url: str,
                                                          tmp_path: Path) -> None:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    source_name = database_url.rsplit("/", 1)[1]
    dump = tmp_path / "signalbox.dump"
    target_url, target_name = await create_pg_database()
    server = ServerProcess(database_url).start()
    try:
        last = await back_up_while_serving(server, lambda: subprocess.run(
            ["pg_dump", "--format=custom", f"--file={dump}", f"{base}/{source_name}"],
            check=True, timeout=120))
        await asyncio.to_thread(subprocess.run, [
            "pg_restore", "--no-owner", f"--dbname={base}/{target_name}", str(dump)],
            check=True, timeout=120)
        report = await asyncio.to_thread(audit_verify, target_url)
        await check_restored(target_url, report, last, server.base_url)
    finally:
        server.stop()
        await drop_pg_database(target_name)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_archive_then_prune_keeps_the_chain_verifiable_across_both(
        database_url: str, tmp_path: Path) -> None:
    source = sqlite_path(database_url)
    assert source is not None
    archive, head_file = tmp_path / "archive.db", tmp_path / "archive-head.json"
    server = ServerProcess(database_url).start()
    try:
        last = await back_up_while_serving(server, lambda: online_backup(source, archive))
        archived = await asyncio.to_thread(
            audit_verify, f"sqlite+aiosqlite:///{archive}", "--save", str(head_file))
        cut = archived["head"]["position"]
        with sqlite3.connect(source, timeout=30) as live:  # while the server runs
            live.execute("DELETE FROM events WHERE position < ?", (cut,))
        live.close()
        kept = await asyncio.to_thread(audit_verify, database_url, "--from", str(head_file))
        assert kept["head"]["position"] == last and kept["verified"] == last - cut
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            page = (await client.get("/api/events", params={"after": 0, "limit": 1},
                                     headers=headers())).json()
        assert page["events"][0]["position"] == cut
        assert page["events"][0]["hash"] == archived["head"]["hash"]
    finally:
        server.stop()
