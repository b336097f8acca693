"""Structured logs and request ids: JSON lines, the id echoed, logged and kept in the events."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from tests.support import ADMIN_TOKEN, INGEST_TOKEN, ServerProcess, headers, wait_until

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}


def json_lines(server: ServerProcess) -> list[dict[str, Any]]:
    """Every line the server wrote after it started serving, each parsed as one JSON object."""
    lines = [line for line in server.output if line.strip()]
    started = next(i for i, line in enumerate(lines) if "Uvicorn running on" in line)
    parsed = []
    for line in lines[started:]:
        value = json.loads(line)
        assert isinstance(value, dict), line
        parsed.append(value)
    return parsed


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_json_log_lines_carry_the_request_id_that_the_events_keep(
        database_url: str) -> None:
    server = ServerProcess(database_url, args=["--log-format", "json", "--access-log"]).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            posted = await client.post("/api/signals", json=BTC, headers=headers(
                INGEST_TOKEN, **{"X-Request-Id": "order-42.retry-1"}))
            assert posted.status_code == 202
            assert posted.headers["x-request-id"] == "order-42.retry-1"
            signal_id = posted.json()["signal_id"]
            hook = await client.post(f"/webhooks/tradingview/{INGEST_TOKEN}",
                                     content=json.dumps(BTC))
            generated = hook.headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{24}", generated)
            bad = await client.post("/api/signals", json=BTC, headers=headers(
                INGEST_TOKEN, **{"X-Request-Id": "has spaces\tand; quotes\""}))
            assert bad.headers["x-request-id"] != "has spaces\tand; quotes\""
            missing = await client.get("/api/signals/nope", headers=headers())
            assert missing.status_code == 404 and missing.headers["x-request-id"]

            timeline = (await client.get(f"/api/signals/{signal_id}",
                                         headers=headers())).json()["events"]
            assert [e["meta"]["request_id"] for e in timeline] == ["order-42.retry-1"] * 2
            assert timeline[0]["meta"]["signal_id"] == signal_id
            events = (await client.get("/api/events", headers=headers())).json()["events"]
            assert events[2]["meta"]["request_id"] == generated

        def logged(request_id: str) -> bool:
            return any(line.get("request_id") == request_id for line in json_lines(server))

        wait_until(lambda: logged("order-42.retry-1") and logged(generated))
        lines = json_lines(server)
        access = next(line for line in lines if line["request_id"] == "order-42.retry-1")
        assert access["logger"] == "uvicorn.access" and access["level"] == "info"
        assert access["method"] == "POST" and access["path"] == "/api/signals"
        assert access["status"] == 202 and access["time"].endswith("Z")
        assert "POST /api/signals" in access["message"]
        hook_line = next(line for line in lines if line["request_id"] == generated)
        assert hook_line["path"] == "/webhooks/tradingview/[redacted]"
        startup = next(line for line in lines if "Uvicorn running on" in line["message"])
        assert startup["request_id"] is None and startup["logger"] == "uvicorn.error"
    finally:
        server.stop()
    output = "".join(server.output)
    assert INGEST_TOKEN not in output and ADMIN_TOKEN not in output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_text_logs_are_the_default_and_requests_still_get_an_id(
        database_url: str) -> None:
    server = ServerProcess(database_url, args=["--access-log"]).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            response = await client.get("/healthz", headers={"X-Request-Id": "probe-1"})
            assert response.headers["x-request-id"] == "probe-1"
            hook = await client.post(f"/webhooks/tradingview/{INGEST_TOKEN}",
                                     content=json.dumps(BTC))
            assert hook.status_code == 202
        wait_until(lambda: any("/webhooks/tradingview/[redacted]" in line
                               for line in server.output))
        with pytest.raises(ValueError):
            json.loads(next(line for line in server.output if "GET /healthz" in line))
    finally:
        server.stop()
    assert INGEST_TOKEN not in "".join(server.output)
