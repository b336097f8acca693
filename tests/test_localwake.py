"""Processes serving one SQLite file wake each other after their commits (datagrams between
them), so that a subscriber of one sees another's commits long before its poll."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from pipeline.log.localwake import LocalWakeups, meeting_place
from tests.support import (
    INGEST_TOKEN,
    ServerProcess,
    headers,
    next_frame,
    ws_connect,
)

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}
SLOW_POLL = {"SIGNALBOX_POLL_INTERVAL": "60"}


@pytest.fixture
def base() -> Iterator[Path]:
    """A short directory of the test's own for the sockets: a Unix socket's path holds at most
    107 bytes, which pytest's temporary directories can pass, and the processes would then
    meet in /tmp, shared with everything else."""
    folder = Path(tempfile.mkdtemp(prefix="sbx-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


class Heard:
    """What a :class:`LocalWakeups` was woken with, and an event set on each wake-up."""

    def __init__(self) -> None:
        self.heads: list[int | None] = []
        self.woken = asyncio.Event()

    def __call__(self, head: int | None) -> None:
        self.heads.append(head)
        self.woken.set()

    async def next(self, within: float = 5.0) -> int | None:
        await asyncio.wait_for(self.woken.wait(), within)
        self.woken.clear()
        return self.heads[-1]


async def test_a_commit_announced_by_one_process_wakes_the_others(tmp_path: Path,
                                                                  base: Path) -> None:
    database = tmp_path / "log.db"
    heard = [Heard() for _ in range(3)]
    first, second = (LocalWakeups(database, heard[i], base=base) for i in range(2))
    await first.start()
    assert await heard[0].next() is None  # started: look at the log once
    await second.start()
    assert await heard[1].next() is None
    # The newcomer said hello: the first knows it before listing the directory again.
    first.announce(7)
    assert await heard[1].next() == 7
    second.announce(9)
    assert await heard[0].next() == 9
    # A third, and a process of another database, which must hear nothing.
    third = LocalWakeups(database, heard[2], base=base)
    elsewhere_heard = Heard()
    elsewhere = LocalWakeups(tmp_path / "other.db", elsewhere_heard, base=base)
    await third.start()
    await elsewhere.start()
    assert await heard[2].next() is None
    assert await elsewhere_heard.next() is None
    first.announce(12)
    assert await heard[1].next() == 12
    assert await heard[2].next() == 12
    # Announcements go to the processes of the same file, and never to oneself.
    assert elsewhere.place != first.place
    assert sorted(first.peers) == sorted(str(first.place / w.name) for w in (second, third))
    assert not elsewhere_heard.woken.is_set()
    # One that stops is forgotten; the others go on.
    await second.stop()
    assert not (first.place / second.name).exists()
    third.announce(15)
    assert await heard[0].next() == 15
    assert str(second.place / second.name) not in third.peers
    for wakeups in (first, third, elsewhere):
        await wakeups.stop()
    # The last to leave removes the meeting place.
    assert not first.place.exists() and not elsewhere.place.exists()


async def test_processes_meet_under_tmp_when_the_temporary_directory_is_too_long(
        tmp_path: Path, base: Path) -> None:
    """A Unix socket's path holds at most 107 bytes: with a long ``TMPDIR`` the processes meet
    under /tmp instead of falling back, every one of them, to their poll interval."""
    long_base = base / ("a-long-temporary-directory-" * 4)
    long_base.mkdir()
    database = tmp_path / "log.db"
    place = meeting_place(database, long_base)
    assert place.parent.parent == Path("/tmp")
    assert place == meeting_place(database, base / "another-long-one" / ("x" * 80))
    heard = [Heard(), Heard()]
    first, second = (LocalWakeups(database, heard[i], base=long_base) for i in range(2))
    try:
        for wakeups, its in zip((first, second), heard, strict=True):
            await wakeups.start()
            assert await its.next() is None  # bound, not fallen back to polling
        first.announce(7)
        assert await heard[1].next() == 7
        second.announce(9)
        assert await heard[0].next() == 9
    finally:
        await first.stop()
        await second.stop()
    assert not place.exists()


async def test_sockets_of_dead_processes_are_removed_and_a_shared_place_is_refused(
        tmp_path: Path, base: Path, caplog: pytest.LogCaptureFixture) -> None:
    database = tmp_path / "log.db"
    place = meeting_place(database, base)
    place.mkdir(parents=True, mode=0o700)
    ended = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await ended.wait()
    dead = ended.pid
    (place / f"{dead}-00000000").touch()  # what a killed process leaves
    heard = Heard()
    wakeups = LocalWakeups(database, heard, base=base)
    await wakeups.start()
    assert sorted(p.name for p in place.iterdir()) == [wakeups.name]
    await wakeups.stop()
    assert not place.exists()

    place.mkdir(mode=0o777)
    place.chmod(0o777)  # anyone could put a socket here: not a place to meet
    refused = LocalWakeups(database, heard, base=base)
    await refused.start()
    assert "not a private directory" in caplog.text
    refused.announce(3)  # a no-op, not an error
    await refused.stop()
    assert list(place.iterdir()) == []


async def events_until(conn: ClientConnection, head: int, within: float = 10) -> list[int]:
    positions: list[int] = []
    while not positions or positions[-1] < head:
        frame = await next_frame(conn, within)
        if frame["op"] == "event":
            positions.append(frame["position"])
    return positions


async def subscribed(server: ServerProcess) -> ClientConnection:
    conn = await ws_connect(server, cursor=None)
    assert (await next_frame(conn))["op"] == "welcome"
    assert (await next_frame(conn))["op"] == "live"
    return conn


async def post(server: ServerProcess) -> int:
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        posted = await client.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
        assert posted.status_code == 202, posted.text
        position: int = posted.json()["position"]
        return position


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_servers_of_one_sqlite_file_see_each_others_commits_long_before_their_poll(
        database_url: str) -> None:
    """With a 60 s poll, only the wake-ups can bring another process's events within 10 s:
    between two servers, to a third that starts later and from it, and after one is killed."""
    first = ServerProcess(database_url, env=SLOW_POLL).start()
    second = ServerProcess(database_url, env=SLOW_POLL, args=["--no-migrate"]).start()
    servers = [first, second]
    try:
        watching_first = await subscribed(first)
        for _ in range(2):
            head = await post(second)
            assert await events_until(watching_first, head) == [head - 1, head]
        third = ServerProcess(database_url, env=SLOW_POLL, args=["--no-migrate"]).start()
        servers.append(third)
        watching_third = await subscribed(third)
        head = await post(first)
        assert await events_until(watching_third, head) == [head - 1, head]
        head = await post(third)
        assert await events_until(watching_first, head) == [head - 3, head - 2, head - 1, head]
        assert await events_until(watching_third, head) == [head - 1, head]

        second.kill()  # leaves its socket behind
        place = meeting_place(Path(database_url.split("///", 1)[1]))
        assert second.process is not None
        assert any(p.name.startswith(f"{second.process.pid}-") for p in place.iterdir())
        head = await post(third)
        for conn in (watching_first, watching_third):
            assert await events_until(conn, head) == [head - 1, head]
        fourth = ServerProcess(database_url, env=SLOW_POLL, args=["--no-migrate"]).start()
        servers.append(fourth)
        assert not any(p.name.startswith(f"{second.process.pid}-") for p in place.iterdir())
        head = await post(fourth)
        for conn in (watching_first, watching_third):
            assert await events_until(conn, head) == [head - 1, head]
        await watching_first.close()
        await watching_third.close()
    finally:
        for server in reversed(servers):
            if server.process is not None and server.process.poll() is None:
                server.stop()
