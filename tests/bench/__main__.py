"""``make bench``: every figure of docs/performance.md, measured in one run, beside its limit.

Each figure is measured by a load generator in a process of its own (``tests.bench.loadgen``)
against a server in another (``signalbox serve``, or the minimal app of ``tests.bench.minimal``
as the limit), on 127.0.0.1. Peers (``tests.bench.peers``) run in processes of their own on the
same machine in the same run, so that every ratio compares like with like.

    python -m tests.bench [--quick] [--only ingest,latency,...] [--json results.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.bench import fill
from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    ServerProcess,
    create_pg_database,
    drop_pg_database,
    repo_root,
)

SECTIONS = ("ingest", "latency", "fanout", "catchup", "memory", "scaleout", "peers")


@dataclass
class Row:
    figure: str
    value: float
    unit: str
    beside: str = ""
    beside_value: float | None = None
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if self.beside_value:
            return self.value / self.beside_value
        return None


@dataclass
class Plan:
    seconds: float
    catchup_events: int
    idle_subscribers: int
    fanout_events: int
    replay_messages: int


# Workers of `signalbox serve --workers` in the ingestion rows that have them: one per core.
WORKERS = max(2, min(os.cpu_count() or 2, 4))
MINIMAL = "limit: minimal Starlette JSON endpoint"
FLOOR = "limit: floor: group commit of the log's rows"
FLOOR_WORKERS = f"{FLOOR}, {WORKERS} workers"
API = {"SQLite": "ingest SQLite: POST /api/signals",
       "PostgreSQL": "ingest PostgreSQL: POST /api/signals",
       "workers": f"ingest SQLite, {WORKERS} workers: POST /api/signals"}
ORDER = [FLOOR, API["SQLite"], "ingest SQLite: POST /api/signals, Idempotency-Key",
         "ingest SQLite: TradingView webhook", API["PostgreSQL"],
         "ingest PostgreSQL: POST /api/signals, Idempotency-Key",
         "ingest PostgreSQL: TradingView webhook", FLOOR_WORKERS, API["workers"],
         f"ingest SQLite, {WORKERS} workers: TradingView webhook"]
TARGETED = {FLOOR, API["SQLite"], "ingest SQLite: TradingView webhook"}

FULL = Plan(seconds=5, catchup_events=1_000_000, idle_subscribers=10_000,
            fanout_events=40_000, replay_messages=1_000_000)
QUICK = Plan(seconds=2, catchup_events=100_000, idle_subscribers=1_000,
             fanout_events=8_000, replay_messages=100_000)


def loadgen(mode: str, *args: str, timeout: float = 900) -> dict[str, Any]:
    return last_json(run_module("tests.bench.loadgen", mode, *args, timeout=timeout))


def run_module(module: str, *args: str, timeout: float) -> str:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=repo_root(), text=True,
                          capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def last_json(output: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return value


@contextmanager
def minimal_server() -> Iterator[str]:
    with limit_server("tests.bench.minimal", "serve") as url:
        yield url


@contextmanager
def floor_server(workers: int = 1) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="signalbox-bench-") as folder, \
            limit_server("tests.bench.floor", "--database", f"{folder}/floor.db",
                         "--workers", str(workers)) as url:
        yield url


@contextmanager
def limit_server(module: str, *args: str) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", module, *args, "--port", str(port)],
                               cwd=repo_root())
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"the limit's server did not listen on port {port}")


@contextmanager
def signalbox(database_url: str, *args: str) -> Iterator[ServerProcess]:
    server = ServerProcess(database_url, args=list(args)).start(120)
    try:
        yield server
    finally:
        server.stop(60)


@contextmanager
def sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="signalbox-bench-") as folder:
        yield f"sqlite+aiosqlite:///{folder}/bench.db"


@contextmanager
def postgres_url() -> Iterator[str]:
    url, name = asyncio.run(create_pg_database())
    try:
        yield url
    finally:
        asyncio.run(drop_pg_database(name))


class Bench:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.rows: list[Row] = []
        self.limits: dict[str, float] = {}
        self.catchup_batch: float | None = None

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(format_row(row), flush=True)

    def post(self, url: str, path: str, token: str | None, *extra: str) -> float:
        result = loadgen("post", "--url", url, "--path", path, *token_args(token),
                         "--seconds", str(self.plan.seconds), *extra)
        return float(result["rate"])

    # -- sections ------------------------------------------------------------------------------

    def ingest(self) -> None:
        """The minimal endpoint is measured first and last, and the others against the mean
        of the two: these virtual machines change speed over minutes."""
        with minimal_server() as url:
            first = self.post(url, "/api/signals", None)
        rates = self.contenders()
        raw = last_json(run_module("tests.bench.minimal", "sqlite", "--seconds",
                                   str(self.plan.seconds), timeout=120))
        for backend, database in (("SQLite", sqlite_url), ("PostgreSQL", postgres_url)):
            with database() as db, signalbox(db) as server:
                if backend == "PostgreSQL":  # SQLite's came beside the floor's, above
                    rates[API["PostgreSQL"]] = self.post(server.base_url, "/api/signals",
                                                         ADMIN_TOKEN)
                rates[f"ingest {backend}: POST /api/signals, Idempotency-Key"] = self.post(
                    server.base_url, "/api/signals", ADMIN_TOKEN, "--keyed")
                rates[f"ingest {backend}: TradingView webhook"] = self.post(
                    server.base_url, f"/webhooks/tradingview/{INGEST_TOKEN}", None)
        with sqlite_url() as db, signalbox(db, "--workers", str(WORKERS)) as server:
            rates[f"ingest SQLite, {WORKERS} workers: TradingView webhook"] = self.post(
                server.base_url, f"/webhooks/tradingview/{INGEST_TOKEN}", None)
        with minimal_server() as url:
            last = self.post(url, "/api/signals", None)
        self.limits["endpoint"] = endpoint = (first + last) / 2
        print(f"  minimal endpoint: {first:,.0f} requests/s first, {last:,.0f} last, their mean "
              "beside the others", flush=True)
        self.add(Row(MINIMAL, endpoint, "requests/s"))
        self.add(Row("limit: raw SQLite commits (WAL, synchronous=FULL)", raw["rate"],
                     "commits/s"))
        for figure in ORDER:
            target = "≥ 50% of the limit" if figure in TARGETED else ""
            self.add(self.versus(figure, rates[figure], "signals/s", "endpoint", "minimal endpoint",
                                 target, 0.5))
        for figure, floor in ((API["SQLite"], FLOOR), (API["workers"], FLOOR_WORKERS)):
            self.add(Row(figure, rates[figure], "signals/s", beside=floor.removeprefix(
                "limit: "), beside_value=rates[floor]))

    def contenders(self, *, minimal: bool = False) -> dict[str, float]:
        """Signalbox's ingestion through the API on SQLite, one process and workers, and the
        floor beside each, one after the other; and the minimal endpoint first if asked."""
        rates = {}
        if minimal:
            with minimal_server() as url:
                rates[MINIMAL] = self.post(url, "/api/signals", None)
        for workers, figure, floor in ((1, API["SQLite"], FLOOR),
                                       (WORKERS, API["workers"], FLOOR_WORKERS)):
            with sqlite_url() as db, signalbox(db, "--workers", str(workers)) as server:
                rates[figure] = self.post(server.base_url, "/api/signals", ADMIN_TOKEN)
            with floor_server(workers) as url:
                rates[floor] = self.post(url, "/api/signals", None)
        return rates

    def latency(self) -> None:
        with sqlite_url() as db, signalbox(db) as server:
            for rate, bound in ((200, 5.0), (1000, 10.0)):
                result = loadgen("latency", "--url", server.base_url, "--token", ADMIN_TOKEN,
                                 "--rate", str(rate), "--seconds", str(self.plan.seconds * 2))
                for key in ("p50", "p99", "max"):
                    target = f"< {bound:g} ms" if key == "p99" else ""
                    met = result[key] < bound if key == "p99" else None
                    self.add(Row(f"latency at {rate}/s, send to signal.accepted: {key}",
                                 result[key], "ms", target=target, met=met))

    def fanout(self) -> None:
        counts = (1, 100, 1000)
        events = self.plan.fanout_events
        with minimal_server() as url:
            for n in counts:
                result = loadgen("fanout", "--url", url, "--path", "/publish",
                                 "--subscribers", str(n), "--messages",
                                 str(max(events // n, 100)), "--per-message", "1")
                self.limits[f"broadcast_{n}"] = float(result["rate"])
        with sqlite_url() as db, signalbox(db) as server:
            for n in counts:
                result = loadgen("fanout", "--url", server.base_url, "--token", ADMIN_TOKEN,
                                 "--subscribers", str(n), "--messages",
                                 str(max(events // n // 2, 50)), "--per-message", "2")
                target = "≥ 50% of the limit" if n == 1000 else ""
                self.add(self.versus(f"fan-out to {n} subscriber(s), delivered in total",
                                     result["rate"], "events/s", f"broadcast_{n}",
                                     "minimal broadcast", target, 0.5))

    def catchup(self) -> None:
        count = self.plan.catchup_events
        with minimal_server() as url:
            for batch in (True, False):
                result = loadgen("catchup", "--url", url, "--count", str(count),
                                 *(["--batch"] if batch else []))
                self.limits[f"replay_{batch}"] = float(result["rate"])
        with sqlite_url() as db:
            started = time.perf_counter()
            fill.sqlite_log(db, count)
            print(f"  (filled {count:,} events in {time.perf_counter() - started:.0f} s)",
                  flush=True)
            with signalbox(db) as server:
                for batch in (True, False):
                    result = loadgen("catchup", "--url", server.base_url, "--token",
                                     ADMIN_TOKEN, *(["--batch"] if batch else []))
                    rate = float(result["rate"])
                    if batch:
                        self.catchup_batch = rate
                    name = f"catch-up of {count:,} events from cursor 0, " + (
                        "batch" if batch else "a frame per message")
                    row = self.versus(name, rate, "events/s", f"replay_{batch}",
                                      "minimal WebSocket sending frames", "", 0)
                    if not batch:
                        row.target, row.met = "≥ 100,000 events/s", rate >= 100_000
                    self.add(row)

    def scaleout(self) -> None:
        """N instances on one PostgreSQL, each with its share of the 64 clients at once."""
        for n in (1, 3):
            with contextlib.ExitStack() as stack:
                db = stack.enter_context(postgres_url())
                servers = [stack.enter_context(signalbox(db)) for _ in range(n)]
                runs = [subprocess.Popen(
                    [sys.executable, "-m", "tests.bench.loadgen", "post", "--url",
                     server.base_url, "--token", ADMIN_TOKEN, "--clients", str(64 // n),
                     "--seconds", str(self.plan.seconds)],
                    cwd=repo_root(), stdout=subprocess.PIPE, text=True) for server in servers]
                total = sum(float(last_json(run.communicate(timeout=300)[0])["rate"])
                            for run in runs)
            self.limits[f"instances_{n}"] = total
            self.add(self.versus(f"ingest PostgreSQL through {n} instance(s), 64 clients",
                                 total, "signals/s", "instances_1", "one instance", "", 0))

    def memory(self) -> None:
        n = self.plan.idle_subscribers
        with sqlite_url() as db, signalbox(db) as server:
            assert server.process is not None
            process = psutil.Process(server.process.pid)
            before = process.memory_info().rss
            holder = subprocess.Popen(
                [sys.executable, "-m", "tests.bench.loadgen", "idle", "--url",
                 server.base_url, "--token", ADMIN_TOKEN, "--subscribers", str(n)],
                cwd=repo_root(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert holder.stdout is not None and holder.stdin is not None
            live = json.loads(holder.stdout.readline())
            after = process.memory_info().rss
            holder.stdin.close()
            holder.wait(120)
        per = (after - before) / live["live"] / 1024
        self.add(Row(f"memory per idle subscriber ({live['live']:,} open)", per, "KiB",
                     target="< 30 KiB", met=per < 30))
        self.add(Row("server RSS before / with them", after / 2**20, "MiB",
                     beside="before", beside_value=before / 2**20))

    def peers(self) -> None:
        """Signalbox, the floor and the minimal endpoint are measured just before and just
        after the peers, and compared by the mean of the two."""
        from tests.bench import peers  # noqa: PLC0415 - needs the bench extra

        before = self.contenders(minimal=True)
        recorder = peers.run("eventsourcing", "--seconds", str(self.plan.seconds))
        publish = peers.run("jetstream-publish", "--seconds", str(self.plan.seconds))
        after = self.contenders(minimal=True)
        against = [("eventsourcing SQLite recorder", number(recorder, "rate")),
                   ("JetStream publish, sync always, one at a time",
                    number(publish, "one_at_a_time")),
                   ("JetStream publish, sync always, 64 in flight",
                    number(publish, "in_flight_64"))]
        for figure, rate in before.items():
            value = (rate + after[figure]) / 2
            print(f"  {figure}: {rate:,.0f} before the peers, {after[figure]:,.0f} after, "
                  "their mean beside them", flush=True)
            unit = "requests/s" if figure == MINIMAL else "signals/s"
            for peer, peer_rate in against:
                self.add(Row(figure, value, unit, beside=peer, beside_value=peer_rate,
                             target="≥ 3x", met=value >= 3 * peer_rate))
        replay = peers.run("jetstream-replay", "--count", str(self.plan.replay_messages))
        if self.catchup_batch is not None:
            self.add(Row("catch-up, batch", self.catchup_batch, "events/s",
                         beside="JetStream ordered consumer", beside_value=number(replay, "rate"),
                         target="> 1x", met=self.catchup_batch > number(replay, "rate")))
        else:
            self.add(Row("JetStream ordered consumer replay", number(replay, "rate"),
                         "messages/s"))

    def versus(self, figure: str, value: float, unit: str, limit: str, label: str,  # noqa: PLR0917
               target: str, fraction: float) -> Row:
        beside = self.limits.get(limit)
        met = None if not target or beside is None else value >= fraction * beside
        return Row(figure, value, unit, label, beside, target, met)


def number(result: dict[str, object], key: str) -> float:
    value = result[key]
    if not isinstance(value, int | float):
        raise TypeError(f"{key} is not a number in {result}")
    return float(value)


def token_args(token: str | None) -> list[str]:
    return ["--token", token] if token else []


def format_row(row: Row) -> str:
    beside = f"{row.beside_value:>12,.1f}  {row.beside}" if row.beside_value else ""
    ratio = f"{row.ratio:6.2f}x" if row.ratio is not None else "       "
    verdict = {True: "met", False: "NOT MET", None: ""}[row.met]
    target = f"[{row.target}: {verdict}]" if row.target else ""
    return f"{row.figure:<62} {row.value:>12,.1f} {row.unit:<11} {ratio} {beside} {target}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench")
    parser.add_argument("--quick", action="store_true", help="shorter runs, smaller counts")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    bench = Bench(QUICK if args.quick else FULL)
    print(f"machine: {machine()}\n", flush=True)
    sections: dict[str, Callable[[], None]] = {name: getattr(bench, name) for name in SECTIONS}
    for name in args.only.split(","):
        print(f"== {name}", flush=True)
        sections[name]()
    if args.json:
        args.json.write_text(json.dumps([{**row.__dict__, "ratio": row.ratio}
                                         for row in bench.rows], indent=2))


if __name__ == "__main__":
    main()
