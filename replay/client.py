"""The Signalbox client: subscribe to the log, send signals, report what bots did with them.

The public surface (also exported by ``replay``):

- `Subscriber`: ``async for event in Subscriber(url, token, …)``: replay from a cursor, then
  live; reconnects forever with full-jitter backoff and resumes without a gap or a repeat;
  saves its checkpoint to a `CursorStore` once the caller has handled an event.
- `Client` / `SyncClient`: typed HTTP calls, retried on 502/503/504 and lost connections (with
  backoff) and on the ingestion rate's 429 (after its Retry-After) only.
- `Worker`: the bot side: claim each accepted signal, run a handler, report the outcome.
- `subscribe`: a blocking iterator for scripts without asyncio.

Every error is one of these (``code`` is the server's stable code, or the client's own)::

    SignalboxClientError                code                              HTTP / close
    ├── Unauthorized                    unauthorized                      401 / 4401
    ├── Forbidden                       forbidden, source_not_allowed     403 / 4403
    ├── NotFound                        not_found                         404
    ├── Conflict                        illegal_transition, cursor_ahead  409 / 4409
    ├── BadRequest                      bad_request, payload_too_large    400, 413, other 4xx
    ├── Rejected                        rejected (+ signal_id, position,  422
    │                                   errors)
    ├── TooManyRequests                 too_many_requests,                429, after the
    │                                   too_many_auth_failures            retries (at once
    │                                   (+ retry_after)                   for auth failures)
    ├── Unavailable                     log_unavailable, unreachable      502, 503, 504 or no
    │                                                                     connection, after
    │                                                                     the retries
    ├── EpochChanged                    epoch_changed (+ old_epoch,       4409, another epoch
    │                                   new_epoch)
    └── ProtocolError                   malformed, bad_frame, bad_answer  4400 / unreadable

Retried, never raised: 503 (and a proxy's 502 and 504) and lost connections on HTTP (up to
``retries`` times), 429
``too_many_requests`` within those retries when its Retry-After is at most
``max_retry_after``, and on the WebSocket every close but 4400/4401/4403/4409 (1001, 1006,
1011, 1013, 4408, 4429, network errors), 4429 after the ``retry_after`` it carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal as signals
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Future
from typing import Any, TypeVar

import httpx

from replay._http import (
    MAX_RETRY_AFTER,
    RETRYABLE,
    Backoff,
    BadRequest,
    Call,
    Client,
    Conflict,
    ConsumerInfo,
    ConsumerList,
    EpochChanged,
    Event,
    EventPage,
    Forbidden,
    NotFound,
    ProcessingStatus,
    ProtocolError,
    Rejected,
    SignalboxClientError,
    SignalPage,
    SignalReceipt,
    SignalSummary,
    SignalTimeline,
    StatusReceipt,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    already_reported,
    answer_json,
    as_list,
    client_headers,
    events_call,
    may_have_landed,
    parse_consumers,
    parse_page,
    parse_receipt,
    parse_signals,
    parse_status_receipt,
    parse_timeline,
    retry_delay,
    signal_call,
    signal_timeline_call,
    signals_call,
    status_call,
)
from replay._stream import (
    Checkpoint,
    Closed,
    CursorStore,
    FileCursorStore,
    Filter,
    Group,
    Item,
    MemoryCursorStore,
    Subscriber,
    SubscriberState,
)

__all__ = [
    "Backoff", "BadRequest", "Checkpoint", "Client", "Conflict", "ConsumerInfo",
    "ConsumerList", "CursorStore", "EpochChanged", "Event", "EventPage", "FileCursorStore",
    "Filter", "Forbidden", "Group", "MemoryCursorStore", "NotFound", "ProcessingStatus",
    "ProtocolError", "Rejected", "SignalPage", "SignalReceipt", "SignalSummary",
    "SignalTimeline", "SignalboxClientError", "StatusReceipt", "Subscriber",
    "SubscriberState", "Subscription", "SyncClient", "TooManyRequests", "Unauthorized",
    "Unavailable", "Worker", "subscribe",
]

log = logging.getLogger("signalbox.replay")

# -- the blocking HTTP client --------------------------------------------------------------


class SyncClient:
    """`Client` for code without asyncio: the same calls, retries and errors, blocking."""

    def __init__(self, url: str, token: str, *, retries: int = 5,
                 backoff: Backoff | None = None, timeout: float = 10.0,
                 max_retry_after: float = MAX_RETRY_AFTER,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff or Backoff()
        self.max_retry_after = max_retry_after
        self._http = httpx.Client(base_url=self.url, headers=client_headers(token),
                                  timeout=timeout, transport=transport)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, call: Call) -> tuple[httpx.Response, bool]:
        """The final answer, and whether an earlier attempt may have landed."""
        attempt, landed = 0, False
        while True:
            outcome: httpx.Response | Exception
            try:
                outcome = self._http.request(
                    call.method, call.path, params=list(call.params), content=call.body,
                    headers=dict(call.headers))
            except RETRYABLE as exc:
                outcome = exc
            delay = retry_delay(outcome, attempt, retries=self.retries, backoff=self.backoff,
                                max_retry_after=self.max_retry_after, url=self.url)
            if delay is None:
                assert isinstance(outcome, httpx.Response)
                return outcome, landed
            landed = landed or may_have_landed(outcome)
            time.sleep(delay)
            attempt += 1

    def _json(self, call: Call) -> dict[str, Any]:
        response, _ = self.send(call)
        return answer_json(response, call.ok)

    def send_signal(self, signal: Mapping[str, Any],
                    idempotency_key: str | None = None) -> SignalReceipt:
        return parse_receipt(self._json(signal_call(signal, idempotency_key)))

    def report_status(self, signal_id: str, status: ProcessingStatus | str,
                      detail: Mapping[str, Any] | None = None,
                      consumer: str | None = None) -> StatusReceipt:
        call = status_call(signal_id, status, detail, consumer)
        response, retried = self.send(call)
        if response.status_code == 409 and retried:
            receipt = already_reported(self.signal(signal_id), str(status), consumer)
            if receipt is not None:
                return receipt
        return parse_status_receipt(answer_json(response, call.ok))

    def events(self, after: int = 0, limit: int = 100, *,
               types: str | Iterable[str] | None = None,
               streams: str | Iterable[str] | None = None,
               tickers: str | Iterable[str] | None = None,
               strategies: str | Iterable[str] | None = None) -> EventPage:
        return parse_page(self._json(events_call(
            after, limit, types=as_list(types), streams=as_list(streams),
            tickers=as_list(tickers), strategies=as_list(strategies))))

    def signal(self, signal_id: str) -> SignalTimeline:
        return parse_timeline(self._json(signal_timeline_call(signal_id)))

    def signals(self, *, status: str | Iterable[str] | None = None,
                ticker: str | Iterable[str] | None = None,
                strategy: str | Iterable[str] | None = None, limit: int = 50,
                before: int | None = None) -> SignalPage:
        return parse_signals(self._json(signals_call(
            as_list(status), as_list(ticker), as_list(strategy), limit, before)))

    def consumers(self) -> ConsumerList:
        return parse_consumers(self._json(Call("GET", "/api/consumers")))


# -- the blocking subscription -------------------------------------------------------------

T = TypeVar("T")


class Subscription:
    """A blocking iterator over a `Subscriber` that runs on an event loop in a background
    thread. At most ``maxsize`` events wait in between; as with the async iterator, the
    checkpoint moves over an event only when the caller asks for the next one (or calls
    `commit`)."""

    def __init__(self, subscriber: Subscriber, maxsize: int = 100) -> None:
        self.subscriber = subscriber
        self._queue: asyncio.Queue[Item | Exception | None] = asyncio.Queue(maxsize)
        self._taken: Event | None = None
        self._closed = False
        self._lock = threading.Lock()  # no call starts on the loop once close has begun
        self._waiting: set[Future[Any]] = set()  # calls a thread waits for: close wakes it
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="signalbox-subscription")
        self._thread.start()
        self._pump: Future[None] = asyncio.run_coroutine_threadsafe(self._run(), self._loop)

    async def _run(self) -> None:
        try:
            while True:
                await self._queue.put(await self.subscriber.next_item())
        except Closed:
            await self._queue.put(None)
        except Exception as exc:  # handed to the caller's thread, raised there
            await self._queue.put(exc)

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        """``work`` run on the loop, waited for; `Closed` when the subscription is closed
        first, or by another thread while this one waits."""
        with self._lock:
            if self._closed:
                work.close()
                raise Closed
            future = asyncio.run_coroutine_threadsafe(work, self._loop)
            self._waiting.add(future)
        try:
            return future.result()
        except CancelledError:  # by close
            raise Closed from None
        finally:
            with self._lock:
                self._waiting.discard(future)

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        try:
            self.commit()
            return self._next()
        except Closed:
            raise StopIteration from None

    def _next(self) -> Event:
        while True:
            item = self._call(self._queue.get())
            if item is None:
                self.close()
                raise StopIteration
            if isinstance(item, Exception):
                self.close()
                raise item
            if isinstance(item, Event):
                self._taken = item
                return item
            self._call(self.subscriber.mark_handled(item))  # a cursor mark: handled at once

    def commit(self) -> None:
        """The event last returned is handled: save the checkpoint now."""
        taken, self._taken = self._taken, None
        if taken is not None:
            with contextlib.suppress(Closed):  # then what was not saved comes again next time
                self._call(self.subscriber.mark_handled(taken))

    @property
    def state(self) -> SubscriberState:
        return self.subscriber.state

    @property
    def cursor(self) -> int | None:
        return self.subscriber.cursor

    def close(self) -> None:
        """End the subscription; a thread iterating it (or in `commit`) returns at once:
        iteration ends with StopIteration. Safe to call from any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = list(self._waiting)
        for future in waiting:  # or its thread would wait for ever on a loop that stops
            future.cancel()
        self._pump.cancel()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.subscriber.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def subscribe(url: str, token: str, *, maxsize: int = 100, **options: Any) -> Subscription:
    """``for event in subscribe(url, token, cursor=0): …``: `Subscriber`'s options, blocking."""
    return Subscription(Subscriber(url, token, **options), maxsize)


# -- the worker ----------------------------------------------------------------------------

Handler = Callable[[dict[str, Any], Event], Awaitable[Any]]
H = TypeVar("H", bound=Handler)
# The longest error message a worker reports, in characters: some 12 KB at most as JSON, well
# inside the server's default body limit (64 KiB). A server set lower still refuses the report,
# and then gets the outcome without it (see Worker._report).
MAX_REPORTED_TEXT = 2000


class Worker:
    """A bot: for each accepted signal, claim it (``processing``), run the handler, report
    ``processed`` with its result or ``failed`` with the exception, then acknowledge.

    The claim is what makes competing workers safe: the server grants exactly one
    ``processing`` per signal, and a worker whose claim is refused (409) skips the signal.
    Signals are handled one at a time, in log order. An outcome whose detail the server
    refuses (a result over its body limit, say) is reported with ``{"unreported": {"error",
    "message"}}``, the refusal, instead.
    """

    def __init__(self, url: str, token: str, *, consumer: str,
                 group: Group | tuple[str, int, int] | None = None,
                 tickers: Sequence[str] = (), strategies: Sequence[str] = (),
                 store: CursorStore | None = None, retries: int = 5,
                 backoff: Backoff | None = None) -> None:
        self.consumer = consumer
        self.client = Client(url, token, retries=retries, backoff=backoff)
        self.subscriber = Subscriber(
            url, token, consumer=None if group is not None else consumer, group=group,
            filter=Filter(types=("signal.accepted",), tickers=tickers, strategies=strategies),
            store=store, backoff=backoff)
        self._handler: Handler | None = None
        self._busy = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closer: asyncio.Task[None] | None = None
        self.processed = self.failed = self.skipped = 0

    @property
    def state(self) -> SubscriberState:
        return self.subscriber.state

    def handler(self, function: H) -> H:
        """``@worker.handler async def handle(signal: dict, event: Event) -> result``."""
        self._handler = function
        return function

    async def run(self) -> None:
        """Work until `stop` (or an error a reconnect cannot fix, such as a bad token)."""
        if self._handler is None:
            raise RuntimeError("no handler: decorate one with @worker.handler")
        self._loop = asyncio.get_running_loop()
        try:
            async for event in self.subscriber:
                self._busy = True
                try:
                    await self._process(self._handler, event)
                finally:
                    self._busy = False
                await self.subscriber.commit()  # done with it: save and ack now, not later
                if self._stopping:
                    break
        finally:
            if self._closer is not None:
                await self._closer
            await self.subscriber.close()
            await self.client.aclose()

    def run_forever(self) -> None:
        """Blocking `run` for scripts: SIGTERM stops it after the current signal, and so does
        Ctrl-C."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signals.SIGTERM, self.stop)
            await self.run()

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main())

    def stop(self) -> None:
        """Finish the signal in hand (if any), acknowledge it, and return from `run`. Safe to
        call from any thread."""
        self._stopping = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._close_if_idle)

    def _close_if_idle(self) -> None:
        if not self._busy:
            self._closer = asyncio.ensure_future(self.subscriber.close())

    async def _process(self, handler: Handler, event: Event) -> None:
        signal_id, signal = event.signal_id, event.data.get("signal")
        if signal_id is None or not isinstance(signal, dict):
            log.warning("event %s is not an accepted signal: skipped", event.position)
            return
        try:
            await self._until_reported(signal_id, ProcessingStatus.PROCESSING, None)
        except Conflict as exc:  # claimed by another worker, or already final
            if exc.code != "illegal_transition":
                raise
            self.skipped += 1
            return
        try:
            result = await handler(signal, event)
        except Exception as exc:
            log.exception("handler failed on signal %s", signal_id)
            self.failed += 1
            await self._report(signal_id, ProcessingStatus.FAILED,
                               {"error": _bounded(str(exc)), "type": type(exc).__name__})
            return
        self.processed += 1
        await self._report(signal_id, ProcessingStatus.PROCESSED, {"result": result})

    async def _until_reported(self, signal_id: str, status: ProcessingStatus,
                              detail: dict[str, Any] | None) -> None:
        """Report, waiting out an unavailable or refusing server for as long as it takes:
        giving up would leave a claimed signal without its outcome."""
        attempt, landed = 0, False
        while True:
            try:
                await self.client.report_status(signal_id, status, detail,
                                                consumer=self.consumer)
                return
            except Conflict:
                # After an unavailable server, our earlier try may be what landed.
                if landed and already_reported(await self.client.signal(signal_id),
                                               str(status), self.consumer) is not None:
                    return
                raise
            except Unavailable as exc:
                landed, wait = True, self.client.backoff.delay(attempt)
                log.warning("%s; %s of %s will be retried", exc, status, signal_id)
            except TooManyRequests as exc:  # refused before anything was recorded
                wait = (exc.retry_after if exc.retry_after is not None
                        else self.client.backoff.delay(attempt))
                log.warning("%s; %s of %s will be retried in %.3g s", exc, status, signal_id,
                            wait)
            await asyncio.sleep(wait)
            attempt += 1

    async def _report(self, signal_id: str, status: ProcessingStatus,
                      detail: dict[str, Any]) -> None:
        """Report the outcome. When the server refuses the detail itself (over its body
        limit, or not storable), or it cannot be written as JSON at all, the outcome is
        reported again with a small detail saying so: the signal must not stay claimed for
        ever, nor the worker die of it."""
        try:
            await self._until_reported(signal_id, status, detail)
            return
        except Conflict as exc:  # e.g. expired meanwhile by an operator: the log says so
            log.warning("could not report %s for %s: %s", status, signal_id, exc)
            return
        except BadRequest as exc:
            log.error("the server refused the detail of %s for %s (%s): reporting %s "
                      "without it", status, signal_id, exc, status)
            unreported = {"error": exc.code, "message": _bounded(exc.message)}
        except (TypeError, ValueError, RecursionError) as exc:  # a cycle, a key not text...
            log.error("the detail of %s for %s is not JSON (%r): reporting %s without it",
                      status, signal_id, exc, status)
            unreported = {"error": "not_json", "message": _bounded(f"{exc!r}")}
        try:
            await self._until_reported(signal_id, status, {"unreported": unreported})
        except (Conflict, BadRequest) as exc:
            log.error("could not report %s for %s: %s", status, signal_id, exc)


def _bounded(text: str) -> str:
    """``text`` cut to `MAX_REPORTED_TEXT` characters, saying so: an exception's message (a
    response body quoted whole, say) may be longer than the server takes in a request."""
    if len(text) <= MAX_REPORTED_TEXT:
        return text
    return f"{text[:MAX_REPORTED_TEXT]}… ({len(text)} characters in all)"
