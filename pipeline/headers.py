"""Response headers for browsers: security headers on every HTTP answer, and CORS for the
API only when origins are configured."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.config import normal_origin

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# For the API's JSON and text; a page (the dashboard) sets its own and keeps it.
DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'"
HSTS = "max-age=31536000"
ERROR_HEADERS = {**SECURITY_HEADERS, "Content-Security-Policy": DEFAULT_CSP}

CORS_PATHS = ("/api/",)
CORS_METHODS = "GET, POST"
CORS_HEADERS = "Authorization, Content-Type, Idempotency-Key"
CORS_MAX_AGE = "600"


class SecurityHeaders:
    def __init__(self, app: ASGIApp, *, behind_tls: bool) -> None:
        self.app = app
        self.behind_tls = behind_tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(raw=list(message.get("headers", [])))
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if "content-security-policy" not in headers:
                    headers["Content-Security-Policy"] = DEFAULT_CSP
                if self.behind_tls:
                    headers["Strict-Transport-Security"] = HSTS
                message["headers"] = headers.raw
            await send(message)

        await self.app(scope, receive, with_headers)


class Cors:
    """Cross-origin calls to ``/api/`` from the listed origins: preflights answered 204 with
    what may be sent, answers marked readable by that origin. Other origins get nothing extra,
    so the browser keeps the answer from them."""

    def __init__(self, app: ASGIApp, *, origins: Iterable[str]) -> None:
        self.app = app
        self.origins = frozenset(normal_origin(o) for o in origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(CORS_PATHS):
            await self.app(scope, receive, send)
            return
        request_headers = Headers(scope=scope)
        origin = request_headers.get("origin")
        if origin is None or normal_origin(origin) not in self.origins:
            await self.app(scope, receive, send)
            return
        allow = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if scope["method"] == "OPTIONS" and "access-control-request-method" in request_headers:
            allow.update({"Access-Control-Allow-Methods": CORS_METHODS,
                          "Access-Control-Allow-Headers": CORS_HEADERS,
                          "Access-Control-Max-Age": CORS_MAX_AGE})
            await send({"type": "http.response.start", "status": 204,
                        "headers": [(k.lower().encode(), v.encode()) for k, v in allow.items()]})
            await send({"type": "http.response.body", "body": b""})
            return
        allow["Access-Control-Expose-Headers"] = "Retry-After"

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(raw=list(message.get("headers", [])))
                for name, value in allow.items():
                    headers[name] = value
                message["headers"] = headers.raw
            await send(message)

        await self.app(scope, receive, with_cors)
