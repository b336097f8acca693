"""The Pine Script templates of docs/tradingview/ send alerts that Signalbox accepts as is.

Each template builds its message from the constant SIGNALBOX_JSON, filling in its %NAME%
parts with str.replace_all; the test fills them in as the script would when the alert fires,
and posts the result to a real server's webhook. The placeholder messages of the README are
filled in as TradingView would, and posted the same way.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.support import ADMIN_TOKEN, INGEST_TOKEN, headers, repo_root

DOCS = repo_root() / "docs" / "tradingview"
TEMPLATE = re.compile(r"^const string SIGNALBOX_JSON = '(.*)'$", re.M)
FILLED = re.compile(r'str\.replace_all\(json, "(%[A-Z_]+%)"')


def stamp() -> str:
    """TradingView's {{timenow}}: the moment the alert fires (now, not when the suite began:
    the templates set max_lag 60)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pine_values(action: str, fired: str) -> dict[str, str]:
    """What the templates' signalboxJson() puts in, for a bar of NASDAQ:AAPL on the hour chart."""
    return {
        "%TICKER%": "AAPL", "%EXCHANGE%": "NASDAQ", "%ACTION%": action, "%QUANTITY%": "1.5",
        "%PRICE%": "187.23", "%INTERVAL%": "60", "%STRATEGY%": "sma-cross",
        "%ORDER_ID%": "Long", "%TIME%": fired, "%BAR_TIME%": "2026-01-15T14:00:00Z",
        "%MAX_LAG%": "60", "%COMMENT%": "RSI left oversold",
        "%ID%": f"sma-cross-Long-{action}-AAPL-{uuid.uuid4().hex}",
    }


def fill_pine(name: str, action: str, fired: str) -> str:
    source = (DOCS / name).read_text()
    found = TEMPLATE.search(source)
    assert found, f"{name}: no SIGNALBOX_JSON constant"
    template = found.group(1)
    used = set(re.findall(r"%[A-Z_]+%", template))
    assert used == set(FILLED.findall(source)), f"{name}: a %NAME% is never filled in"
    message = template
    for token, value in pine_values(action, fired).items():
        message = message.replace(token, value)
    return message


def readme_messages() -> list[str]:
    text = (DOCS / "README.md").read_text()
    return re.findall(r"```json\n(.*?)\n```", text, re.S)


def fill_placeholders(message: str) -> str:
    """What TradingView makes of the README's messages for a fill of NASDAQ:AAPL."""
    values = {
        "ticker": "AAPL", "exchange": "NASDAQ", "strategy.order.action": "sell",
        "strategy.order.contracts": "2", "strategy.order.price": "187.5", "interval": "15",
        "strategy.order.id": "Long", "timenow": stamp(), "close": "187.5",
        "time": "2026-01-15T14:45:00Z",
    }
    filled = re.sub(r"\{\{([a-z_.]+)\}\}", lambda m: values[m.group(1)], message)
    # One alert, one idempotency key: make it unique to this test run.
    return filled.replace('"id": "', f'"id": "{uuid.uuid4().hex}-', 1)


async def post_webhook(client: httpx.AsyncClient, message: str) -> httpx.Response:
    # TradingView labels its bodies text/plain whatever they hold.
    return await client.post(f"/webhooks/tradingview/{INGEST_TOKEN}",
                             content=message.encode(),
                             headers={"Content-Type": "text/plain; charset=utf-8"})


async def normalized(client: httpx.AsyncClient, signal_id: str) -> dict[str, Any]:
    answer = await client.get(f"/api/signals/{signal_id}", headers=headers(ADMIN_TOKEN))
    assert answer.status_code == 200
    value: dict[str, Any] = answer.json()["signal"]["normalized"]
    return value


@pytest.mark.parametrize(("name", "action"), [
    ("signalbox-strategy.pine", "buy"), ("signalbox-strategy.pine", "exit_long"),
    ("signalbox-indicator.pine", "buy"), ("signalbox-indicator.pine", "sell"),
])
async def test_pine_templates_send_signals_accepted_as_is(
        module_client: httpx.AsyncClient, name: str, action: str) -> None:
    fired = stamp()
    message = fill_pine(name, action, fired)
    answer = await post_webhook(module_client, message)
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "accepted"
    signal = await normalized(module_client, answer.json()["signal_id"])
    assert signal["ticker"] == "AAPL"
    assert signal["exchange"] == "NASDAQ"
    assert signal["action"] == action
    assert signal["quantity"] == "1.5"
    assert signal["price"] == "187.23"
    assert signal["interval"] == "60"
    assert signal["max_lag"] == 60
    assert signal["signal_time"].startswith(fired.removesuffix("Z"))
    assert signal["extras"] == {}, "every field of the template is a Signalbox field"
    # A resend of the same alert is recorded once.
    again = await post_webhook(module_client, message)
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    assert again.json()["signal_id"] == answer.json()["signal_id"]


async def test_readme_placeholder_messages_are_accepted(module_client: httpx.AsyncClient) -> None:
    messages = readme_messages()
    assert len(messages) == 2
    for message in messages:
        answer = await post_webhook(module_client, fill_placeholders(message))
        assert answer.status_code == 202, answer.text
        signal = await normalized(module_client, answer.json()["signal_id"])
        assert signal["ticker"] == "AAPL"
        assert signal["price"] == "187.5"


async def test_passphrase_in_the_message_instead_of_the_url(
        module_client: httpx.AsyncClient) -> None:
    body = json.loads(fill_pine("signalbox-indicator.pine", "buy", stamp()))
    body["passphrase"] = INGEST_TOKEN
    answer = await module_client.post("/webhooks/tradingview", content=json.dumps(body).encode())
    assert answer.status_code == 202, answer.text


async def test_a_placeholder_left_unfilled_is_rejected_by_name(
        module_client: httpx.AsyncClient) -> None:
    message = readme_messages()[0].replace('"id": "', f'"id": "{uuid.uuid4().hex}-', 1)
    answer = await post_webhook(module_client, message)
    assert answer.status_code == 422
    assert "unreplaced_placeholder" in {e["code"] for e in answer.json()["errors"]}
