"""The application factory and its lifespan: open the log, start the hub, serve, shut down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Send
from starlette.types import Scope as AsgiScope
from starlette.websockets import WebSocket

from pipeline import dashboard, http
from pipeline.auth import ADMIN_ENV_NAME, WEBHOOK_ENV_NAME, Scope, SourcePolicy, TokenStore
from pipeline.config import Settings
from pipeline.context import RequestIdMiddleware
from pipeline.errors import Conflict, SignalboxError, TooManyRequests
from pipeline.guard import Guard, GuardMiddleware
from pipeline.headers import ERROR_HEADERS, Cors, SecurityHeaders
from pipeline.hub import Hub
from pipeline.ingest import Ingestor
from pipeline.log import EventLog
from pipeline.log.backends import DATABASE_ERRORS, sqlite_path, unreadable
from pipeline.log.localwake import LocalWakeups
from pipeline.log.notify import Wakeups
from pipeline.metrics import Metrics, metrics_endpoint, own_figures
from pipeline.migrate import check_revision, current_revision
from pipeline.openapi import openapi_endpoint
from pipeline.processing.handlers import load_handler
from pipeline.processing.runner import HandlerRunner
from pipeline.siblings import Siblings, Worker
from pipeline.tasks import cancel_all
from pipeline.ws import Connections, Session, StreamSettings

log = logging.getLogger("signalbox")

HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class StreamEndpoint:
    """``/ws``, as an ASGI application rather than a function of a ``WebSocket``, so that the
    session also has the ASGI ``send`` (for :data:`pipeline.wsprotocol.SEND_MANY`)."""

    def __init__(self, connections: Connections, settings: Settings) -> None:
        self.connections = connections
        self.settings = settings
        self.stream_settings = StreamSettings(settings.heartbeat, settings.hello_timeout,
                                              settings.ws_max_message, settings.ws_frame_rate)

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        websocket = WebSocket(scope, receive, send)
        svc: http.Services = websocket.app.state.services
        session = Session(
            websocket, event_log=svc.log, hub=svc.hub, token_store=svc.tokens,
            connections=self.connections, settings=self.stream_settings,
            page_size=self.settings.page_size, send=send,
        )
        await session.run()


def create_app(settings: Settings | None = None, worker: Worker | None = None) -> Starlette:
    """The application; ``worker``: where the workers of one supervisor meet, and this one's
    number (see :mod:`pipeline.siblings`)."""
    settings = settings or Settings()
    connections = Connections()
    guard = Guard(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        check_revision(await current_revision(settings.database_url), exact=True)
        event_log = await EventLog.open(settings.database_url, reader_pool=settings.pool_size,
                                        read_timeout=settings.read_timeout,
                                        query_timeout=settings.query_timeout,
                                        commit_timeout=settings.commit_timeout)
        hub = Hub(event_log, window=settings.window, window_bytes=settings.window_bytes,
                  page_size=settings.page_size,
                  poll_interval=settings.poll_interval)
        tokens = TokenStore(event_log.engines.reader, cache_seconds=settings.token_cache)
        runner: HandlerRunner | None = None
        watcher: asyncio.Task[None] | None = None
        wakeups = wakeups_for(settings.database_url, event_log, hub)
        siblings = (Siblings(worker.place, worker.number,
                             lambda: own_figures(connections, hub)) if worker else None)
        try:
            await bootstrap_tokens(tokens, settings)
            connections.tokens = tokens
            await hub.start()
            if wakeups is not None:
                await wakeups.start()
            if siblings is not None:
                await siblings.start()
                app.state.siblings = siblings
            if settings.handler:
                runner = handler_runner(settings, event_log, hub)
                await runner.start()
            watcher = asyncio.create_task(connections.watch(settings.heartbeat),
                                          name="signalbox-websocket-watcher")
            app.state.services = http.Services(
                log=event_log, hub=hub, tokens=tokens,
                ingestor=Ingestor(event_log, dedupe_window=settings.dedupe_window),
                sources=SourcePolicy.from_settings(settings.allowed_sources,
                                                   settings.trusted_proxies),
                body_limit=settings.body_limit, max_lag=settings.max_lag,
                claim_lease=settings.claim_lease,
            )
            yield
        finally:
            connections.stopping.set()
            await cancel_all(watcher)
            if runner is not None:
                await runner.stop()
            if wakeups is not None:
                await wakeups.stop()
            if siblings is not None:
                await siblings.stop()
            await hub.stop()
            await event_log.close()

    app = Starlette(
        routes=[*http.routes, Route("/metrics", metrics_endpoint, methods=["GET"]),
                Route("/openapi.json", openapi_endpoint, methods=["GET"]),
                WebSocketRoute("/ws", StreamEndpoint(connections, settings)), *dashboard.routes],
        lifespan=lifespan,
        middleware=middleware(settings, guard),
        exception_handlers={
            ClientDisconnect: _client_gone,
            SignalboxError: _signalbox_error,
            HTTPException: _http_error,
            **dict.fromkeys(DATABASE_ERRORS, _database_error),
            Exception: _internal_error,
        },
    )
    # A path that ends in "/" (an id ending in an encoded "/", say) is not found: no redirect
    # to another URL built from the request's Host header, and no POST sent on elsewhere.
    app.router.redirect_slashes = False
    app.state.settings = settings
    app.state.connections = connections
    app.state.guard = guard
    app.state.metrics = Metrics()
    app.state.siblings = None
    return app


def middleware(settings: Settings, guard: Guard) -> list[Middleware]:
    """Outermost first: headers on every answer (the request id's refusal of a NUL in the URL
    included), the request id, CORS when configured, then the guard."""
    found = [Middleware(SecurityHeaders, behind_tls=settings.behind_tls),
             Middleware(RequestIdMiddleware)]
    if settings.cors_origins:
        found.append(Middleware(Cors, origins=settings.cors_origins))
    found.append(Middleware(GuardMiddleware, guard=guard))
    return found


def wakeups_for(url: str, event_log: EventLog, hub: Hub) -> Wakeups | LocalWakeups | None:
    """How this instance hears of the commits of others on the same log: LISTEN/NOTIFY on
    PostgreSQL; on a SQLite file, datagrams between the processes serving it."""
    if event_log.engines.kind == "postgresql":
        return Wakeups(url, hub.wake)
    path = sqlite_path(url)
    if path is None:
        return None
    local = LocalWakeups(path, hub.wake)
    event_log.add_listener(lambda events: local.announce(events[-1].position))
    return local


def handler_runner(settings: Settings, event_log: EventLog, hub: Hub) -> HandlerRunner:
    assert settings.handler is not None
    secret = settings.forward_secret.get_secret_value() if settings.forward_secret else None
    return HandlerRunner(
        event_log, hub, settings.handler, load_handler(settings.handler),
        options={"forward_url": settings.forward_url, "forward_secret": secret,
                 "forward_timeout": settings.forward_timeout},
        attempts=settings.handler_attempts, backoff=settings.handler_backoff,
        timeout=settings.handler_timeout, concurrency=settings.handler_concurrency,
        default_max_lag=settings.max_lag, lease_ttl=settings.handler_lease,
    )


async def bootstrap_tokens(tokens: TokenStore, settings: Settings) -> None:
    """Honour the tokens given in the environment; make a first admin token if there is none."""
    if settings.admin_token is not None:
        await tokens.put(ADMIN_ENV_NAME, [Scope.ADMIN], settings.admin_token.get_secret_value())
    if settings.webhook_secret is not None:
        await tokens.put(WEBHOOK_ENV_NAME, [Scope.INGEST],
                         settings.webhook_secret.get_secret_value())
    bootstrapped = settings.admin_token is not None or settings.webhook_secret is not None
    if not bootstrapped and await tokens.count_active() == 0:
        try:
            secret = await tokens.create("admin", [Scope.ADMIN])
        except Conflict:
            return  # another instance starting at the same moment made (and printed) it
        print(
            "No token existed, so an admin token was created. It is shown only this once:\n"
            f"{secret}",
            file=sys.stdout, flush=True,
        )


async def _signalbox_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignalboxError)
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    if isinstance(exc, TooManyRequests):
        headers = {"Retry-After": str(exc.retry_after)}
    return http.JSONAnswer(exc.to_body(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = HTTP_CODES.get(exc.status_code, "bad_request")
    path = redact_token(request.url.path)  # a webhook's URL holds its token
    message = {
        404: f"no such route: {request.method} {path}",
        405: f"{request.method} is not allowed on {path}",
    }.get(exc.status_code, str(exc.detail))
    return http.JSONAnswer({"error": code, "message": message}, status_code=exc.status_code,
                           headers=exc.headers)


async def _database_error(request: Request, exc: Exception) -> Response:
    log.warning("database error on %s: %r", request.url.path, exc)
    return http.JSONAnswer(
        {"error": "log_unavailable", "message": unreadable(exc)},
        status_code=503, headers={"Retry-After": "1"},
    )


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client closed its connection before its body arrived: nothing was recorded and
    no one is left to answer. Worth a line, not a traceback."""
    log.info("client went away before its body arrived on %s", request.url.path)
    return Response(status_code=400)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    # Answered outside the middleware (by Starlette's outermost layer): add the headers here.
    return http.JSONAnswer({"error": "internal_error", "message": "an internal error occurred"},
                           status_code=500, headers=ERROR_HEADERS)


_TOKEN_PATH = re.compile(r"(/webhooks/tradingview/)[^/?\s]+")


def redact_token(text: str) -> str:
    """``text`` without the token of a webhook URL in it (TradingView can only send it there)."""
    return _TOKEN_PATH.sub(r"\1[redacted]", text)


class RedactTokens(logging.Filter):
    """Keeps webhook tokens out of access logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_token(a) if isinstance(a, str) else a
                                for a in record.args)
        return True


class QuietFrames(logging.Filter):
    """Drops the WebSocket layer's debug lines that show frames and handshake headers: a
    hello frame carries a token, and so may an upgrade's Authorization header."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(("< ", "> ")))
