"""The handler runner: consumes accepted signals from the log and runs the in-process handler.

Guarantees:

* Signals of one ticker are handled in log order, one at a time; different tickers run
  concurrently (up to ``concurrency``).
* Before the handler runs, the runner claims the signal (``signal.processing``, consumer
  ``handler:<name>``) through the same rules as any bot, so a signal that someone else claimed
  or finished is never run again.
* The outcome (``signal.processed`` / ``failed`` / ``expired``) and the runner's checkpoint
  commit in one transaction. The checkpoint is the low-water mark: every accepted signal at or
  before it is finished. After a restart the runner resumes there; signals past it that it had
  already finished are skipped (their status is final), and the ones it had claimed but not
  finished are run again, since the crash may have come before the handler acted: the status
  events record each signal once, and ``forward`` sends the signal id as ``Idempotency-Key`` so
  that receivers can drop a repeat.
* With several instances on one database, a lease decides which one runs the handler; the
  others stand by and take over (from the checkpoint, re-running the unfinished claims) when
  the holder stops renewing it. A holder that cannot renew it in time cancels its handlers
  and claims nothing more before the lease can pass. Every write it makes (claim, outcome,
  checkpoint) is fenced by the lease: one that would commit once another instance holds the
  lease, or once it has lapsed, is refused, and the runner stands by.
* A handler error is retried with exponential backoff and full jitter up to ``attempts``;
  :class:`PermanentError` fails at once. A signal past its ``max_lag`` when processing would
  start becomes ``expired`` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from enum import Enum
from typing import Any, TypeVar

from pipeline.errors import IllegalTransition, LogUnavailable
from pipeline.hub import Hub
from pipeline.log import Event, EventFilter, EventLog, NewEvent, Transaction, utc_now
from pipeline.processing.attempts import (
    EXPIRED_DETAIL,
    AttemptPolicy,
    failure,
    is_expired,
    run_handler,
)
from pipeline.processing.consumers import stage_position, start_position, stored_position
from pipeline.processing.handlers import Handler
from pipeline.processing.lease import Lease, LeaseLost
from pipeline.processing.projection import (
    SIGNAL_HINT,
    SignalRows,
    Status,
    check_transition,
    fold,
    stream_of,
)
from pipeline.signals import Signal
from pipeline.tasks import cancel_all

log = logging.getLogger("signalbox.runner")
T = TypeVar("T")
ACCEPTED = EventFilter(types=("signal.accepted",))
# Of the handler lease: how often the holder renews it, how long it waits for one renewal,
# and how long before the lease could lapse it stops running (for the instances' clocks, and
# for the cancelled handlers to stop).
RENEW_EVERY = 1 / 3
RENEW_WITHIN = 1 / 4
MARGIN = 1 / 10


class Decision(Enum):
    RUN = "run"  # claimed now, or claimed by this runner before a restart
    SKIP = "skip"  # final already, or someone else's claim
    EXPIRE = "expire"


class HandlerRunner:
    def __init__(self, event_log: EventLog, hub: Hub, name: str, handler: Handler, *,
                 options: Mapping[str, Any] | None = None, attempts: int = 5,
                 backoff: float = 0.5, backoff_cap: float = 30.0, timeout: float = 30.0,
                 concurrency: int = 8, max_pending: int = 1000,
                 default_max_lag: int | None = None, lease_ttl: float = 10.0) -> None:
        self.log = event_log
        self.hub = hub
        self.consumer = f"handler:{name}"
        self.handler = handler
        self.policy = AttemptPolicy(attempts, backoff, backoff_cap, timeout, dict(options or {}))
        self.backoff = backoff  # also between tries of a log that is unavailable
        self.backoff_cap = backoff_cap
        self.max_pending = max_pending
        self.default_max_lag = default_max_lag
        self._slots = asyncio.Semaphore(concurrency)
        self._lanes: dict[str, deque[Event]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: set[int] = set()
        self._finished = asyncio.Event()
        self._covered = 0
        self._stored = 0
        self._task: asyncio.Task[None] | None = None
        self.lease = Lease(event_log, self.consumer, ttl=lease_ttl)
        self._holder: asyncio.Task[None] | None = None
        self._fenced = asyncio.Event()  # a write was refused: stand by (see _hold)

    @property
    def running(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        await start_position(self.log, self.consumer, self.hub.head)
        self._holder = asyncio.create_task(self._hold(), name=f"signalbox-lease-{self.consumer}")

    async def stop(self) -> None:
        await cancel_all(self._holder)
        self._holder = None
        was_running = self.running
        await self._halt()
        if was_running:
            with contextlib.suppress(LogUnavailable):
                await self.lease.release()  # let a sibling take over without waiting

    async def _hold(self) -> None:
        """Keep the lease while running; run only while it is surely ours.

        A renewal stores an expiry ``ttl`` after a moment later than the one noted here
        before sending it, so the runner counts from that note, on its own clock: ``MARGIN``
        of the lease before the last confirmed renewal could lapse, it stops running (its
        handlers cancelled, nothing more claimed), whatever a renewal still on its way is
        doing. Each renewal gets ``RENEW_WITHIN`` of the lease, and no wait outlasts that
        moment. A write refused by the lease's fence (the lease passed on sooner than this
        count says: another instance's clock runs ahead, say) stops it at once.
        """
        ttl = self.lease.ttl
        until = 0.0  # the loop time by which to have stopped, unless renewed since
        while True:
            sent = loop_time()
            if self.running and self._fenced.is_set():
                log.warning("%s: a write was refused, the lease is another's or has lapsed; "
                            "standing by", self.consumer)
                await self._halt()
            elif self.running and sent >= until:
                log.warning("%s: lease not renewed in time, standing by", self.consumer)
                await self._halt()
            within = ttl * RENEW_WITHIN
            held = await self._renew(min(within, until - sent) if self.running else within)
            if held:
                until = sent + ttl * (1 - MARGIN)
                if not self.running:
                    with contextlib.suppress(TimeoutError, LeaseLost):  # tried again below
                        await asyncio.wait_for(self._begin(), until - loop_time())
            elif held is False and self.running:
                log.warning("%s: lease lost, standing by", self.consumer)
                await self._halt()
            wake = sent + ttl * RENEW_EVERY
            if self.running:
                wake = min(wake, until)
            delay = max(0.0, wake - loop_time())
            if self.running:  # or until a write is refused
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._fenced.wait(), delay)
            else:
                await asyncio.sleep(delay)

    async def _renew(self, within: float) -> bool | None:
        """Take or renew the lease: True if done, False if another instance holds it, None if
        the log did not say within ``within`` seconds."""
        try:
            return await asyncio.wait_for(self.lease.acquire(), max(0.0, within))
        except (LogUnavailable, TimeoutError):
            return None

    async def _begin(self) -> None:
        self._fenced.clear()  # what the last run was refused is no concern of this one
        stored = await stored_position(self.log.engines.reader, self.consumer)
        if stored is None:  # set at start; gone only if someone deleted it
            stored = self.hub.head
            await self._save_checkpoint(stored)
        self._covered = self._stored = stored
        self._pending.clear()
        self._task = asyncio.create_task(self._run(), name=f"signalbox-{self.consumer}")

    async def _halt(self) -> None:
        await cancel_all(self._task, *self._tasks)
        self._task = None
        self._lanes.clear()
        self._pending.clear()

    # -- reading and scheduling --------------------------------------------------------------

    async def _run(self) -> None:
        with contextlib.suppress(LeaseLost):  # _hold stands by
            await self._follow()

    async def _follow(self) -> None:
        while True:
            while len(self._pending) >= self.max_pending:
                self._finished.clear()
                await self._finished.wait()
            changed = self.hub.changed
            try:
                page = await self.hub.page(self._covered, ACCEPTED, 200)
            except LogUnavailable:
                await asyncio.sleep(self.backoff)
                continue
            for event in page.events:
                self._schedule(event)
            self._covered = max(self._covered, page.covered)
            if self._covered >= self.hub.head:
                if not self._pending and self._covered > self._stored:
                    await self._save_checkpoint(self._covered)
                await changed.wait()

    def _schedule(self, event: Event) -> None:
        self._pending.add(event.position)
        key = event.ticker or event.stream
        lane = self._lanes.get(key)
        if lane is not None:
            lane.append(event)
            return
        lane = self._lanes[key] = deque([event])
        task = asyncio.create_task(self._drain(key, lane))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, key: str, lane: deque[Event]) -> None:
        try:
            while lane:
                async with self._slots:
                    try:
                        await self._process(lane[0])
                    except LeaseLost:
                        raise  # not the signal's fault: _hold stands by
                    except Exception as exc:  # a bug or a malformed event: fail it, go on
                        log.exception("runner failed on event %s", lane[0].position)
                        await self._finish(lane[0], Status.FAILED, failure(exc, 0))
                lane.popleft()
        except LeaseLost:
            pass  # the lane stops here; its signals stay pending for whoever runs next
        finally:
            del self._lanes[key]

    # -- one signal --------------------------------------------------------------------------

    async def _process(self, event: Event) -> None:
        signal = Signal.model_validate(event.data["signal"])
        async def claim(tx: Transaction) -> Decision:
            return await self._claim(tx, event, signal)

        decision = await self._commit(claim, event.data["signal_id"])
        if decision is Decision.SKIP:
            await self._finish(event, None, {})
        elif decision is Decision.EXPIRE:
            await self._finish(event, Status.EXPIRED, dict(EXPIRED_DETAIL))
        else:
            status, detail = await run_handler(self.handler, event, signal, self.policy)
            await self._finish(event, status, detail)

    async def _claim(self, tx: Transaction, event: Event, signal: Signal) -> Decision:
        rows = SignalRows(tx)
        row = await rows.get(event.data["signal_id"])
        if row is None:
            return Decision.SKIP
        if row["status"] == Status.PROCESSING and row["claimed_by"] == self.consumer:
            return Decision.RUN  # our own claim from before a restart: finish the job
        if row["status"] not in (Status.ACCEPTED, Status.DISPATCHED):
            return Decision.SKIP
        if is_expired(signal, self.default_max_lag, utc_now()):
            return Decision.EXPIRE
        claim = tx.append(self._status_event(event, row, Status.PROCESSING,
                                             {}, row["attempts"] + 1))
        rows.update(fold(row, claim))
        return Decision.RUN

    async def _finish(self, event: Event, status: Status | None,
                      detail: dict[str, Any]) -> None:
        """The outcome and the checkpoint, in one transaction."""
        checkpoint = self._checkpoint_without(event.position)

        async def unit(tx: Transaction) -> None:
            if status is not None:
                rows = SignalRows(tx)
                row = await rows.get(event.data["signal_id"])
                try:
                    if row is None:
                        raise IllegalTransition("the signal is gone")
                    check_transition(row, status, self.consumer)
                except IllegalTransition as exc:  # changed under us: record nothing, move on
                    log.warning("not recording %s for %s: %s", status.value, event.position, exc)
                else:
                    done = tx.append(self._status_event(event, row, status, detail,
                                                        row["attempts"]))
                    rows.update(fold(row, done))
            self._stage_checkpoint(tx, checkpoint)

        await self._commit(unit, event.data["signal_id"] if status is not None else None)
        self._pending.discard(event.position)
        self._finished.set()

    def _checkpoint_without(self, position: int) -> int:
        rest = self._pending - {position}
        return min(rest) - 1 if rest else self._covered

    async def _save_checkpoint(self, position: int) -> None:
        async def unit(tx: Transaction) -> None:
            self._stage_checkpoint(tx, position)

        await self._commit(unit)

    def _stage_checkpoint(self, tx: Transaction, position: int) -> None:
        stage_position(tx, self.consumer, position)
        self._stored = max(self._stored, position)

    def _status_event(self, event: Event, row: dict[str, Any], status: Status,
                      detail: dict[str, Any], attempt: int) -> NewEvent:
        signal_id = event.data["signal_id"]
        return NewEvent(
            stream_of(signal_id), f"signal.{status.value}",
            {"signal_id": signal_id, "status": status.value, "detail": detail,
             "consumer": self.consumer, "attempt": attempt, "token": None},
            {k: v for k, v in (("signal_id", signal_id), ("ticker", row["ticker"]),
                               ("strategy", row["strategy"])) if v is not None},
        )

    async def _commit(self, unit: Callable[[Transaction], Awaitable[T]],
                      signal_id: str | None = None) -> T:
        """Run ``unit`` in a group commit as the lease's holder, retrying while the log is
        unavailable; it reads the row of ``signal_id``, if given.

        Raises :class:`LeaseLost`, having written nothing, if the lease is not ours when the
        commit comes, or once another write was refused so (until ``_hold`` has stopped
        the run): no write of a run that lost its lease lands after one that was refused."""
        delay = self.backoff
        hints = None if signal_id is None else {SIGNAL_HINT: signal_id}
        while True:
            if self._fenced.is_set():
                raise LeaseLost("another write of this run was refused")
            try:
                return await self.lease.transact(unit, hints)
            except LeaseLost:
                self._fenced.set()
                raise
            except LogUnavailable:
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(self.backoff_cap, delay * 2)


def loop_time() -> float:
    return asyncio.get_running_loop().time()
