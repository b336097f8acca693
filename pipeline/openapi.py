"""``GET /openapi.json``: the HTTP API as an OpenAPI 3.1 description, written by hand.

Every route, parameter, body and answer of :mod:`pipeline.http` (and ``/metrics``), with the
error body that every 4xx and 503 carries. The test suite holds the server to it: schemathesis
sends what the description allows and checks every answer against it. The WebSocket stream is
not HTTP and is described in docs/protocol.md.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline import __version__

Schema = dict[str, Any]

ERROR_TEXT = {
    400: "malformed request: the message says which parameter or field (on every route: a "
         "NUL character, %00, anywhere in the URL)",
    401: "no token, or an unknown, revoked or expired one",
    403: "the token lacks the scope (forbidden), or the client address is not allowed "
         "(source_not_allowed)",
    404: "no such signal",
    409: "the transition is not allowed from the signal's current status",
    408: "the body did not arrive within SIGNALBOX_BODY_TIMEOUT",
    413: "the body is over the limit (SIGNALBOX_BODY_LIMIT)",
    426: "not a WebSocket upgrade: the stream is for a WebSocket client (docs/protocol.md)",
    429: "the token is over its ingestion rate (too_many_requests: send again after "
         "Retry-After seconds), or this address failed to authenticate too often "
         "(too_many_auth_failures: refused for Retry-After seconds, whatever the token)",
    503: "the log is unavailable or could not confirm a commit: nothing was acknowledged; "
         "retry (with the same idempotency key: a commit that landed is answered as a repeat)",
}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(type_: str) -> Schema:
    return {"type": [type_, "null"]}


def obj(required: list[str], properties: dict[str, Schema], *,
        closed: bool = True) -> Schema:
    schema: Schema = {"type": "object", "required": required, "properties": properties}
    if closed:
        schema["additionalProperties"] = False
    return schema


def answer(description: str, schema: Schema | None = None, *,
           media_type: str = "application/json") -> Schema:
    response: Schema = {"description": description,
                        "headers": {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}}}
    if schema is not None:
        response["content"] = {media_type: {"schema": schema}}
    return response


def errors(*codes: int) -> dict[str, Schema]:
    return {str(code): answer(ERROR_TEXT[code], ref("Error")) for code in codes}


def query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def path(name: str, description: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"},
            "description": description}


POSITION = {"type": "integer", "minimum": 0}
CURSOR = {"type": "integer", "minimum": 0, "maximum": 2**62}
NAMES = {"type": "array", "items": {"type": "string"}, "maxItems": 100}
BEARER: list[Schema] = [{"bearer": []}]

SCHEMAS: dict[str, Schema] = {
    "Error": obj(["error", "message"], {
        "error": {"type": "string", "description": "a stable code, e.g. unauthorized"},
        "message": {"type": "string", "description": "what to do about it"}}),
    "SignalError": obj(["code", "field", "message"], {
        "code": {"type": "string"}, "field": nullable("string"), "message": {"type": "string"}}),
    "IngestOutcome": obj(["signal_id", "position", "status", "duplicate"], {
        "signal_id": {"type": "string"}, "position": POSITION, "status": {"type": "string"},
        "duplicate": {"type": "boolean"},
        "errors": {"type": "array", "items": ref("SignalError")}}),
    "Signal": obj(["ticker", "action"], {
        "ticker": {"type": "string"}, "exchange": {"type": "string"},
        "action": {"enum": ["buy", "sell", "exit_long", "exit_short", "close"]},
        **{name: {"type": ["string", "number"]} for name in (
            "quantity", "limit_price", "stop_price", "price", "take_profit", "stop_loss")},
        "quantity_type": {"enum": ["contracts", "quote", "percent", "risk"]},
        "order_type": {"enum": ["market", "limit", "stop", "stop_limit"]},
        "time_in_force": {"enum": ["gtc", "ioc", "fok", "day"]},
        **{name: {"type": "string"} for name in (
            "interval", "bar_time", "signal_time", "strategy", "order_id", "comment", "id")},
        "max_lag": {"type": "integer", "minimum": 1},
        "extras": {"type": "object"}}),
    "Event": obj(["position", "id", "stream", "type", "data", "meta", "time", "hash"], {
        "position": {"type": "integer", "minimum": 1}, "id": {"type": "string"},
        "stream": {"type": "string"}, "type": {"type": "string"},
        "data": {"type": "object"}, "meta": {"type": "object"},
        "time": {"type": "string"}, "hash": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}),
    "EventPage": obj(["epoch", "events", "next", "head"], {
        "epoch": {"type": "string"}, "events": {"type": "array", "items": ref("Event")},
        "next": POSITION, "head": POSITION}),
    "SignalSummary": obj(
        ["signal_id", "status", "source", "ticker", "strategy", "action", "received_at",
         "updated_at", "position", "last_position", "claimed_by", "attempts", "last_error",
         "steps"], {
            "signal_id": {"type": "string"}, "status": {"type": "string"},
            "source": {"type": "string"}, "ticker": nullable("string"),
            "strategy": nullable("string"), "action": nullable("string"),
            "received_at": {"type": "string"}, "updated_at": {"type": "string"},
            "position": POSITION, "last_position": POSITION,
            "claimed_by": nullable("string"), "attempts": {"type": "integer"},
            "last_error": nullable("string"),
            "steps": {"type": "object", "additionalProperties": {"type": "string"}},
            "normalized": {"type": "object"},
            "errors": {"type": "array", "items": ref("SignalError")}}),
    "SignalList": obj(["signals", "next_before"], {
        "signals": {"type": "array", "items": ref("SignalSummary")},
        "next_before": nullable("integer")}),
    "SignalDetail": obj(["signal", "status", "events", "truncated"], {
        "signal": ref("SignalSummary"), "status": {"type": "string"},
        "events": {"type": "array", "items": ref("Event"), "maxItems": 10_000},
        "truncated": {"type": "boolean", "description": "the signal has more events than "
                      "these first 10,000: GET /api/events?stream=signal-ID has them all"}}),
    "StatusReport": obj(["status"], {
        "status": {"enum": ["dispatched", "processing", "processed", "failed", "expired"]},
        "detail": {"type": ["object", "null"]}, "consumer": nullable("string")},
        closed=False),
    "StatusOutcome": obj(["signal_id", "status", "position"], {
        "signal_id": {"type": "string"}, "status": {"type": "string"}, "position": POSITION}),
    "Renormalized": obj(["signal_id", "changed", "appended", "position"], {
        "signal_id": {"type": "string"}, "changed": {"type": "boolean"},
        "appended": {"type": "boolean"}, "position": nullable("integer"),
        "received_position": POSITION, "kind": {"type": "string"},
        "recorded": {"type": "object"}, "now": {"type": "object"},
        "fields": {"type": "array", "items": {"type": "object"}}}),
    "AuditReport": obj(
        ["since", "until", "generated_at", "signals", "statuses", "rejections", "duplicates",
         "timings", "stuck"], {
            "since": {"type": "string"}, "until": {"type": "string"},
            "generated_at": {"type": "string"}, "signals": {"type": "integer", "minimum": 0},
            "statuses": {"type": "object", "additionalProperties": {"type": "integer"}},
            "rejections": {"type": "object"}, "duplicates": {"type": "object"},
            "timings": {"type": "object"}, "stuck": {"type": "object"}}),
    "Consumers": obj(["consumers", "head"], {
        "consumers": {"type": "array", "items": obj(["name", "position", "lag", "updated_at"], {
            "name": {"type": "string"}, "position": POSITION, "lag": POSITION,
            "updated_at": {"type": "string"}})},
        "head": POSITION}),
}

INGEST_ANSWERS = {
    "202": answer("accepted: committed to the log", ref("IngestOutcome")),
    "200": answer("a repeat of a recorded signal (same idempotency key): the original",
                  ref("IngestOutcome")),
    "422": answer("authenticated but not a valid signal: recorded as rejected",
                  ref("IngestOutcome")),
    **errors(400, 401, 403, 413, 503),
}
RAW_BODY = {"required": False, "description": "the alert message as TradingView sends it: JSON, "
            "key=value lines, a comma-separated command or free text, whatever the "
            "Content-Type says", "content": {"*/*": {"schema": {"type": "string"}}}}
WEBHOOK_TOKEN = path("token", "a token with scope ingest (TradingView cannot send headers)")
SIGNAL_ID = path("signal_id", "the id answered when the signal was posted")

PATHS: dict[str, Schema] = {
    "/webhooks/tradingview/{token}": {"post": {
        "summary": "a TradingView alert, authenticated by the token in the path",
        "operationId": "webhookWithToken", "security": [], "parameters": [WEBHOOK_TOKEN],
        "requestBody": RAW_BODY, "responses": INGEST_ANSWERS}},
    "/webhooks/tradingview": {"post": {
        "summary": 'a TradingView alert, authenticated by a "passphrase" or "secret" field of '
                   "its JSON body", "operationId": "webhookWithPassphrase", "security": [],
        "requestBody": RAW_BODY, "responses": INGEST_ANSWERS}},
    "/api/signals": {
        "post": {
            "summary": "a canonical signal (scope ingest)", "operationId": "postSignal",
            "security": BEARER,
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                            "description": "a repeat of the key answers the original signal"}],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": ref("Signal")}}},
            "responses": INGEST_ANSWERS},
        "get": {
            "summary": "signals, newest first (scope read)", "operationId": "listSignals",
            "security": BEARER,
            "parameters": [
                query("status", NAMES, "any of these statuses (comma-separated or repeated)"),
                query("ticker", NAMES, "any of these tickers"),
                query("strategy", NAMES, "any of these strategies"),
                query("limit", {"type": "integer", "minimum": 1, "maximum": 500,
                                "default": 50}, "page size"),
                query("before", CURSOR, "only signals first recorded before this position "
                      "(the previous page's next_before)"),
                query("stuck", {"enum": ["true", "false", "1", "0", "yes", "no"]},
                      "true: only claims older than SIGNALBOX_CLAIM_LEASE without an outcome"),
            ],
            "responses": {"200": answer("a page of signals", ref("SignalList")),
                          **errors(400, 401, 403, 503)}},
    },
    "/api/signals/{signal_id}": {"get": {
        "summary": "one signal and its whole timeline (scope read)", "operationId": "getSignal",
        "security": BEARER, "parameters": [SIGNAL_ID],
        "responses": {"200": answer("the signal", ref("SignalDetail")),
                      **errors(401, 403, 404, 503)}}},
    "/api/signals/{signal_id}/status": {"post": {
        "summary": "report a processing status (scope report)", "operationId": "postStatus",
        "security": BEARER, "parameters": [SIGNAL_ID],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": ref("StatusReport")}}},
        "responses": {"200": answer("the status event was appended", ref("StatusOutcome")),
                      **errors(400, 401, 403, 404, 409, 413, 503)}}},
    "/api/signals/{signal_id}/renormalize": {"post": {
        "summary": "read the recorded body again with today's parsers (scope admin)",
        "operationId": "renormalize", "security": BEARER, "parameters": [SIGNAL_ID],
        "responses": {"201": answer("the change was recorded", ref("Renormalized")),
                      "200": answer("no change, or recorded before", ref("Renormalized")),
                      **errors(401, 403, 404, 503)}}},
    "/api/audit/report": {"get": {
        "summary": "outcomes, reasons, duplicates, timings and stuck signals of the signals "
                   "received in a window (scope read)", "operationId": "auditReport",
        "security": BEARER,
        "parameters": [
            query("since", {"type": "string"}, "ISO 8601, or a span before now: 24h, 7d"),
            query("until", {"type": "string"}, "ISO 8601, or a span before now (default: now)"),
            query("stuck_after", {"type": "string"}, "a span such as 15m (default: the claim "
                                                     "lease)"),
        ],
        "responses": {"200": answer("the report", ref("AuditReport")),
                      **errors(400, 401, 403, 503)}}},
    "/api/consumers": {"get": {
        "summary": "durable consumers and their lag (scope read)",
        "operationId": "listConsumers", "security": BEARER,
        "responses": {"200": answer("every consumer", ref("Consumers")),
                      **errors(401, 403, 503)}}},
    "/api/events": {"get": {
        "summary": "events after a cursor (scope read)", "operationId": "readEvents",
        "security": BEARER,
        "parameters": [
            query("after", CURSOR, "the last position seen (0: from the beginning)"),
            query("order", {"enum": ["oldest", "newest"], "default": "oldest"},
                  "newest: newest first, from the head down to after"),
            query("before", CURSOR, "with order=newest: only positions below it (the previous "
                  "page's next; 0: from the head)"),
            query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                  "page size"),
            query("type", NAMES, "type patterns, globs * and ?"),
            query("stream", NAMES, "streams"), query("ticker", NAMES, "tickers"),
            query("strategy", NAMES, "strategies"),
        ],
        "responses": {"200": answer("a page of events", ref("EventPage")),
                      **errors(400, 401, 403, 503)}}},
    "/ws": {"get": {
        "summary": "the event stream, a WebSocket: its frames are in docs/protocol.md (a plain "
                   "GET is answered 426)", "operationId": "stream", "security": [],
        "responses": {"101": {"description": "switching to the WebSocket protocol"},
                      **errors(426)}}},
    "/healthz": {"get": {
        "summary": "the process is alive", "operationId": "healthz", "security": [],
        "responses": {"200": answer("alive", obj(["status"], {"status": {"const": "ok"}}))}}},
    "/readyz": {"get": {
        "summary": "the log answers", "operationId": "readyz", "security": [],
        "responses": {
            "200": answer("ready", obj(["status", "epoch", "head", "subscribers_head"], {
                "status": {"const": "ready"}, "epoch": {"type": "string"}, "head": POSITION,
                "subscribers_head": POSITION})),
            **errors(503)}}},
    "/metrics": {"get": {
        "summary": "Prometheus text exposition", "operationId": "metrics", "security": [],
        "responses": {"200": answer("metrics", {"type": "string"}, media_type="text/plain"),
                      **errors(503)}}},
    "/openapi.json": {"get": {
        "summary": "this description", "operationId": "openapi", "security": [],
        "responses": {"200": answer("OpenAPI 3.1", {"type": "object"})}}},
}

for _path, _item in PATHS.items():
    for _method, _operation in _item.items():
        _operation["responses"].setdefault("400", errors(400)["400"])
        if _path.startswith(("/api/", "/webhooks/")):
            # An address refused after failed authentications; a token over its ingestion rate.
            _operation["responses"].setdefault("429", errors(429)["429"])
            if _method == "post":
                _operation["responses"].setdefault("408", errors(408)["408"])

DESCRIPTION = {
    "openapi": "3.1.0",
    "info": {
        "title": "Signalbox",
        "version": __version__,
        "description": "An append-only event log of trading signals. Every error body is "
                       '{"error": CODE, "message": TEXT}. The WebSocket stream /ws is described '
                       "in docs/protocol.md.",
    },
    "security": BEARER,
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "Authorization: Bearer TOKEN"}},
        "headers": {"RequestId": {"description": "the request's id: the client's X-Request-Id "
                                                 "when valid, else one made by the server",
                                  "schema": {"type": "string"}}},
    },
}


async def openapi_endpoint(request: Request) -> Response:
    return JSONResponse(DESCRIPTION)
