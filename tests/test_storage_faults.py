"""A full disk, and a database locked by someone else: 503 while it lasts, nothing
half-written, recovery by itself without a restart.

A full disk under SQLite:
The log lives on a small tmpfs made for the test; a filler file takes the rest of its space.
While signals keep arriving, commits fail: each request is answered 503 with ``Retry-After``
(never another 5xx, never an acknowledgement without a commit). Once the filler is removed the
same server, not restarted, acknowledges again; afterwards every acknowledged signal is in the
log, every received one has its verdict, and the hash chain verifies.

A lock held by another process for longer than the commit timeout: 503 with ``Retry-After``
and ``/readyz`` 503 while it is held, both back to normal once it is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from replay.audit import DatabaseSource, verify
from tests.support import INGEST_TOKEN, FastClient, ServerProcess, read_all_events, verify_chain

SIZE = "24m"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs",
                           str(mount_point)], check=False, capture_output=True, text=True)
    assert done.returncode == 0, (
        f"this test mounts a small tmpfs and needs root for it: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk`` but a few pages, in a file that can be removed."""
    filler = disk / "filler"
    with filler.open("wb") as out:
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                out.write(chunk)
                out.flush()
    # Leave a little, so that the server fails at a commit, not somewhere before it.
    with filler.open("r+b") as out:
        out.truncate(max(0, filler.stat().st_size - 3 * 65536))
    return filler


async def post(client: FastClient) -> tuple[int, dict[str, object]]:
    return await client.post(
        "/api/signals", {"ticker": "BTCUSDT", "action": "buy", "quantity": "1"},
        INGEST_TOKEN, {"Idempotency-Key": str(uuid.uuid4())})


async def test_a_full_disk_answers_503_keeps_the_log_whole_and_recovers_by_itself(
        tiny_disk: Path) -> None:
    url = f"sqlite+aiosqlite:///{tiny_disk / 'signalbox.db'}"
    server = ServerProcess(url, args=["--commit-timeout", "2"]).start()
    acknowledged: set[str] = set()
    refusals: list[tuple[int, dict[str, object]]] = []
    try:
        async with FastClient(server.base_url, connections=4) as client:
            for _ in range(20):
                status, body = await post(client)
                assert status == 202
                acknowledged.add(str(body["signal_id"]))
            filler = fill(tiny_disk)
            # Keep sending until the disk refuses: some may still fit in what was left.
            for _ in range(5000):
                status, body = await post(client)
                if status == 202:
                    acknowledged.add(str(body["signal_id"]))
                    continue
                refusals.append((status, body))
                if len(refusals) >= 5:
                    break
            assert refusals, "the disk never filled up"
            assert {status for status, _ in refusals} == {503}
            assert all(body["error"] == "log_unavailable" for _, body in refusals)
            # The server logs why before it answers; its output is read by another thread.
            deadline = asyncio.get_running_loop().time() + 10
            while not any("disk is full" in line for line in server.output):
                assert asyncio.get_running_loop().time() < deadline, "".join(server.output[-20:])
                await asyncio.sleep(0.02)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
                response = await http.post("/api/signals", json={"ticker": "X", "action": "buy"},
                                           headers={"Authorization": f"Bearer {INGEST_TOKEN}"})
            assert response.status_code == 503
            assert int(response.headers["retry-after"]) >= 1

            os.unlink(filler)
            recovered = False
            for _ in range(500):  # the same server, not restarted
                status, body = await post(client)
                if status == 202:
                    acknowledged.add(str(body["signal_id"]))
                    recovered = True
                    break
                assert status == 503
                await asyncio.sleep(0.05)
            assert recovered, "ingestion did not recover once space returned"
            for _ in range(20):
                status, body = await post(client)
                assert status == 202
                acknowledged.add(str(body["signal_id"]))

        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            events = await read_all_events(http)
        verify_chain(events)
        head = events[-1]["position"]
        assert [e["position"] for e in events] == list(range(1, head + 1))
        accepted = {e["data"]["signal_id"] for e in events if e["type"] == "signal.accepted"}
        assert acknowledged <= accepted
        received = [e for e in events if e["type"] == "signal.received"]
        assert len(received) == len(accepted)
        source = DatabaseSource(url)
        try:
            assert (await verify(source)).ok
        finally:
            await source.close()
    finally:
        server.stop()


async def until_status(get: Callable[[], Awaitable[int]], wanted: int,
                       within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while (status := await get()) != wanted:
        assert asyncio.get_running_loop().time() < deadline, f"still {status}, not {wanted}"
        await asyncio.sleep(0.05)


async def test_a_locked_database_answers_503_then_recovers_without_a_restart(
        tmp_path: Path) -> None:
    path = tmp_path / "signalbox.db"
    server = ServerProcess(f"sqlite+aiosqlite:///{path}", args=["--commit-timeout", "1"]).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            auth = {"Authorization": f"Bearer {INGEST_TOKEN}"}
            body = {"ticker": "BTCUSDT", "action": "buy", "quantity": "1"}

            async def post_status() -> int:
                return (await http.post("/api/signals", json=body, headers=auth)).status_code

            async def ready_status() -> int:
                return (await http.get("/readyz")).status_code

            assert await post_status() == 202
            holder = sqlite3.connect(path, isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")  # another process's long write transaction
            try:
                response = await http.post("/api/signals", json=body, headers=auth)
                assert response.status_code == 503
                assert response.json()["error"] == "log_unavailable"
                assert int(response.headers["retry-after"]) >= 1
                await until_status(ready_status, 503)  # once the writer gave up on the lock
                response = await http.get("/readyz")
                assert response.json()["error"] == "log_unavailable"
                assert "retry-after" in response.headers
            finally:
                holder.rollback()
                holder.close()
            await until_status(ready_status, 200)
            assert await post_status() == 202
            events = await read_all_events(http)
        verify_chain(events)
        assert sum(e["type"] == "signal.accepted" for e in events) == 2
    finally:
        server.stop()
