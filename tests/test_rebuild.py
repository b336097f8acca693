"""``signalbox rebuild``: the projection made again from the log, against a running server.

A projection edited behind the log's back (a row changed, one deleted, one forged) is named
row by row and left alone; ``--swap``, while signals keep arriving, puts back exactly the fold
of the log and loses none of the signals acknowledged meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from pipeline.log.backends import migration_engine
from pipeline.processing.rebuild import (
    RebuildReport,
    catch_up,
    fold_and_compare,
    rebuild,
    replace_live,
)
from tests.support import INGEST_TOKEN, ServerProcess, headers


async def run_rebuild(url: str, *extra: str) -> tuple[int, dict[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "rebuild", "--database-url", url, "--json", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode in (0, 1), err.decode()
    return process.returncode, json.loads(out)


async def sql(url: str, statement: str, **params: Any) -> list[Any]:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(statement), params)
            return list(result.all()) if result.returns_rows else []
    finally:
        await engine.dispose()


async def post(client: httpx.AsyncClient, body: dict[str, Any], key: str | None = None) -> str:
    extra = {"Idempotency-Key": key} if key else {}
    response = await client.post("/api/signals", json=body, headers=headers(**extra))
    assert response.status_code in (200, 202, 422), response.text
    signal_id: str = response.json()["signal_id"]
    return signal_id


async def report(client: httpx.AsyncClient, signal_id: str, status: str) -> None:
    response = await client.post(f"/api/signals/{signal_id}/status", headers=headers(),
                                 json={"status": status, "consumer": "bot",
                                       "detail": {"error": "no margin"}})
    assert response.status_code == 200, response.text


async def test_rebuild_names_edits_of_the_projection_and_swap_restores_the_fold(
        database_url: str) -> None:
    server = ServerProcess(database_url).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            ids = [await post(client, {"ticker": f"T{i}", "action": "buy", "quantity": "1"})
                   for i in range(6)]
            await post(client, {"ticker": "BAD", "action": "hodl"})  # rejected
            await post(client, {"ticker": "T0", "action": "buy"}, key="k1")
            await post(client, {"ticker": "T0", "action": "buy"}, key="k1")  # duplicate
            await report(client, ids[0], "processing")
            await report(client, ids[0], "processed")
            await report(client, ids[1], "failed")
            await report(client, ids[2], "dispatched")

            code, clean = await run_rebuild(database_url)
            assert (code, clean["difference_count"], clean["problem_count"]) == (0, 0, 0)
            assert clean["signals"] == 8
            head = (await client.get("/api/events", headers=headers(),
                                     params={"limit": 1})).json()["head"]
            assert (clean["events"], clean["head"]) == (head, head)

            await sql(database_url, "UPDATE signals SET status = 'processed', attempts = 3 "
                                    "WHERE signal_id = :id", id=ids[2])
            await sql(database_url, "DELETE FROM signals WHERE signal_id = :id", id=ids[3])
            await sql(database_url, "INSERT INTO signals SELECT 'forged', status, source, "
                                    "token_name, ticker, strategy, action, NULL, content_hash, "
                                    "received_at, updated_at, first_position, last_position, "
                                    "claimed_by, attempts, last_error, dispatched_at, "
                                    "processing_at, processed_at, failed_at, expired_at "
                                    "FROM signals WHERE signal_id = :id", id=ids[4])
            code, found = await run_rebuild(database_url)
            assert code == 1
            assert {(d["signal_id"], d["kind"]) for d in found["differences"]} == {
                (ids[2], "differs"), (ids[3], "missing"), ("forged", "extra")}
            differs = next(d for d in found["differences"] if d["kind"] == "differs")
            assert differs["columns"] == {"status": {"live": "processed", "rebuilt": "dispatched"},
                                          "attempts": {"live": 3, "rebuilt": 0}}
            # Reported, not repaired; and no scratch table is left behind.
            assert await sql(database_url, "SELECT status FROM signals WHERE signal_id = :id",
                             id=ids[2]) == [("processed",)]
            response = await client.get(f"/api/signals/{ids[3]}", headers=headers())
            assert response.status_code == 404

            # Swap while signals keep coming: none acknowledged may go missing.
            acked: list[str] = []
            swapped = asyncio.Event()

            async def keep_posting() -> None:
                while not swapped.is_set() or len(acked) < 5:
                    response = await client.post(
                        f"/webhooks/tradingview/{INGEST_TOKEN}",
                        content='{"ticker":"LIVE","action":"sell","quantity":"2"}')
                    assert response.status_code == 202, response.text
                    acked.append(response.json()["signal_id"])

            poster = asyncio.create_task(keep_posting())
            try:
                code, result = await run_rebuild(database_url, "--swap")
            finally:
                swapped.set()
                await poster
            assert code == 0 and result["swapped"]

            code, after = await run_rebuild(database_url)
            assert (code, after["difference_count"], after["moved_on"]) == (0, 0, 0)
            assert after["signals"] == 8 + len(acked)
            restored = (await client.get(f"/api/signals/{ids[2]}", headers=headers())).json()
            assert restored["status"] == "dispatched"
            assert (await client.get(f"/api/signals/{ids[3]}", headers=headers())).status_code \
                == 200
            assert (await client.get("/api/signals/forged", headers=headers())).status_code \
                == 404
            for signal_id in acked:
                response = await client.get(f"/api/signals/{signal_id}", headers=headers())
                assert response.json()["status"] == "accepted"
            # The server goes on recording into the swapped projection.
            await report(client, ids[2], "processing")
            assert (await run_rebuild(database_url))[1]["difference_count"] == 0
    finally:
        server.stop()


async def test_the_swap_folds_in_what_was_appended_after_the_fold(database_url: str) -> None:
    """The gaps the swap closes, made certain rather than left to timing: signals are
    acknowledged after the log was folded and compared (taken in without a lock), and after
    that catch-up, before the swap (taken in under the log's write lock)."""
    server = ServerProcess(database_url).start()
    engine = migration_engine(database_url)
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            before = [await post(client, {"ticker": "OLD", "action": "buy"}) for _ in range(3)]
            rebuilt = RebuildReport()
            await fold_and_compare(engine, rebuilt)
            assert (rebuilt.signals, rebuilt.differences) == (3, [])
            after = [await post(client, {"ticker": "NEW", "action": "sell"}) for _ in range(4)]
            await catch_up(engine, rebuilt)
            assert rebuilt.signals == 7 and not rebuilt.swapped
            last = [await post(client, {"ticker": "LAST", "action": "buy"}) for _ in range(2)]
            await report(client, before[0], "processing")
            await replace_live(engine, rebuilt)
            assert rebuilt.swapped and rebuilt.signals == 9
            rows = dict(await sql(database_url, "SELECT signal_id, status FROM signals"))
            assert rows == {**dict.fromkeys(before + after + last, "accepted"),
                            before[0]: "processing"}
            code, check = await run_rebuild(database_url)
            assert (code, check["difference_count"], check["signals"]) == (0, 0, 9)
    finally:
        await engine.dispose()
        server.stop()


async def test_the_fold_stops_at_the_head_it_began_with(database_url: str) -> None:
    """A busy log must not keep the fold chasing its head: a signal acknowledged after every
    page folded is left for the swap, and the live rows past the head are counted, not
    compared."""
    server = ServerProcess(database_url).start()
    engine = migration_engine(database_url)
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            for _ in range(3):
                await post(client, {"ticker": "OLD", "action": "buy"})
            head = (await client.get("/api/events", headers=headers(),
                                     params={"limit": 1})).json()["head"]
        pages: list[int] = []
        with httpx.Client(base_url=server.base_url, timeout=30) as sync_client:
            def append_after_each_page(progress: RebuildReport) -> None:
                pages.append(progress.head)
                if len(pages) <= 20:  # bounded, so that a fold that chases still ends
                    response = sync_client.post("/api/signals", headers=headers(),
                                                json={"ticker": "NEW", "action": "sell"})
                    assert response.status_code == 202, response.text

            rebuilt = RebuildReport()
            await fold_and_compare(engine, rebuilt, append_after_each_page)
        assert pages == [head]
        assert (rebuilt.head, rebuilt.signals, rebuilt.moved_on) == (head, 3, 1)
        assert rebuilt.difference_count == 0
        await catch_up(engine, rebuilt)
        await replace_live(engine, rebuilt)
        assert rebuilt.signals == 4
    finally:
        await engine.dispose()
        server.stop()


async def test_a_rebuild_started_while_another_runs_is_refused(database_url: str) -> None:
    """A rebuild folds into a table of its own name: a second one started meanwhile (on
    another host, by a timer) would drop the first's table, or fold into it, and a swap would
    put a projection missing signals in the place of the live one. It is refused in one line,
    and the first goes on."""
    server = ServerProcess(database_url).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            for _ in range(3):
                await post(client, {"ticker": "OLD", "action": "buy"})
        others: list[subprocess.CompletedProcess[str]] = []

        def another_rebuild(progress: RebuildReport) -> None:  # while the first is folding
            if not others:
                others.append(subprocess.run(
                    [sys.executable, "-m", "pipeline", "rebuild", "--swap", "--database-url",
                     database_url], capture_output=True, text=True, timeout=60, check=False))

        first = await rebuild(database_url, swap=True, progress=another_rebuild)
        [other] = others
        assert other.returncode == 1, other.stdout + other.stderr
        assert "Traceback" not in other.stderr and len(other.stderr.splitlines()) == 1
        assert "another rebuild" in other.stderr
        assert (first.swapped, first.signals, first.difference_count) == (True, 3, 0)
        code, check = await run_rebuild(database_url)
        assert (code, check["difference_count"], check["signals"]) == (0, 0, 3)
    finally:
        server.stop()


HOLDING = """
import asyncio, sys
from pipeline.processing.rebuild import rebuild

def hold(report):  # a page is folded: stay inside the rebuild until killed
    print("folding", flush=True)
    sys.stdin.read()

asyncio.run(rebuild(sys.argv[1], progress=hold))
"""


def rebuild_now(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "rebuild", "--json",
                           "--database-url", url], capture_output=True, text=True, timeout=60,
                          check=False)


async def test_a_rebuild_killed_in_the_middle_keeps_no_other_out(database_url: str) -> None:
    """What keeps a second rebuild out is let go of when the process holding it ends, however
    it ends: a rebuild killed in the middle (kill -9, out of memory) does not refuse every
    later one, which folds the log again from the start."""
    server = ServerProcess(database_url).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            for _ in range(3):
                await post(client, {"ticker": "OLD", "action": "buy"})
        holder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLDING, database_url, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        try:
            assert holder.stdout is not None
            assert await asyncio.wait_for(holder.stdout.readline(), 60) == b"folding\n"
            refused = rebuild_now(database_url)
            assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
            assert "another rebuild is running on this database" in refused.stderr
        finally:
            holder.kill()
            await holder.wait()
        deadline = time.monotonic() + 10  # PostgreSQL ends the session once it sees it lost
        after = rebuild_now(database_url)
        while "another rebuild" in after.stderr and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            after = rebuild_now(database_url)
        assert after.returncode == 0, after.stderr
        assert (json.loads(after.stdout)["signals"], after.stderr) == (3, "")
    finally:
        server.stop()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_swap_that_cannot_lock_the_log_gives_up_in_one_line(database_url: str) -> None:
    """The swap locks the row that every append locks. Held elsewhere (a session left in a
    transaction), the swap would wait for as long, and every append with it, queued behind
    the swap: it gives up after a commit timeout instead, in one line, and changes nothing."""
    server = ServerProcess(database_url).start()
    admin = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            await post(client, {"ticker": "OLD", "action": "buy"})
        async with admin.transaction():
            await admin.execute("SELECT position FROM log_head FOR UPDATE")
            swap = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "pipeline", "rebuild", "--swap",
                                 "--database-url", database_url],
                capture_output=True, text=True, timeout=30, check=False,
                env={**os.environ, "SIGNALBOX_COMMIT_TIMEOUT": "1"})
        assert swap.returncode == 1, swap.stdout + swap.stderr
        assert "Traceback" not in swap.stderr and len(swap.stderr.splitlines()) == 1
        assert "lock" in swap.stderr and "swapped" not in swap.stdout
        code, check = await run_rebuild(database_url)
        assert (code, check["difference_count"], check["signals"]) == (0, 0, 1)
    finally:
        await admin.close()
        server.stop()
