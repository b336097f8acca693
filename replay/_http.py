"""The client's wire layer: records, errors, backoff, and the asynchronous HTTP client.

Private: import these names from ``replay`` (or ``replay.client``), whose docstring draws the
error hierarchy. The synchronous twin of `Client` lives in ``replay.client`` and shares the
request builders and answer parsers below, so that both speak exactly the same protocol.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from enum import Enum, StrEnum
from typing import Any, NoReturn
from urllib.parse import quote

import httpx

from pipeline.log.model import new_id

USER_AGENT = "signalbox-replay/0.1"

# -- errors --------------------------------------------------------------------------------


class SignalboxClientError(Exception):
    """Base of every error the client raises.

    ``code`` is the server's stable error code (``unauthorized``, ``illegal_transition``, …) or
    the client's own (``unreachable``, ``epoch_changed``); ``status`` is the HTTP status or the
    WebSocket close code that carried it, when there was one.
    """

    def __init__(self, message: str, *, code: str = "error", status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class Unauthorized(SignalboxClientError):
    """401 or close 4401: no token, or an unknown, revoked or expired one. Never retried."""


class Forbidden(SignalboxClientError):
    """403 or close 4403: the token lacks the scope (or the address is not allowed)."""


class NotFound(SignalboxClientError):
    """404: no such signal (or route)."""


class Conflict(SignalboxClientError):
    """409 (or close 4409 for a cursor ahead of the head): ``code`` says which conflict, e.g.
    ``illegal_transition`` when a signal is already claimed or finished."""


class BadRequest(SignalboxClientError):
    """400, 413 and the other 4xx answers: the request itself is wrong; sending it again as it
    is cannot help."""


class Rejected(SignalboxClientError):
    """422: the signal was recorded (for the audit) but rejected: see ``errors``."""

    def __init__(self, message: str, *, signal_id: str | None, position: int | None,
                 errors: list[dict[str, Any]], code: str = "rejected",
                 status: int | None = 422) -> None:
        super().__init__(message, code=code, status=status)
        self.signal_id = signal_id
        self.position = position
        self.errors = errors


class TooManyRequests(SignalboxClientError):
    """429: refused for now; ``retry_after`` is the wait the server asked for, in seconds
    (None when it did not say). ``code`` says why: ``too_many_requests``, the token is over its
    ingestion rate (raised only once the retries are spent, or when the wait asked is over the
    client's ``max_retry_after``); ``too_many_auth_failures``, this address failed to
    authenticate too often (raised at once: a wrong token somewhere is the thing to fix).
    Nothing of the refused request was recorded."""

    def __init__(self, message: str, *, code: str = "too_many_requests", status: int = 429,
                 retry_after: float | None = None) -> None:
        super().__init__(message, code=code, status=status)
        self.retry_after = retry_after


class Unavailable(SignalboxClientError):
    """503 (``log_unavailable``), a proxy's 502 or 504, or no connection (``unreachable``),
    still so after every retry. Nothing was acknowledged: sending again with the same
    idempotency key is safe."""


class EpochChanged(SignalboxClientError):
    """The log was created anew (close 4409 with another epoch): the stored cursor belongs to
    the old log. Start again from 0 (``on_epoch_change="restart"``) or investigate."""

    def __init__(self, old_epoch: str | None, new_epoch: str, message: str = "") -> None:
        super().__init__(message or f"the log's epoch changed from {old_epoch} to {new_epoch}",
                         code="epoch_changed", status=4409)
        self.old_epoch = old_epoch
        self.new_epoch = new_epoch


class ProtocolError(SignalboxClientError):
    """Close 4400 (the server found a frame of ours malformed) or an answer this client cannot
    read: a bug on one side or the other, not something a retry fixes."""


_BY_STATUS: dict[int, type[SignalboxClientError]] = {
    401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    502: Unavailable, 503: Unavailable, 504: Unavailable,
}
# Answers that say the server could not answer now: its own 503 (the log could not commit),
# and a reverse proxy's 502 and 504 (nothing behind it, or no answer in time: a server that
# is down or restarting). Nothing was acknowledged: the request may be sent again.
UNAVAILABLE = frozenset({502, 503, 504})


def raise_for_answer(response: httpx.Response) -> NoReturn:
    raise error_of(response)


def error_of(response: httpx.Response) -> SignalboxClientError:
    """The error that an unsuccessful answer stands for."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"error": f"http_{response.status_code}", "message": response.text[:200]}
    code = str(body.get("error") or body.get("status") or f"http_{response.status_code}")
    message = str(body.get("message") or f"HTTP {response.status_code}")
    status = response.status_code
    if status == 429:
        return TooManyRequests(message, code=code, retry_after=retry_after(response))
    if status == 422:
        errors = body.get("errors")
        return Rejected(_rejection_message(errors, message), signal_id=body.get("signal_id"),
                        position=body.get("position"),
                        errors=errors if isinstance(errors, list) else [], status=status)
    kind = _BY_STATUS.get(status) or (BadRequest if 400 <= status < 500 else
                                      SignalboxClientError)
    return kind(message, code=code, status=status)


def _rejection_message(errors: object, fallback: str) -> str:
    if isinstance(errors, list) and errors:
        parts = [str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in errors]
        return "signal rejected: " + "; ".join(parts)
    return fallback if fallback != "HTTP 422" else "signal rejected"


# -- records -------------------------------------------------------------------------------


def _dict(value: object, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{name} is not a JSON object", code="bad_answer")
    return value


def _int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{name} is not an integer: {value!r}", code="bad_answer")
    return value


def _str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{name} is not a string: {value!r}", code="bad_answer")
    return value


def _time(value: object, name: str) -> datetime:
    try:
        return datetime.fromisoformat(_str(value, name))
    except ValueError:
        raise ProtocolError(f"{name} is not an RFC 3339 time: {value!r}",
                            code="bad_answer") from None


@dataclass(frozen=True, slots=True)
class Event:
    """One event of the log, as the server recorded it."""

    position: int
    id: str
    stream: str
    type: str
    data: dict[str, Any] = field(hash=False)
    meta: dict[str, Any] = field(hash=False)
    time: datetime
    hash: str

    @classmethod
    def from_json(cls, obj: object) -> Event:
        frame = _dict(obj, "event")
        return cls(
            position=_int(frame.get("position"), "event.position"),
            id=_str(frame.get("id"), "event.id"),
            stream=_str(frame.get("stream"), "event.stream"),
            type=_str(frame.get("type"), "event.type"),
            data=_dict(frame.get("data"), "event.data"),
            meta=_dict(frame.get("meta"), "event.meta"),
            time=_time(frame.get("time"), "event.time"),
            hash=_str(frame.get("hash"), "event.hash"),
        )

    @property
    def signal_id(self) -> str | None:
        value = self.meta.get("signal_id", self.data.get("signal_id"))
        return value if isinstance(value, str) else None


class ProcessingStatus(StrEnum):
    """The statuses a bot may report for a signal."""

    DISPATCHED = "dispatched"  #: handed to a bot or a queue
    PROCESSING = "processing"  #: claimed: exactly one claim per signal succeeds
    PROCESSED = "processed"  #: done, final
    FAILED = "failed"  #: the attempt failed (detail: error and type), final
    EXPIRED = "expired"  #: too old to act upon, final


@dataclass(frozen=True, slots=True)
class SignalReceipt:
    """The answer to an accepted signal (``duplicate``: a repeat of an earlier key)."""

    signal_id: str
    position: int
    status: str
    duplicate: bool


@dataclass(frozen=True, slots=True)
class StatusReceipt:
    signal_id: str
    status: str
    position: int


@dataclass(frozen=True, slots=True)
class EventPage:
    """A page of ``GET /api/events``: ask with ``after=page.next`` for the next one."""

    epoch: str
    events: tuple[Event, ...]
    next: int
    head: int


@dataclass(frozen=True, slots=True)
class SignalSummary:
    """A signal's current state; ``fields`` holds the answer as sent, newer fields included."""

    signal_id: str
    status: str
    ticker: str | None
    strategy: str | None
    action: str | None
    position: int
    last_position: int
    received_at: datetime
    updated_at: datetime
    normalized: dict[str, Any] | None = field(default=None, hash=False)
    errors: list[dict[str, Any]] | None = field(default=None, hash=False)
    fields: dict[str, Any] = field(default_factory=dict, hash=False, compare=False, repr=False)

    @classmethod
    def from_json(cls, obj: object) -> SignalSummary:
        body = _dict(obj, "signal")
        normalized, errors = body.get("normalized"), body.get("errors")
        return cls(
            signal_id=_str(body.get("signal_id"), "signal_id"),
            status=_str(body.get("status"), "status"),
            ticker=body.get("ticker"), strategy=body.get("strategy"), action=body.get("action"),
            position=_int(body.get("position"), "position"),
            last_position=_int(body.get("last_position"), "last_position"),
            received_at=_time(body.get("received_at"), "received_at"),
            updated_at=_time(body.get("updated_at"), "updated_at"),
            normalized=normalized if isinstance(normalized, dict) else None,
            errors=errors if isinstance(errors, list) else None,
            fields=body,
        )


@dataclass(frozen=True, slots=True)
class SignalTimeline:
    """``GET /api/signals/{id}``: the signal, its status, and its events, oldest first (the
    first 10,000 when ``truncated``)."""

    signal: SignalSummary
    status: str
    events: tuple[Event, ...]
    truncated: bool = False  # only its first events: `events(streams=...)` has them all


@dataclass(frozen=True, slots=True)
class SignalPage:
    """Newest first; pass ``next_before`` as ``before`` for the next page (None: no more)."""

    signals: tuple[SignalSummary, ...]
    next_before: int | None


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    name: str
    position: int
    lag: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ConsumerList:
    consumers: tuple[ConsumerInfo, ...]
    head: int


# -- backoff -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base * 2**n)).

    Full jitter spreads a crowd of clients that lost the same server over the whole window, so
    a restarted server is not hit by all of them at once.
    """

    base: float = 0.5
    cap: float = 30.0

    def ceiling(self, attempt: int) -> float:
        return min(self.cap, self.base * 2.0 ** min(max(attempt, 0), 64))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        return (rng or _RANDOM).uniform(0.0, self.ceiling(attempt))


_RANDOM = random.Random()


# -- requests and answers, shared by Client and SyncClient ---------------------------------


def json_default(value: Any) -> Any:
    """JSON for what handlers and signals commonly hold: decimals stay exact as strings."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Enum):
        return str(value.value if isinstance(value, Enum) else value)
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def encode(value: Any) -> bytes:
    """The request body. Floats that are not finite are not JSON, and the server refuses a
    body with ``NaN`` or ``Infinity`` in it: they are sent as the strings ``"NaN"``,
    ``"Infinity"`` and ``"-Infinity"``, which is how the server records TradingView's NaN."""
    return json.dumps(_finite(value), default=json_default, ensure_ascii=False,
                      separators=(",", ":"), allow_nan=False).encode()


def _finite(value: Any) -> Any:
    """``value`` with its non-finite floats spelled out, also those inside what `json_default`
    turns into JSON (a dataclass's fields, a set's members)."""
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if value is None or isinstance(value, str | int):
        return value
    if isinstance(value, dict):
        return {_finite(k) if isinstance(k, float) else k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return _finite(json_default(value))


@dataclass(frozen=True, slots=True)
class Call:
    """One request, described once for both clients."""

    method: str
    path: str
    params: tuple[tuple[str, str | int], ...] = ()
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    ok: frozenset[int] = frozenset({200})


def signal_call(signal: Mapping[str, Any], idempotency_key: str | None) -> Call:
    """POST /api/signals. Without a key, one is made here (unless the body has its own ``id``)
    so that every retry of this call is recognized as the same signal: a time-ordered UUID,
    which the server's index of keys takes at its end rather than on a random page."""
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    if idempotency_key is None and signal.get("id") is None:
        idempotency_key = new_id()
    if idempotency_key is not None:
        headers += (("Idempotency-Key", idempotency_key),)
    return Call("POST", "/api/signals", body=encode(dict(signal)), headers=headers,
                ok=frozenset({200, 202}))


def status_call(signal_id: str, status: str, detail: Mapping[str, Any] | None,
                consumer: str | None) -> Call:
    body: dict[str, Any] = {"status": str(status)}
    if detail is not None:
        body["detail"] = dict(detail)
    if consumer is not None:
        body["consumer"] = consumer
    return Call("POST", f"/api/signals/{_segment(signal_id)}/status", body=encode(body),
                headers=(("Content-Type", "application/json"),))


def events_call(after: int, limit: int, *, types: Iterable[str], streams: Iterable[str],
                tickers: Iterable[str], strategies: Iterable[str]) -> Call:
    params: list[tuple[str, str | int]] = [("after", after), ("limit", limit)]
    for name, values in (("type", types), ("stream", streams), ("ticker", tickers),
                         ("strategy", strategies)):
        params.extend((name, value) for value in values)
    return Call("GET", "/api/events", params=tuple(params))


def signals_call(status: Iterable[str], ticker: Iterable[str], strategy: Iterable[str],
                 limit: int, before: int | None) -> Call:
    params: list[tuple[str, str | int]] = [("limit", limit)]
    for name, values in (("status", status), ("ticker", ticker), ("strategy", strategy)):
        params.extend((name, str(value)) for value in values)
    if before is not None:
        params.append(("before", before))
    return Call("GET", "/api/signals", params=tuple(params))


def signal_timeline_call(signal_id: str) -> Call:
    return Call("GET", f"/api/signals/{_segment(signal_id)}")


def _segment(value: str) -> str:
    return quote(value, safe="")


def answer_json(response: httpx.Response, ok: frozenset[int]) -> dict[str, Any]:
    if response.status_code not in ok:
        raise_for_answer(response)
    try:
        return _dict(response.json(), "the answer")
    except ValueError:
        raise ProtocolError("the answer is not JSON", code="bad_answer") from None


def as_list(values: str | Iterable[str] | None) -> tuple[str, ...]:
    if values is None:
        return ()
    return (values,) if isinstance(values, str) else tuple(values)


def parse_receipt(body: dict[str, Any]) -> SignalReceipt:
    return SignalReceipt(_str(body.get("signal_id"), "signal_id"),
                         _int(body.get("position"), "position"),
                         _str(body.get("status"), "status"), bool(body.get("duplicate")))


def parse_status_receipt(body: dict[str, Any]) -> StatusReceipt:
    return StatusReceipt(_str(body.get("signal_id"), "signal_id"),
                         _str(body.get("status"), "status"),
                         _int(body.get("position"), "position"))


def parse_page(body: dict[str, Any]) -> EventPage:
    events = body.get("events")
    return EventPage(_str(body.get("epoch"), "epoch"),
                     tuple(Event.from_json(e) for e in events or []),
                     _int(body.get("next"), "next"), _int(body.get("head"), "head"))


def parse_timeline(body: dict[str, Any]) -> SignalTimeline:
    return SignalTimeline(SignalSummary.from_json(body.get("signal")),
                          _str(body.get("status"), "status"),
                          tuple(Event.from_json(e) for e in body.get("events") or []),
                          body.get("truncated") is True)


def parse_signals(body: dict[str, Any]) -> SignalPage:
    before = body.get("next_before")
    return SignalPage(tuple(SignalSummary.from_json(s) for s in body.get("signals") or []),
                      before if isinstance(before, int) else None)


def parse_consumers(body: dict[str, Any]) -> ConsumerList:
    found = []
    for item in body.get("consumers") or []:
        row = _dict(item, "consumer")
        found.append(ConsumerInfo(_str(row.get("name"), "name"),
                                  _int(row.get("position"), "position"),
                                  _int(row.get("lag"), "lag"),
                                  _time(row.get("updated_at"), "updated_at")))
    return ConsumerList(tuple(found), _int(body.get("head"), "head"))


def already_reported(timeline: SignalTimeline, status: str,
                     consumer: str | None) -> StatusReceipt | None:
    """After a retried report answered 409: was the lost first attempt ours, and did it land?
    Yes when the signal is in that status and the event that put it there names our consumer
    (or no consumer was given)."""
    if timeline.status != status:
        return None
    event_type = f"signal.{status}"
    landed = [e for e in timeline.events if e.type == event_type]
    if not landed:
        return None
    event = landed[-1]
    if consumer is not None:
        named = (event.data.get("consumer"), event.meta.get("consumer"),
                 timeline.signal.fields.get("claimed_by"))
        if consumer not in named:
            return None
    return StatusReceipt(timeline.signal.signal_id, status, event.position)


# -- retries, decided once for Client and SyncClient ---------------------------------------

RETRYABLE = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
AUTH_FAILURES = "too_many_auth_failures"
MAX_RETRY_AFTER = 30.0
_DELTA_SECONDS = re.compile(r"[0-9]{1,9}")


def retry_delay(outcome: httpx.Response | Exception, attempt: int, *, retries: int,
                backoff: Backoff, max_retry_after: float, url: str) -> float | None:
    """What a client does with the outcome of its try number ``attempt`` (0: the first):
    None, the answer is final (return it); a number, wait that many seconds and send again
    (`retry_wait` says how long); or raise the error the outcome stands for, a refusal that
    waiting cannot mend, or the last outcome once ``retries`` are spent."""
    wait = retry_wait(outcome, attempt, backoff=backoff, max_retry_after=max_retry_after)
    if wait is not None and attempt >= retries:
        raise give_up(outcome, attempt + 1, url)
    return wait


def retry_wait(outcome: httpx.Response | Exception, attempt: int, *, backoff: Backoff,
               max_retry_after: float,
               unavailable: frozenset[int] = UNAVAILABLE) -> float | None:
    """How long to wait before sending again after the outcome of try number ``attempt``
    (None: the answer is final); how many times to send again is the caller's to bound.

    After a lost connection, or an answer in ``unavailable`` (by default a 503 or a proxy's 502
    or 504: nothing was acknowledged), the wait follows `Backoff`, but is not less than the
    answer's ``Retry-After`` when it has one (up to ``max_retry_after``); after a 429, it is
    its ``Retry-After`` (the backoff when it has none). A 429 is raised at once when it is the
    address's failed authentications (waiting does not mend a wrong token) or when it asks
    for a wait over ``max_retry_after`` seconds (the caller would rather know now than wait
    that long).
    """
    if isinstance(outcome, httpx.Response):
        if outcome.status_code == 429:
            refusal, wait = error_of(outcome), retry_after(outcome)
            if refusal.code == AUTH_FAILURES:
                raise refusal
            if wait is not None and wait > max_retry_after:
                refusal.message += f" (not waited for: over {max_retry_after:g} s)"
                raise refusal
            if wait is not None:
                return wait
        elif outcome.status_code not in unavailable:
            return None
        elif (asked := retry_after(outcome)) is not None:
            # At least what the server asked, with the backoff's jitter on top (not a herd
            # of clients back at the same instant), and never over max_retry_after.
            return min(max_retry_after, asked + backoff.delay(attempt))
    return backoff.delay(attempt)


def may_have_landed(outcome: httpx.Response | Exception) -> bool:
    """Whether a retried attempt may have been recorded after all: a lost answer, a 503 (a
    slow commit) or a proxy's 504 (an answer too slow for it) may; a 429 refused it before
    anything was recorded."""
    return not isinstance(outcome, httpx.Response) or outcome.status_code != 429


def give_up(failure: httpx.Response | Exception, attempts: int,
            url: str) -> SignalboxClientError:
    """The error to raise once the retries are spent: the last answer's, or `Unavailable`."""
    if isinstance(failure, httpx.Response):
        error = error_of(failure)
        error.message = f"{error.message} (after {attempts} attempts)"
        return error
    return Unavailable(f"could not reach {url} after {attempts} attempts: {failure!r}",
                       code="unreachable")


def retry_after(response: httpx.Response) -> float | None:
    """The answer's ``Retry-After`` in seconds (None: it has none, or none readable)."""
    return retry_after_seconds(response.headers.get("retry-after"),
                               response.headers.get("date"))


def retry_after_seconds(value: str | None, sent: str | None = None) -> float | None:
    """A ``Retry-After`` value in seconds: delta-seconds, or an HTTP-date counted from
    ``sent``, the answer's own ``Date``, when there is one (so that a clock here that is
    wrong neither stretches nor cuts the wait), else from this clock."""
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    when = _http_date(value)
    if when is None:
        return None
    now = (_http_date(sent) if sent else None) or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


def _http_date(value: str) -> datetime | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def client_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "User-Agent": USER_AGENT}


# -- the asynchronous client ---------------------------------------------------------------


class Client:
    """Typed calls of the HTTP API.

    Retries (``retries`` in all, see `retry_delay`): a 503 (the log could not commit, nothing
    acknowledged), a reverse proxy's 502 or 504 (the server is down or restarting) and a lost
    connection after `Backoff`; a 429 (the ingestion rate's, not
    the failed authentications') after the ``Retry-After`` it carries, unless that is over
    ``max_retry_after`` seconds. No other answer is retried. `send_signal` always sends an
    idempotency key, so a retry whose first attempt did land is answered as a repeat instead
    of making a second signal.
    """

    def __init__(self, url: str, token: str, *, retries: int = 5,
                 backoff: Backoff | None = None, timeout: float = 10.0,
                 max_retry_after: float = MAX_RETRY_AFTER,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff or Backoff()
        self.max_retry_after = max_retry_after
        self._http = httpx.AsyncClient(base_url=self.url, headers=client_headers(token),
                                       timeout=timeout, transport=transport)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, call: Call) -> tuple[httpx.Response, bool]:
        """The final answer, and whether an earlier attempt may have landed."""
        attempt, landed = 0, False
        while True:
            outcome: httpx.Response | Exception
            try:
                outcome = await self._http.request(
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
            await asyncio.sleep(delay)
            attempt += 1

    async def _json(self, call: Call) -> dict[str, Any]:
        response, _ = await self.send(call)
        return answer_json(response, call.ok)

    async def send_signal(self, signal: Mapping[str, Any],
                          idempotency_key: str | None = None) -> SignalReceipt:
        """POST /api/signals; raises `Rejected` (422) with the validation errors."""
        return parse_receipt(await self._json(signal_call(signal, idempotency_key)))

    async def report_status(self, signal_id: str, status: ProcessingStatus | str,
                            detail: Mapping[str, Any] | None = None,
                            consumer: str | None = None) -> StatusReceipt:
        """POST /api/signals/{id}/status. A 409 after a retry is checked against the signal's
        timeline: if our lost first attempt is what landed, that is success."""
        call = status_call(signal_id, status, detail, consumer)
        response, retried = await self.send(call)
        if response.status_code == 409 and retried:
            receipt = already_reported(await self.signal(signal_id), str(status), consumer)
            if receipt is not None:
                return receipt
        return parse_status_receipt(answer_json(response, call.ok))

    async def events(self, after: int = 0, limit: int = 100, *,
                     types: str | Iterable[str] | None = None,
                     streams: str | Iterable[str] | None = None,
                     tickers: str | Iterable[str] | None = None,
                     strategies: str | Iterable[str] | None = None) -> EventPage:
        return parse_page(await self._json(events_call(
            after, limit, types=as_list(types), streams=as_list(streams),
            tickers=as_list(tickers), strategies=as_list(strategies))))

    async def signal(self, signal_id: str) -> SignalTimeline:
        return parse_timeline(await self._json(signal_timeline_call(signal_id)))

    async def signals(self, *, status: str | Iterable[str] | None = None,
                      ticker: str | Iterable[str] | None = None,
                      strategy: str | Iterable[str] | None = None, limit: int = 50,
                      before: int | None = None) -> SignalPage:
        return parse_signals(await self._json(signals_call(
            as_list(status), as_list(ticker), as_list(strategy), limit, before)))

    async def consumers(self) -> ConsumerList:
        return parse_consumers(await self._json(Call("GET", "/api/consumers")))
