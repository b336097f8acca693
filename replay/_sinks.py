"""Where ``signalbox replay`` puts the events it reads: one sink per mode.

* :class:`Emit`: JSON lines, one event per line as the API gives it, to stdout or a file;
* :class:`Post`: each event POSTed as JSON to a URL, with the event id as ``Idempotency-Key``,
  sent again as the receiver asks;
* :class:`DryRun`: each ``signal.accepted`` run through a handler as the live runner would, the
  outcome beside what the live log recorded, one JSON line per signal in a report file.

A sink's ``state`` goes into the replay's checkpoint (how many bytes of its file are complete,
its counts), and comes back to it when an interrupted replay resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import httpx

from pipeline.log.model import Event, canonical_json
from pipeline.processing.attempts import (
    EXPIRED_DETAIL,
    AttemptPolicy,
    failure,
    is_expired,
    run_handler,
)
from pipeline.processing.handlers import Handler
from pipeline.processing.projection import FINAL, Status
from pipeline.signals import Signal
from replay._http import AUTH_FAILURES, USER_AGENT, Backoff, TooManyRequests, retry_wait
from replay.sources import Source

POST_MAX_WAIT = 60.0  # the longest wait a receiver may ask for (Retry-After) and get
POST_PATIENCE = 120.0  # how long one event is sent again before the replay stops
SERVER_ERRORS = frozenset(range(500, 600))  # each sent again, as after a lost connection


class ReplayError(Exception):
    """A replay that cannot go on; ``exit_code`` 1 (an error) or 2 (bad usage)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class Sink(Protocol):
    async def prepare(self, page: list[Event]) -> None:
        """Called with each page before its events are put, one by one."""

    async def put(self, event: Event) -> None: ...

    def state(self) -> dict[str, Any]:
        """Everything put so far is complete (flushed): what the checkpoint keeps of it."""

    def summary(self) -> str | None:
        """The line printed at the end (None: nothing, e.g. when the events went to stdout)."""

    async def close(self) -> None: ...


class LineFile:
    """JSON lines to stdout or a file. A file resumed from a checkpoint (``resume``, the state
    it saved) is cut back to the size the checkpoint recorded, so that lines written after it
    (by a run that was killed before it could save its checkpoint) are not there twice; a file
    that is gone, or shorter than that, is not the one the checkpoint goes on, and is refused
    (that the checkpoint is of this very path, `Checkpoint` has checked)."""

    def __init__(self, path: Path | None, resume: dict[str, Any] | None, *,
                 flush_each: bool, checkpoint: Path | None = None) -> None:
        self.path = path
        self.flush_each = flush_each
        self.file: BinaryIO
        if path is None:
            self.file = sys.stdout.buffer
            return
        if resume is None:
            self.file = path.open("wb")
            return
        size = resume.get("bytes")
        if not isinstance(size, int) or not path.is_file() or path.stat().st_size < size:
            raise ReplayError(f"{path} is not the file the checkpoint {checkpoint} goes on "
                              f"(it is gone, or shorter than the {size} bytes written to it): "
                              "put that file back, or give another --checkpoint file to start "
                              "afresh")
        self.file = path.open("r+b")
        self.file.truncate(size)
        self.file.seek(size)

    def write(self, line: str) -> None:
        self.file.write(line.encode() + b"\n")
        if self.flush_each:
            self.file.flush()

    def state(self) -> dict[str, Any]:
        self.file.flush()
        if self.path is None:
            return {}
        return {"bytes": self.file.tell()}

    def close(self) -> None:
        if self.path is None:
            with contextlib.suppress(BrokenPipeError):
                self.file.flush()
        else:
            self.file.close()


class Emit:
    def __init__(self, out: LineFile, resume: dict[str, Any]) -> None:
        self.out = out
        self.count = int(resume.get("count", 0))

    async def prepare(self, page: list[Event]) -> None:
        return None

    async def put(self, event: Event) -> None:
        self.out.write(event.json)
        self.count += 1

    def state(self) -> dict[str, Any]:
        return {**self.out.state(), "count": self.count}

    def summary(self) -> str | None:
        if self.out.path is None:
            return None
        return f"wrote {self.count:,} events to {self.out.path}"

    async def close(self) -> None:
        self.out.close()


class Post:
    """POST each event. A lost connection, a 5xx or a 429 is sent again, after the wait the
    receiver asks for (`retry_wait`, the client library's rule: its ``Retry-After``, else a
    backoff); another 4xx, a wait asked over ``max_wait``, or an event still not taken after
    ``patience`` seconds stops the replay, which a run with the same checkpoint goes on."""

    def __init__(self, url: str, resume: dict[str, Any], *, backoff: Backoff | None = None,
                 timeout: float = 10.0, max_wait: float = POST_MAX_WAIT,
                 patience: float = POST_PATIENCE) -> None:
        self.url = url
        self.count = int(resume.get("count", 0))
        self.backoff = backoff or Backoff(base=0.2, cap=10.0)
        self.max_wait = max_wait
        self.patience = patience
        self.http = httpx.AsyncClient(timeout=timeout, headers={"User-Agent": USER_AGENT})

    async def prepare(self, page: list[Event]) -> None:
        return None

    async def put(self, event: Event) -> None:
        started = time.monotonic()
        for attempt in itertools.count():
            outcome = await self._send(event)
            if isinstance(outcome, httpx.Response) and outcome.is_success:
                self.count += 1
                return
            wait = self._wait(outcome, attempt, event)
            spent = time.monotonic() - started
            if spent + wait > self.patience:
                last = (f"HTTP {outcome.status_code}" if isinstance(outcome, httpx.Response)
                        else repr(outcome))
                raise ReplayError(
                    f"{self.url} did not take the event at position {event.position} in "
                    f"{attempt + 1} attempts over {spent:.0f} s (last: {last}): run again "
                    "with the same --checkpoint to go on")
            await asyncio.sleep(wait)

    async def _send(self, event: Event) -> httpx.Response | Exception:
        headers = {"Content-Type": "application/json", "Idempotency-Key": event.id}
        try:
            return await self.http.post(self.url, content=event.json.encode(),
                                        headers=headers)
        except httpx.TransportError as exc:
            return exc

    def _wait(self, outcome: httpx.Response | Exception, attempt: int, event: Event) -> float:
        """Seconds to wait before sending ``event`` again; raise when waiting cannot help."""
        try:
            wait = retry_wait(outcome, attempt, backoff=self.backoff,
                              max_retry_after=self.max_wait, unavailable=SERVER_ERRORS)
        except TooManyRequests as exc:
            if exc.code == AUTH_FAILURES:  # a wrong token, not a rate: refused as any 4xx
                wait = None
            else:  # a wait over max_wait
                raise ReplayError(
                    f"{self.url} asked to wait {exc.retry_after or 0:.0f} s before it takes "
                    f"the event at position {event.position}, over the {self.max_wait:.0f} s "
                    "a replay waits: run again later with the same --checkpoint to go on"
                ) from None
        if wait is None:
            assert isinstance(outcome, httpx.Response)
            raise ReplayError(
                f"{self.url} refused the event at position {event.position} "
                f"(HTTP {outcome.status_code}: {outcome.text[:200].strip()}): fix "
                "the receiver, then run again with the same --checkpoint to go on")
        return wait

    def state(self) -> dict[str, Any]:
        return {"count": self.count}

    def summary(self) -> str | None:
        return f"posted {self.count:,} events to {self.url}"

    async def close(self) -> None:
        await self.http.aclose()


class DryRun:
    """Each accepted signal through ``handler``, as the live runner would run it; nothing is
    written to the log. Signals run one at a time, in log order."""

    def __init__(self, name: str, handler: Handler, policy: AttemptPolicy, *,
                 default_max_lag: int | None, source: Source, report: LineFile,
                 resume: dict[str, Any]) -> None:
        self.name = name
        self.handler = handler
        self.policy = policy
        self.default_max_lag = default_max_lag
        self.source = source
        self.report = report
        self.counts: Counter[str] = Counter(resume.get("counts") or {})
        self.live: dict[str, Event] = {}

    async def prepare(self, page: list[Event]) -> None:
        self.live = await self.source.statuses({e.data["signal_id"]: e.position for e in page})

    async def put(self, event: Event) -> None:
        signal_id = event.data["signal_id"]
        status, detail = await self._outcome(event)
        live = _live(self.live.get(signal_id))
        if live["status"] not in FINAL:
            verdict = "live_unfinished"
        else:
            verdict = "same" if live["status"] == status.value else "different"
        self.counts.update((status.value, verdict))
        self.report.write(json.dumps({
            "position": event.position, "signal_id": signal_id, "ticker": event.ticker,
            "strategy": event.strategy,
            # Keys in the log's order, so that equal details read the same as the live ones.
            "replay": {"status": status.value, "detail": json.loads(canonical_json(detail))},
            "live": live, "same": verdict == "same",
        }, ensure_ascii=False, separators=(",", ":")))

    async def _outcome(self, event: Event) -> tuple[Status, dict[str, Any]]:
        try:
            signal = Signal.model_validate(event.data["signal"])
            # The live runner checks max_lag when it starts; here that is when it was accepted.
            if is_expired(signal, self.default_max_lag, datetime.fromisoformat(event.time)):
                return Status.EXPIRED, dict(EXPIRED_DETAIL)
            return await run_handler(self.handler, event, signal, self.policy)
        except Exception as exc:  # a malformed event: failed, as the runner would record it
            return Status.FAILED, failure(exc, 0)

    def state(self) -> dict[str, Any]:
        return {**self.report.state(), "counts": dict(sorted(self.counts.items()))}

    def summary(self) -> str | None:
        c = self.counts
        total = c["processed"] + c["failed"] + c["expired"]
        return (f"replayed {total:,} signals through {self.name}: {c['processed']:,} processed, "
                f"{c['failed']:,} failed, {c['expired']:,} expired\n"
                f"against the live log: {c['same']:,} same status, {c['different']:,} "
                f"different, {c['live_unfinished']:,} not finished there\n"
                f"report: {self.report.path}")

    async def close(self) -> None:
        self.report.close()


def _live(event: Event | None) -> dict[str, Any]:
    """What the live log recorded last for a signal (``accepted``: no status since)."""
    if event is None:
        return {"status": Status.ACCEPTED.value}
    return {"status": event.data.get("status"), "detail": event.data.get("detail"),
            "consumer": event.data.get("consumer"), "position": event.position}
