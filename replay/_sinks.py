"""Where ``signalbox replay`` puts the events it reads: one sink per mode.

* :class:`Emit`: JSON lines, one event per line as the API gives it, to stdout or a file;
* :class:`Post`: each event POSTed as JSON to a URL, with the event id as ``Idempotency-Key``;
* :class:`DryRun`: each ``signal.accepted`` run through a handler as the live runner would, the
  outcome beside what the live log recorded, one JSON line per signal in a report file.

A sink's ``state`` goes into the replay's checkpoint (how many bytes of its file are complete,
its counts), and comes back to it when an interrupted replay resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
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
from replay._http import USER_AGENT, Backoff
from replay.sources import Source

POST_ATTEMPTS = 8


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
    """JSON lines to stdout or a file. A file resumed from a checkpoint is cut back to the size
    the checkpoint recorded, so that lines written after it (by a run that was killed before
    it could save its checkpoint) are not there twice."""

    def __init__(self, path: Path | None, resume: dict[str, Any] | None, *,
                 flush_each: bool) -> None:
        self.path = path
        self.flush_each = flush_each
        self.file: BinaryIO
        if path is None:
            self.file = sys.stdout.buffer
            return
        size = resume.get("bytes") if resume and resume.get("path") == str(path.resolve()) else None
        if isinstance(size, int) and path.exists():
            self.file = path.open("r+b")
            self.file.truncate(size)
            self.file.seek(size)
        else:
            self.file = path.open("ab" if resume else "wb")

    def write(self, line: str) -> None:
        self.file.write(line.encode() + b"\n")
        if self.flush_each:
            self.file.flush()

    def state(self) -> dict[str, Any]:
        self.file.flush()
        if self.path is None:
            return {}
        return {"path": str(self.path.resolve()), "bytes": self.file.tell()}

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
    """POST each event; retry a lost connection or a 5xx with backoff; stop on a 4xx."""

    def __init__(self, url: str, resume: dict[str, Any], *, backoff: Backoff | None = None,
                 timeout: float = 10.0) -> None:
        self.url = url
        self.count = int(resume.get("count", 0))
        self.backoff = backoff or Backoff(base=0.2, cap=10.0)
        self.http = httpx.AsyncClient(timeout=timeout, headers={"User-Agent": USER_AGENT})

    async def prepare(self, page: list[Event]) -> None:
        return None

    async def put(self, event: Event) -> None:
        headers = {"Content-Type": "application/json", "Idempotency-Key": event.id}
        reason = ""
        for attempt in range(POST_ATTEMPTS):
            try:
                response = await self.http.post(self.url, content=event.json.encode(),
                                                headers=headers)
            except httpx.TransportError as exc:
                reason = repr(exc)
            else:
                if 200 <= response.status_code < 300:
                    self.count += 1
                    return
                if response.status_code < 500:
                    raise ReplayError(
                        f"{self.url} refused the event at position {event.position} "
                        f"(HTTP {response.status_code}: {response.text[:200].strip()}): fix "
                        "the receiver, then run again with the same --checkpoint to go on")
                reason = f"HTTP {response.status_code}"
            await asyncio.sleep(self.backoff.delay(attempt))
        raise ReplayError(f"could not deliver the event at position {event.position} to "
                          f"{self.url} in {POST_ATTEMPTS} attempts (last: {reason})")

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
