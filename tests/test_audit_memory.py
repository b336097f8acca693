"""Bounded memory: ``audit verify`` and ``audit export`` over a log of 1,000,000 events, each in
a process whose peak resident memory is read from the kernel when it exits."""

from __future__ import annotations

import functools
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.log import GENESIS_HASH
from pipeline.log.model import chain_hash, format_time
from pipeline.migrate import upgrade
from tests.support import repo_root

EVENTS = 1_000_000
PEAK_LIMIT = 150 * 1024 * 1024
"""Far below the size of the log (~300 MB) or of its export: a reader that kept either would
not fit."""


START = datetime(2026, 11, 20, tzinfo=UTC)


@functools.cache
def _second(seconds: int) -> str:
    """``format_time`` of a whole second after START, without its microseconds and Z."""
    return format_time(START + timedelta(seconds=seconds)).removesuffix("000000Z")


def event_time(position: int) -> str:
    """``format_time(START + position * 100 µs)``, made from the text of its whole second."""
    seconds, micros = divmod(position * 100, 1_000_000)
    return f"{_second(seconds)}{micros:06d}Z"


def event_id(position: int) -> str:
    """The text of ``uuid.UUID(int=position, version=4)``, written out."""
    return f"00000000-0000-4000-8000-{position:012x}"


def event_rows(count: int) -> Iterator[tuple[object, ...]]:
    """Signal-shaped events (received, then accepted), chained as the log chains them; a
    signal's id, stream and meta are made once for its two events (a million rows: speed)."""
    previous = GENESIS_HASH
    signal_id = stream = meta = ""
    for position in range(1, count + 1):
        if position % 2:
            signal_id = str(uuid.UUID(int=(position + 1) // 2))
            stream = f"signal-{signal_id}"
            meta = f'{{"signal_id":"{signal_id}","ticker":"BTCUSDT"}}'
        kind = "signal.received" if position % 2 else "signal.accepted"
        data = (f'{{"n":{position},"note":"ünïcode, \\"quoted\\"","signal_id":"{signal_id}",'
                f'"ticker":"BTCUSDT"}}')
        identity, time = event_id(position), event_time(position)
        previous = chain_hash(previous, position, identity, stream, kind, data, meta, time)
        yield position, identity, stream, kind, data, meta, time, previous, "BTCUSDT", None


@pytest.mark.parametrize("position", [1, 2, 9_999, 10_000, 10_001, 599_999, 600_000,
                                      600_001, EVENTS])
def test_the_ids_and_times_written_out_are_those_of_uuid_and_format_time(
        position: int) -> None:
    assert event_id(position) == str(uuid.UUID(int=position, version=4))
    assert event_time(position) == format_time(START + timedelta(microseconds=position * 100))


@pytest.fixture(scope="module")
def million(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated SQLite log of EVENTS events, written in one transaction (built once)."""
    path = tmp_path_factory.mktemp("million") / "log.db"
    url = f"sqlite+aiosqlite:///{path}"
    upgrade(url)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO events (position, id, stream, type, data, meta, time, "
                         "hash, ticker, strategy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         event_rows(EVENTS))
        last = conn.execute("SELECT hash FROM events WHERE position = ?", (EVENTS,)).fetchone()
        conn.execute("UPDATE log_head SET position = ?, hash = ?", (EVENTS, last[0]))
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()
    yield url
    path.unlink()


def run_measured(out: Path, *args: str) -> tuple[int, int]:
    """Run ``signalbox ARGS`` with stdout to ``out``: its exit code and peak RSS in bytes.

    The peak is the child's own ``VmHWM`` (the high-water mark of its address space), read
    while it runs: it only grows, so the last reading is the peak up to then. (``ru_maxrss``
    from ``wait4`` would not do: a child started with vfork carries the parent's peak, and the
    parent here is the whole test session.)
    """
    with out.open("wb") as stdout, (out.parent / (out.name + ".err")).open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=stdout,
                                   stderr=stderr, cwd=repo_root(),
                                   env={"PATH": "/usr/bin:/bin"})
        peak = 0
        status = Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            try:
                found = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.M)
            except OSError:  # it ended between poll() and the read
                continue
            if found:
                peak = max(peak, int(found.group(1)) * 1024)
            time.sleep(0.02)
    assert peak > 0, "the child ended before its memory could be read"
    return process.returncode, peak


def count_lines(path: Path) -> int:
    with path.open("rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))


COMMANDS = {
    "verify": ["audit", "verify"],
    "jsonl": ["audit", "export", "--format", "jsonl", "--output", "{out}/events.jsonl"],
    "csv": ["audit", "export", "--format", "csv", "--output", "{out}/events.csv"],
}


@pytest.fixture(scope="module")
def runs(million: str, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[tuple[Path, dict[str, Future[tuple[int, int]]]]]:
    """The three commands over the log, started together: each is measured on its own (its
    process's own high-water mark), and side by side they finish sooner on two cores. Each
    test checks one of them: (the folder of their output, each one's exit code and peak)."""
    out = tmp_path_factory.mktemp("runs")
    with ThreadPoolExecutor(len(COMMANDS)) as pool:
        yield out, {name: pool.submit(run_measured, out / f"{name}.out",
                                      *[a.format(out=out) for a in args],
                                      "--database-url", million)
                    for name, args in COMMANDS.items()}


def test_verify_walks_a_million_events_in_bounded_memory(
        runs: tuple[Path, dict[str, Future[tuple[int, int]]]]) -> None:
    out, results = runs
    code, peak = results["verify"].result()
    assert code == 0, (out / "verify.out.err").read_text()
    assert f"verified {EVENTS:,} events" in (out / "verify.out").read_text()
    assert peak < PEAK_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize(("fmt", "header"), [("jsonl", 0), ("csv", 1)])
def test_export_writes_a_million_events_in_bounded_memory(
        runs: tuple[Path, dict[str, Future[tuple[int, int]]]], fmt: str, header: int) -> None:
    out, results = runs
    code, peak = results[fmt].result()
    assert code == 0, (out / f"{fmt}.out.err").read_text()
    # The data holds no newline, so each event is one line in both formats.
    assert count_lines(out / f"events.{fmt}") == EVENTS + header
    assert peak < PEAK_LIMIT, f"peak RSS {peak / 2**20:.0f} MiB"
