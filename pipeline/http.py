"""The HTTP routes. Thin: read the request, authorize, call ingestion or the log, answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Send
from starlette.types import Scope as AsgiScope

from pipeline.answers import UPGRADE_CODES
from pipeline.auth import Scope, SourcePolicy, Token, TokenStore, bearer_token
from pipeline.errors import BadRequest, NotFound, PayloadTooLarge, RequestTimeout, Unauthorized
from pipeline.guard import CLIENT_ADDRESS, Guard
from pipeline.hub import Hub
from pipeline.ingest import Ingestor, Outcome, Submission
from pipeline.instruments import AUTH_FAILURES
from pipeline.log import Event, EventFilter, EventLog, format_time, utc_now
from pipeline.log.model import strict_loads
from pipeline.log.schema import signals
from pipeline.processing.consumers import list_positions
from pipeline.processing.projection import STEP_COLUMN, EventType, Status, stream_of
from pipeline.processing.reparse import record_renormalized
from pipeline.processing.report import build_report, report_query
from pipeline.processing.status import StatusReport, report_status
from pipeline.signals import API_JSON, parse_api_signal, parse_tradingview, redact_body
from pipeline.textformats import NotJsonValue

MAX_EVENTS_PAGE = 1000
MAX_SIGNALS_PAGE = 500
MAX_TIMELINE = 10_000


@dataclass(frozen=True)
class Services:
    """What the routes need, built once by the app factory."""

    log: EventLog
    hub: Hub
    tokens: TokenStore
    ingestor: Ingestor
    sources: SourcePolicy
    body_limit: int
    max_lag: int | None
    claim_lease: float


def services(request: Request) -> Services:
    value: Services = request.app.state.services
    return value


class RawJSONResponse(Response):
    media_type = "application/json"


class JSONAnswer(JSONResponse):
    """A JSON answer that cannot fail to encode: text that is not Unicode (a lone surrogate,
    recorded before such text was refused at the door) is written as an ASCII escape, which
    UTF-8 as-is cannot carry."""

    def render(self, content: Any) -> bytes:
        return self.encode(content)

    @staticmethod
    def encode(content: Any) -> bytes:
        try:
            return _compact(content, ascii_only=False).encode("utf-8")
        except UnicodeEncodeError:
            return _compact(content, ascii_only=True).encode("utf-8")


def _compact(value: Any, *, ascii_only: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=False, separators=(",", ":"))


def json_text(value: Any) -> str:
    """Compact JSON, UTF-8 as is where it can be (see :class:`JSONAnswer`)."""
    return JSONAnswer.encode(value).decode("utf-8")


# -- ingestion -----------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    seconds: float = request.app.state.settings.body_timeout
    receive = request.receive
    try:
        async with asyncio.timeout(seconds):  # a client that sends slowly holds no worker
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    raise ClientDisconnect
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {seconds:g} s: send it at "
                             "once") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the body is over {limit} bytes: send a smaller message")


def decode_body(body: bytes) -> tuple[str, bool]:
    """The body as text and whether it was valid UTF-8 (invalid bytes become U+FFFD)."""
    try:
        return body.decode("utf-8").removeprefix("\ufeff"), True
    except UnicodeDecodeError:
        return body.decode("utf-8", "replace").removeprefix("\ufeff"), False


async def authenticate(request: Request, secret: str | None, scope: Scope) -> Token:
    token = await services(request).tokens.authenticate(secret)
    token.require(scope)
    if scope is Scope.INGEST:
        guard: Guard = request.app.state.guard
        guard.admit(token)  # before anything is recorded
    return token


class IngestEndpoint:
    """An ingestion route as a bare ASGI endpoint, answering its outcome itself: a Starlette
    function endpoint wraps each request in two more layers and a response object, 4% of a
    signal's instructions on the busiest path. Errors are raised, and answered by the app's
    handlers, as on every route."""

    def __init__(self, ingest: Callable[[Request], Awaitable[Outcome]]) -> None:
        self.ingest = ingest

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        outcome = await self.ingest(Request(scope, receive))
        status = 200 if outcome.duplicate else 202 if outcome.status == "accepted" else 422
        body = JSONAnswer.encode(outcome.to_body())
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def request_facts(request: Request, body: str, valid_utf8: bool) -> dict[str, Any]:
    facts: dict[str, Any] = {"bytes": len(body.encode("utf-8", "replace"))}
    if not valid_utf8:
        facts["invalid_utf8"] = True
    user_agent = request.headers.get("user-agent")
    if user_agent:
        facts["user_agent"] = user_agent[:200]
    return facts


def client_address(request: Request) -> str | None:
    """The TCP peer, or behind a trusted proxy the address it forwards for: as the guard
    found it on the routes it guards (all that ingest), or found here."""
    if CLIENT_ADDRESS in request.scope:
        address: str | None = request.scope[CLIENT_ADDRESS]
        return address
    peer = request.client.host if request.client else None
    return services(request).sources.client_address(peer, request.headers)


async def _ingest_webhook(request: Request, path_token: str | None) -> Outcome:
    svc = services(request)
    client = client_address(request)
    svc.sources.check(client)
    if path_token is not None:
        token = await authenticate(request, path_token, Scope.INGEST)
    body, valid_utf8 = decode_body(await read_body(request, svc.body_limit))
    credentials = () if path_token is None else (path_token,)
    parsed = parse_tradingview(body, now=utc_now(), default_max_lag=svc.max_lag,
                               credentials=credentials)
    secret = path_token if path_token is not None else parsed.secret
    if path_token is None:
        if secret is None:
            AUTH_FAILURES.inc("missing_token")
            raise Unauthorized(
                "no credential: put the token in the URL (/webhooks/tradingview/TOKEN) or a "
                '"passphrase" field in the JSON alert message'
            )
        token = await authenticate(request, secret, Scope.INGEST)
    outcome = await svc.ingestor.submit(Submission(
        source="webhook", raw=redact_body(body, (*credentials, *parsed.secrets)),
        parsed=parsed,
        token_name=token.name,
        remote_addr=client, content_type=request.headers.get("content-type"),
        idempotency_key=parsed.idempotency_key,
        facts=request_facts(request, body, valid_utf8),
    ))
    return outcome


async def webhook_with_token(request: Request) -> Outcome:
    return await _ingest_webhook(request, request.path_params["token"])


async def webhook_with_passphrase(request: Request) -> Outcome:
    return await _ingest_webhook(request, None)


async def post_signal(request: Request) -> Outcome:
    svc = services(request)
    bearer = bearer_token(request.headers)
    token = await authenticate(request, bearer, Scope.INGEST)
    credentials = () if bearer is None else (bearer,)
    body, valid_utf8 = decode_body(await read_body(request, svc.body_limit))
    try:
        value = API_JSON.decode(body)
    except (ValueError, RecursionError):
        raise BadRequest(
            "the body is not JSON: POST a signal object such as "
            '{"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}'
        ) from None
    parsed = parse_api_signal(value, now=utc_now(), default_max_lag=svc.max_lag,
                              credentials=credentials, text=body)
    key = request.headers.get("idempotency-key") or parsed.idempotency_key
    outcome = await svc.ingestor.submit(Submission(
        source="api", raw=redact_body(body, (*credentials, *parsed.secrets)), parsed=parsed,
        token_name=token.name,
        remote_addr=client_address(request),
        content_type=request.headers.get("content-type"), idempotency_key=key,
        facts=request_facts(request, body, valid_utf8),
    ))
    return outcome


# -- reads ---------------------------------------------------------------------------------


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer from {low} to {high}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return value


def list_param(request: Request, name: str) -> tuple[str, ...]:
    values: list[str] = []
    for raw in request.query_params.getlist(name):
        values.extend(part for part in raw.split(",") if part)
    if len(values) > 100 or any(len(v) > 200 for v in values):
        raise BadRequest(f"{name}: at most 100 values of at most 200 characters")
    return tuple(values)


def events_json(events: list[Event]) -> str:
    return "[" + ",".join(e.json for e in events) + "]"


async def get_events(request: Request) -> Response:
    svc = services(request)
    await authenticate(request, bearer_token(request.headers), Scope.READ)
    after = int_param(request, "after", 0, 0, 2**62)
    limit = int_param(request, "limit", 100, 1, MAX_EVENTS_PAGE)
    event_filter = EventFilter.build(
        types=list_param(request, "type"), streams=list_param(request, "stream"),
        tickers=list_param(request, "ticker"), strategies=list_param(request, "strategy"),
    )
    order = request.query_params.get("order") or "oldest"
    if order not in ("oldest", "newest"):
        raise BadRequest("order must be oldest or newest")
    before = int_param(request, "before", 0, 0, 2**62)
    head = await svc.log.head()  # first: every event up to it is visible to the read below
    if order == "newest":
        # Down from the head (or from `before`) to `after`: the next page is below the last
        # event; a page with fewer than `limit` is the last.
        events = await svc.log.read_newest(after, min(before or head + 1, head + 1), limit,
                                           event_filter)
        next_cursor = events[-1].position if len(events) >= limit else after
    else:
        events = [e for e in await svc.log.read(after, limit, event_filter) if e.position <= head]
        # With fewer than `limit` matches, everything up to the head was scanned: a filtered
        # poller may continue from there instead of re-scanning non-matching events.
        next_cursor = events[-1].position if len(events) >= limit else max(head, after)
    return RawJSONResponse(
        f'{{"epoch":"{svc.log.epoch}","events":{events_json(events)},'
        f'"next":{next_cursor},"head":{head}}}'
    )


def signal_summary(row: Any) -> dict[str, Any]:
    return {
        "signal_id": row.signal_id,
        "status": row.status,
        "source": row.source,
        "ticker": row.ticker,
        "strategy": row.strategy,
        "action": row.action,
        "received_at": row.received_at,
        "updated_at": row.updated_at,
        "position": row.first_position,
        "last_position": row.last_position,
        "claimed_by": row.claimed_by,
        "attempts": row.attempts,
        "last_error": row.last_error,
        "steps": {status.value: getattr(row, column) for status, column in STEP_COLUMN.items()
                  if getattr(row, column) is not None},
    }


async def list_signals(request: Request) -> Response:
    svc = services(request)
    await authenticate(request, bearer_token(request.headers), Scope.READ)
    limit = int_param(request, "limit", 50, 1, MAX_SIGNALS_PAGE)
    before = int_param(request, "before", 0, 0, 2**62)
    stmt = select(signals)
    for name in ("status", "ticker", "strategy"):
        values = list_param(request, name)
        if values:
            stmt = stmt.where(signals.c[name].in_(values))
    if before:
        stmt = stmt.where(signals.c.first_position < before)
    if request.query_params.get("stuck", "").lower() in ("1", "true", "yes"):
        # Claimed longer ago than the lease and still without an outcome: a person decides.
        cutoff = format_time(utc_now() - timedelta(seconds=svc.claim_lease))
        stmt = stmt.where(signals.c.status == Status.PROCESSING,
                          signals.c.processing_at < cutoff)
    stmt = stmt.order_by(signals.c.first_position.desc()).limit(limit)
    async with svc.log.engines.reader.connect() as conn:
        rows = (await conn.execute(stmt)).all()
    found = [signal_summary(r) for r in rows]
    next_before = found[-1]["position"] if len(found) == limit else None
    return JSONAnswer({"signals": found, "next_before": next_before})


async def get_signal(request: Request) -> Response:
    svc = services(request)
    await authenticate(request, bearer_token(request.headers), Scope.READ)
    signal_id = request.path_params["signal_id"]
    async with svc.log.engines.reader.connect() as conn:
        row = (await conn.execute(
            select(signals).where(signals.c.signal_id == signal_id)
        )).one_or_none()
    if row is None:
        raise NotFound(f"no signal {signal_id!r}: check the id returned when it was posted")
    # Its first MAX_TIMELINE events (a signal has a handful; an alert repeated with one id
    # adds one each time), and whether there are more: GET /api/events?stream= has them all.
    timeline = await svc.log.read(0, MAX_TIMELINE + 1,
                                  EventFilter(streams=(stream_of(signal_id),)))
    truncated = len(timeline) > MAX_TIMELINE
    del timeline[MAX_TIMELINE:]
    summary = signal_summary(row)
    for event in timeline:
        if event.type == EventType.ACCEPTED:
            summary["normalized"] = event.data.get("signal")
        elif event.type == EventType.REJECTED:
            summary["errors"] = event.data.get("errors")
    summary_json = json_text(summary)
    return RawJSONResponse(
        f'{{"signal":{summary_json},"status":{json.dumps(row.status)},'
        f'"events":{events_json(timeline)},"truncated":{json.dumps(truncated)}}}'
    )


async def post_status(request: Request) -> Response:
    svc = services(request)
    token = await authenticate(request, bearer_token(request.headers), Scope.REPORT)
    body, _ = decode_body(await read_body(request, svc.body_limit))
    try:
        value = strict_loads(body)
    except NotJsonValue as exc:
        raise BadRequest(f"the body is not plain JSON: {exc}") from None
    except (ValueError, RecursionError):
        raise BadRequest('the body is not JSON (NaN and Infinity are not JSON either): send '
                         '{"status": "processed", "detail": {}}') from None
    report = StatusReport.parse(request.path_params["signal_id"], value)
    outcome = await report_status(svc.log, report, token.name)
    return JSONAnswer(outcome.to_body())


async def post_renormalize(request: Request) -> Response:
    """Read a signal's recorded body with today's parsers; record a change as an event."""
    svc = services(request)
    await authenticate(request, bearer_token(request.headers), Scope.ADMIN)
    outcome, appended = await record_renormalized(
        svc.log, request.path_params["signal_id"], default_max_lag=svc.max_lag)
    return JSONAnswer(outcome.to_body(appended), status_code=201 if appended else 200)


async def get_audit_report(request: Request) -> Response:
    svc = services(request)
    await authenticate(request, bearer_token(request.headers), Scope.READ)
    params = request.query_params
    query = report_query(params.get("since"), params.get("until"), params.get("stuck_after"),
                         svc.claim_lease, utc_now())
    return JSONAnswer(await build_report(svc.log.engines.reader, query))


async def get_consumers(request: Request) -> Response:
    svc = services(request)
    await authenticate(request, bearer_token(request.headers), Scope.READ)
    head = await svc.log.head()
    found = await list_positions(svc.log.engines.reader)
    return JSONAnswer({"consumers": [c.to_body(head) for c in found], "head": head})


async def stream_without_upgrade(request: Request) -> Response:
    """``GET /ws`` without a WebSocket upgrade (a browser's address bar, curl): answered as
    the WebSocket layer answers an upgrade it refuses for the same reason."""
    code, message = UPGRADE_CODES[426]
    return JSONAnswer({"error": code, "message": message}, status_code=426,
                      headers={"Upgrade": "websocket"})


async def healthz(request: Request) -> Response:
    return JSONAnswer({"status": "ok"})


async def readyz(request: Request) -> Response:
    svc = services(request)
    await svc.log.check_writable()  # LogUnavailable → 503 through the error handler
    head = await svc.log.head()
    return JSONAnswer({"status": "ready", "epoch": svc.log.epoch, "head": head,
                         "subscribers_head": svc.hub.head})


routes = [
    Route("/webhooks/tradingview/{token}", IngestEndpoint(webhook_with_token),
          methods=["POST"]),
    Route("/webhooks/tradingview", IngestEndpoint(webhook_with_passphrase), methods=["POST"]),
    Route("/api/signals", IngestEndpoint(post_signal), methods=["POST"]),
    Route("/api/signals", list_signals, methods=["GET"]),
    Route("/api/signals/{signal_id}", get_signal, methods=["GET"]),
    Route("/api/signals/{signal_id}/status", post_status, methods=["POST"]),
    Route("/api/signals/{signal_id}/renormalize", post_renormalize, methods=["POST"]),
    Route("/api/consumers", get_consumers, methods=["GET"]),
    Route("/api/audit/report", get_audit_report, methods=["GET"]),
    Route("/api/events", get_events, methods=["GET"]),
    Route("/ws", stream_without_upgrade, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
