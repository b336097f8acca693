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
CSP_NAME = b"content-security-policy"
DEFAULT_CSP_VALUE = DEFAULT_CSP.encode()
ERROR_HEADERS = {**SECURITY_HEADERS, "Content-Security-Policy": DEFAULT_CSP}

CORS_PATHS = ("/api/",)
CORS_METHODS = "GET, POST"
CORS_HEADERS = "Authorization, Content-Type, Idempotency-Key"
CORS_MAX_AGE = "600"


class SecurityHeaders:
    def __init__(self, app: ASGIApp, *, behind_tls: bool) -> None:
        self.app = app
        self.behind_tls = behind_tls
        added = {**SECURITY_HEADERS, **({"Strict-Transport-Security": HSTS} if behind_tls else {})}
        self._added = [(name.lower().encode(), value.encode()) for name, value in added.items()]
        self._replaced = frozenset(name for name, _ in self._added)

    def with_security(self, raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """An answer's headers with ours in place of any of the same name, and the default
        Content-Security-Policy unless the answer set its own (a page does)."""
        headers = [(name, value) for name, value in raw if name.lower() not in self._replaced]
        if not any(name.lower() == CSP_NAME for name, _ in headers):
            headers.append((CSP_NAME, DEFAULT_CSP_VALUE))
        headers += self._added
        return headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = self.with_security(message.get("headers", ()))
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
