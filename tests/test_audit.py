"""``signalbox audit verify``: every kind of tampering, made directly in the database, is named
with its position; an intact log verifies; a verified head catches a rewritten chain."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from pipeline.log import EventLog, NewEvent
from pipeline.log.model import GENESIS_HASH, chain_hash
from pipeline.migrate import upgrade_async
from replay.audit import DatabaseSource, Head, Report, ServerSource, verify
from tests.support import ADMIN_TOKEN, ServerProcess, headers, repo_root

EVENTS = 30


async def written_log(url: str, count: int = EVENTS) -> None:
    await upgrade_async(url)
    log = await EventLog.open(url)
    try:
        for i in range(count):
            await log.append([NewEvent(f"stream-{i % 4}", "test.event", {"i": i, "note": "é"},
                                       {"ticker": "T"})])
    finally:
        await log.close()


async def tamper(url: str, *statements: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.exec_driver_sql(statement)
    finally:
        await engine.dispose()


async def report_of(url: str, start: Head | None = None) -> Report:
    source = DatabaseSource(url)
    try:
        return await verify(source, start)
    finally:
        await source.close()


async def check(url: str, start: Head | None = None) -> tuple[str, int] | None:
    report = await report_of(url, start)
    return None if report.finding is None else (report.finding.kind, report.finding.position)


async def test_an_intact_log_verifies_to_its_head(database_url: str) -> None:
    await written_log(database_url)
    report = await report_of(database_url)
    assert report.ok and report.verified == EVENTS and report.head.position == EVENTS


@pytest.mark.parametrize(("statements", "finding"), [
    (["UPDATE events SET data = '{\"i\":999,\"note\":\"é\"}' WHERE position = 7"], ("edited", 7)),
    (["DELETE FROM events WHERE position = 9"], ("removed", 9)),
    (["UPDATE events SET position = -5 WHERE position = 5",
      "UPDATE events SET position = 5 WHERE position = 12",
      "UPDATE events SET position = 12 WHERE position = -5"], ("reordered", 5)),
    ([f"INSERT INTO events (position, id, stream, type, data, meta, time, hash) VALUES "
      f"({EVENTS + 1}, '{uuid.uuid4()}', 'stream-0', 'test.event', '{{}}', '{{}}', "
      f"'2026-01-01T00:00:00.000000Z', '{'f' * 64}')"], ("inserted", EVENTS + 1)),
    ([f"DELETE FROM events WHERE position = {EVENTS}"], ("removed", EVENTS)),
], ids=["edit", "delete", "swap", "forged-append", "delete-last"])
async def test_each_kind_of_tampering_is_named_at_its_position(
        database_url: str, statements: list[str], finding: tuple[str, int]) -> None:
    await written_log(database_url)
    assert await check(database_url) is None
    await tamper(database_url, *statements)
    assert await check(database_url) == finding


async def rewrite_from(url: str, position: int) -> None:
    """Edit the event at ``position`` and recompute every hash after it, as a forger would."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            rows = (await conn.execute(text(
                "SELECT position, id, stream, type, data, meta, time FROM events "
                "ORDER BY position"))).all()
            previous = GENESIS_HASH
            for row in rows:
                data = '{"i":-1}' if row.position == position else row.data
                digest = chain_hash(previous, row.position, row.id, row.stream, row.type, data,
                                    row.meta, row.time)
                if row.position >= position:
                    await conn.execute(text("UPDATE events SET data = :d, hash = :h "
                                            "WHERE position = :p"),
                                       {"d": data, "h": digest, "p": row.position})
                previous = digest
            await conn.execute(text("UPDATE log_head SET hash = :h"), {"h": previous})
    finally:
        await engine.dispose()


async def test_a_verified_head_catches_a_chain_rewritten_before_it(database_url: str,
                                                                    tmp_path: Path) -> None:
    await written_log(database_url)
    first = await report_of(database_url)
    saved = tmp_path / "head.json"
    first.head.save(saved)
    await rewrite_from(database_url, 3)
    assert await check(database_url) is None  # the rewritten chain is consistent in itself
    assert await check(database_url, Head.load(saved)) == ("edited", EVENTS)


async def test_a_later_run_goes_on_from_the_verified_head(database_url: str) -> None:
    await written_log(database_url, 10)
    source = DatabaseSource(database_url)
    try:
        first = await verify(source)
        log = await EventLog.open(database_url)
        try:
            await log.append([NewEvent("s", "test.more", {"n": n}) for n in range(5)])
        finally:
            await log.close()
        second = await verify(source, first.head)
    finally:
        await source.close()
    assert second.ok and second.verified == 5 and second.head.position == 15


def audit_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "audit", "verify", *args],
                          capture_output=True, text=True, timeout=120, cwd=repo_root(),
                          check=False,
                          env={"PATH": "/usr/bin:/bin", "SIGNALBOX_TOKEN": ADMIN_TOKEN})


async def test_the_command_reports_and_exits_by_outcome(database_url: str,
                                                       tmp_path: Path) -> None:
    await written_log(database_url)
    saved = tmp_path / "head.json"
    intact = audit_cli("--database-url", database_url, "--save", str(saved))
    assert intact.returncode == 0, intact.stderr
    assert f"up to position {EVENTS}" in intact.stdout
    assert Head.load(saved).position == EVENTS
    await tamper(database_url, "DELETE FROM events WHERE position = 4")
    broken = audit_cli("--database-url", database_url, "--json")
    assert broken.returncode == 1, broken.stderr
    report = json.loads(broken.stdout)
    assert report["finding"]["kind"] == "removed" and report["finding"]["position"] == 4


async def test_a_server_log_verifies_over_http(database_url: str) -> None:
    server = ServerProcess(database_url).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            for ticker in ("AAA", "BBB", "CCC"):
                response = await client.post("/api/signals", headers=headers(),
                                             json={"ticker": ticker, "action": "buy",
                                                   "comment": "ünïcode"})
                assert response.status_code == 202
        source = ServerSource(server.base_url, ADMIN_TOKEN)
        try:
            report = await verify(source)
        finally:
            await source.close()
        assert report.ok and report.head.position == 6
        assert audit_cli("--url", server.base_url).returncode == 0
    finally:
        server.stop()
