"""The signal contract: what TradingView, the relays and bots send, and what becomes of it."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import textformats as tf
from pipeline.signal_fields import ALIASES, DISTANCE_ALIASES_IN_COMMANDS
from pipeline.signals import (
    Action,
    BodyFormat,
    OrderType,
    ParsedBody,
    QuantityType,
    Signal,
    SignalError,
    SignalErrorCode,
    TimeInForce,
    _absent,
    _Draft,
    _pick_lenient,
    parse_api_signal,
    parse_tradingview,
    redact_body,
)

NOW = datetime(2025, 3, 5, 12, 0, tzinfo=UTC)
DATA_FILE = Path(__file__).parents[2] / "shared" / "data" / "tradingview-alerts.jsonl"
CODES = {code.value for code in SignalErrorCode}

# Copies of /work/shared/data/tradingview-alerts.jsonl, so the suite stands on its own.
EMBEDDED_ALERTS: dict[str, str] = {
    "strategy_fill": (
        '{"ticker":"BTCUSDT","exchange":"BINANCE","action":"buy","contracts":0.015,'
        '"price":67432.5,"order_id":"Long Entry","comment":"Long Entry","market_position":"long",'
        '"prev_market_position":"flat","position_size":0.015,"interval":"15",'
        '"bar_time":"2025-01-15T14:30:00Z","time":"2025-01-15T14:45:01Z"}'
    ),
    "exit_flat_futures": (
        '{"ticker":"ES1!","action":"sell","sentiment":"flat","quantity":2,"price":5234.25,'
        '"time":"2025-02-03T20:59:00Z"}'
    ),
    "threecommas_strings": (
        '{"max_lag":"300000000","timestamp":"2025-01-15T14:45:01Z","trigger_price":"67432.5",'
        '"tv_exchange":"BINANCE","tv_instrument":"BTCUSDT","action":"sell",'
        '"bot_uuid":"5c1e2d3a-0b7e-4c1a-9f00-2b8e6d1c4a77","strategy_info":'
        '{"market_position":"short","market_position_size":"0.015","prev_market_position":"long",'
        '"prev_market_position_size":"0.015"},"order":{"amount":"0.03","currency_type":"base"}}'
    ),
    "unreplaced_placeholders": (
        '{"ticker":"CL1!","exchange":"NYMEX_DL","action":"{{strategy.order.action}}",'
        '"quantity":"{{strategy.order.contracts}}","price":78.41}'
    ),
    "invalid_json_placeholder": '{"ticker":"{{ticker}}","action":"buy","price":{{close}}}',
    "multiline_crlf_extras": (
        '{\r\n"ticker": "TSLA",\r\n"action": "buy",\r\n"price": "420.69",\r\n'
        '"time": "1736951101000",\r\n"my message": "this came from simple strategy",\r\n'
        '"extras": {"atr": 12.7, "test": true}\r\n}'
    ),
    "tv_plain_text": "NASDAQ:AAPL, price = 189.37, volume = 51234981",
    "pineconnector_csv": "60123456789,buy,EURUSD,risk=1,sl=10,tp=20",
    "indicator_plots": (
        '{"ticker":"AAPL","exchange":"NASDAQ","signal":"rsi_cross_up","rsi":28.4139,'
        '"ema":188.9021,"close":189.37,"interval":"60","time":"2025-03-04T15:00:00Z"}'
    ),
}


@dataclass(frozen=True)
class Outcome:
    """The decided outcome of a recorded alert: the signal's data, or the (code, field) errors."""

    format: BodyFormat
    signal: dict[str, Any] | None = None
    errors: frozenset[tuple[str, str | None]] = frozenset()


EXPECTED: dict[str, Outcome] = {
    "strategy_fill": Outcome(
        BodyFormat.JSON,
        signal={
            "ticker": "BTCUSDT",
            "exchange": "BINANCE",
            "action": "buy",
            "quantity": "0.015",
            "order_type": "market",
            "price": "67432.5",
            "interval": "15",
            "bar_time": "2025-01-15T14:30:00.000000Z",
            "signal_time": "2025-01-15T14:45:01.000000Z",
            "order_id": "Long Entry",
            "comment": "Long Entry",
            "extras": {
                "market_position": "long",
                "prev_market_position": "flat",
                "position_size": 0.015,
            },
        },
    ),
    "exit_flat_futures": Outcome(
        BodyFormat.JSON,
        signal={
            "ticker": "ES1!",
            "action": "exit_long",
            "quantity": "2",
            "order_type": "market",
            "price": "5234.25",
            "signal_time": "2025-02-03T20:59:00.000000Z",
            "extras": {"sentiment": "flat", "side": "sell"},
        },
    ),
    "threecommas_strings": Outcome(
        BodyFormat.JSON,
        signal={
            "ticker": "BTCUSDT",
            "exchange": "BINANCE",
            "action": "sell",
            "quantity": "0.03",
            "quantity_type": "contracts",
            "order_type": "market",
            "price": "67432.5",
            "signal_time": "2025-01-15T14:45:01.000000Z",
            "max_lag": 300000000,
            "extras": {
                "bot_uuid": "5c1e2d3a-0b7e-4c1a-9f00-2b8e6d1c4a77",
                "strategy_info": {
                    "market_position": "short",
                    "market_position_size": "0.015",
                    "prev_market_position": "long",
                    "prev_market_position_size": "0.015",
                },
            },
        },
    ),
    "unreplaced_placeholders": Outcome(
        BodyFormat.JSON,
        errors=frozenset(
            {("unreplaced_placeholder", "action"), ("unreplaced_placeholder", "quantity")}
        ),
    ),
    "invalid_json_placeholder": Outcome(
        BodyFormat.TEXT,
        errors=frozenset(
            {("unreplaced_placeholder", "ticker"), ("unreplaced_placeholder", "price")}
        ),
    ),
    "multiline_crlf_extras": Outcome(
        BodyFormat.JSON,
        signal={
            "ticker": "TSLA",
            "action": "buy",
            "order_type": "market",
            "price": "420.69",
            "signal_time": "2025-01-15T14:25:01.000000Z",
            "extras": {"my message": "this came from simple strategy", "atr": 12.7, "test": True},
        },
    ),
    "tv_plain_text": Outcome(BodyFormat.CSV, errors=frozenset({("missing_field", "action")})),
    "pineconnector_csv": Outcome(
        BodyFormat.CSV,
        signal={
            "ticker": "EURUSD",
            "action": "buy",
            "quantity": "1",
            "quantity_type": "risk",
            "order_type": "market",
            "extras": {"license_id": "60123456789", "sl": "10", "tp": "20"},
        },
    ),
    "indicator_plots": Outcome(BodyFormat.JSON, errors=frozenset({("missing_field", "action")})),
}


def _file_alerts() -> list[tuple[str, str]]:
    if not DATA_FILE.exists():
        return []
    lines = DATA_FILE.read_text(encoding="utf-8").splitlines()
    cases = [json.loads(line) for line in lines if line.strip()]
    return [(str(case["name"]), str(case["body"])) for case in cases]


ALERTS = [("embedded", name, body) for name, body in EMBEDDED_ALERTS.items()] + [
    ("file", name, body) for name, body in _file_alerts()
]


def tv(body: str, now: datetime = NOW, default_max_lag: int | None = None) -> ParsedBody:
    parsed = parse_tradingview(body, now=now, default_max_lag=default_max_lag)
    assert_well_formed(parsed)
    return parsed


def api(obj: object, now: datetime = NOW, default_max_lag: int | None = None) -> ParsedBody:
    parsed = parse_api_signal(obj, now=now, default_max_lag=default_max_lag)
    assert_well_formed(parsed)
    return parsed


def accepted(parsed: ParsedBody) -> Signal:
    assert parsed.errors == (), [error.to_data() for error in parsed.errors]
    assert parsed.signal is not None
    return parsed.signal


def error_pairs(parsed: ParsedBody) -> set[tuple[str, str | None]]:
    return {(str(error.code), error.field) for error in parsed.errors}


def the_error(parsed: ParsedBody) -> SignalError:
    assert len(parsed.errors) == 1, [error.to_data() for error in parsed.errors]
    return parsed.errors[0]


def assert_well_formed(parsed: ParsedBody) -> None:
    """What holds for every answer, whatever the input."""
    assert isinstance(parsed, ParsedBody)
    assert (parsed.signal is None) == bool(parsed.errors)
    json.dumps(parsed.fields, allow_nan=False)  # fields go to the log as they are
    for error in parsed.errors:
        assert error.code in CODES and error.message
        assert json.dumps(error.to_data())
    if parsed.signal is not None:
        assert_round_trips(parsed.signal)
    lowered = {key.lower() for key in parsed.fields}
    assert not lowered & {"passphrase", "secret"}


def assert_round_trips(signal: Signal) -> None:
    data = signal.to_data()
    json.dumps(data, allow_nan=False)
    assert Signal.model_validate(data) == signal
    assert Signal.model_validate(json.loads(json.dumps(data))).to_data() == data


# -- the recorded alerts -------------------------------------------------------------------


@pytest.mark.parametrize(("source", "name", "body"), ALERTS, ids=[f"{s}-{n}" for s, n, _ in ALERTS])
def test_recorded_alert_has_its_decided_outcome(source: str, name: str, body: str) -> None:
    parsed = tv(body)
    expected = EXPECTED.get(name)
    if expected is None:
        return  # a new kind of alert in the data file: it must only never break the parser
    assert parsed.format == expected.format
    if expected.signal is not None:
        assert accepted(parsed).to_data() == expected.signal
    else:
        assert error_pairs(parsed) == expected.errors


def test_threecommas_all_strings_body_is_accepted() -> None:
    signal = accepted(tv(EMBEDDED_ALERTS["threecommas_strings"]))
    assert (signal.ticker, signal.exchange, signal.action) == ("BTCUSDT", "BINANCE", Action.SELL)
    assert signal.quantity == Decimal("0.03")
    assert signal.quantity_type is QuantityType.CONTRACTS
    assert signal.price == Decimal("67432.5")
    assert "order" not in signal.extras  # fully mapped, so nothing of it is left over


def test_strategy_fill_is_accepted_as_a_buy_of_its_contracts() -> None:
    signal = accepted(tv(EMBEDDED_ALERTS["strategy_fill"]))
    assert (signal.action, signal.ticker, signal.quantity) == (
        Action.BUY,
        "BTCUSDT",
        Decimal("0.015"),
    )
    assert signal.bar_time == datetime(2025, 1, 15, 14, 30, tzinfo=UTC)
    assert signal.signal_time == datetime(2025, 1, 15, 14, 45, 1, tzinfo=UTC)


def test_sell_to_flat_futures_is_an_exit_long_keeping_the_side() -> None:
    signal = accepted(tv(EMBEDDED_ALERTS["exit_flat_futures"]))
    assert (signal.action, signal.ticker, signal.quantity) == (Action.EXIT_LONG, "ES1!", Decimal(2))
    assert signal.extras["side"] == "sell"


def test_buy_to_flat_is_an_exit_short() -> None:
    body = '{"ticker":"ES1!","action":"buy","market_position":"Flat"}'
    assert accepted(tv(body)).action is Action.EXIT_SHORT


def test_crlf_body_with_extras_object_and_epoch_ms_is_accepted() -> None:
    signal = accepted(tv(EMBEDDED_ALERTS["multiline_crlf_extras"]))
    assert signal.price == Decimal("420.69")
    assert signal.signal_time == datetime.fromtimestamp(1736951101, UTC)
    assert signal.extras == {
        "my message": "this came from simple strategy",
        "atr": Decimal("12.7"),
        "test": True,
    }


def test_indicator_body_without_action_is_rejected_with_its_plots_kept() -> None:
    parsed = tv(EMBEDDED_ALERTS["indicator_plots"])
    error = the_error(parsed)
    assert (error.code, error.field) == ("missing_field", "action")
    assert '"action": "{{strategy.order.action}}"' in error.message
    assert parsed.fields["rsi"] == 28.4139 and parsed.fields["signal"] == "rsi_cross_up"


def test_each_unreplaced_placeholder_is_named_and_quoted() -> None:
    parsed = tv(EMBEDDED_ALERTS["unreplaced_placeholders"])
    messages = {error.field: error.message for error in parsed.errors}
    assert "{{strategy.order.action}}" in messages["action"]
    assert "{{strategy.order.contracts}}" in messages["quantity"]
    assert "did not substitute" in messages["action"]


def test_alert_string_with_bare_placeholders_names_each_key_and_extracts_nothing() -> None:
    parsed = tv(EMBEDDED_ALERTS["invalid_json_placeholder"])
    assert parsed.format is BodyFormat.TEXT and parsed.fields == {}
    assert "{{close}}" in next(e.message for e in parsed.errors if e.field == "price")


def test_tradingview_plain_text_example_takes_exchange_ticker_and_pairs() -> None:
    parsed = tv("NASDAQ:AAPL, price = 189.37, volume = 51234981, action = buy")
    signal = accepted(parsed)
    assert (signal.exchange, signal.ticker, signal.price) == ("NASDAQ", "AAPL", Decimal("189.37"))
    assert signal.quantity is None and signal.extras == {"volume": "51234981"}
    assert parsed.format is BodyFormat.CSV


def test_pineconnector_command_is_a_risk_sized_order_with_its_licence_kept() -> None:
    signal = accepted(tv(EMBEDDED_ALERTS["pineconnector_csv"]))
    assert (signal.quantity, signal.quantity_type) == (Decimal(1), QuantityType.RISK)
    # PineConnector's sl/tp are distances in pips, never prices: kept as sent, in extras.
    assert (signal.stop_loss, signal.take_profit) == (None, None)
    assert signal.extras == {"license_id": "60123456789", "sl": "10", "tp": "20"}


# -- actions -------------------------------------------------------------------------------

ACTION_ALIASES = {
    Action.BUY: "buy long enter_long open_long go_long bull bullish",
    Action.SELL: "sell short enter_short open_short go_short bear bearish",
    Action.EXIT_LONG: "exit_long close_long sell_to_close long_exit",
    Action.EXIT_SHORT: "exit_short close_short cover buy_to_cover short_exit",
    Action.CLOSE: "exit close flat flatten close_all exit_all closeall",
}
ACTION_TABLE = [
    (word, action) for action, words in ACTION_ALIASES.items() for word in words.split()
]


@pytest.mark.parametrize(("word", "action"), ACTION_TABLE)
def test_action_alias_is_normalized(word: str, action: Action) -> None:
    assert accepted(tv(json.dumps({"ticker": "AAPL", "action": word}))).action is action
    shouted = word.upper().replace("_", "-")
    assert accepted(tv(f"ticker=AAPL\naction= {shouted} ")).action is action


@pytest.mark.parametrize("key", ["action", "side", "order_action", "direction", "Order-Action"])
def test_action_is_read_from_each_of_its_names(key: str) -> None:
    assert accepted(tv(json.dumps({"symbol": "AAPL", key: "Sell"}))).action is Action.SELL


def test_action_nested_like_the_strategy_placeholder_is_read() -> None:
    body = {"ticker": "AAPL", "strategy": {"order": {"action": "sell", "contracts": "3"}}}
    signal = accepted(tv(json.dumps(body)))
    assert (signal.action, signal.quantity) == (Action.SELL, Decimal(3))


def test_unknown_action_word_lists_the_accepted_words() -> None:
    error = the_error(tv('{"ticker":"AAPL","action":"hodl"}'))
    assert (error.code, error.field) == ("unknown_action", "action")
    assert "hodl" in error.message and "buy_to_cover" in error.message


def test_api_takes_only_canonical_action_words() -> None:
    error = the_error(api({"ticker": "AAPL", "action": "long"}))
    assert (error.code, error.field) == ("unknown_action", "action")
    assert accepted(api({"ticker": "AAPL", "action": "EXIT_SHORT"})).action is Action.EXIT_SHORT


# -- field names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "attribute", "expected"),
    [
        ("symbol", "msft", "ticker", "MSFT"),
        ("tv_instrument", "BTCUSDT.P", "ticker", "BTCUSDT.P"),
        ("Pair", "ETHUSDT", "ticker", "ETHUSDT"),
        ("tv_exchange", "bybit", "exchange", "BYBIT"),
        ("qty", "5", "quantity", Decimal(5)),
        ("Contracts", 1.5, "quantity", Decimal("1.5")),
        ("size", "0.25", "quantity", Decimal("0.25")),
        ("amount", 100, "quantity", Decimal(100)),
        ("qty_type", "Quote", "quantity_type", QuantityType.QUOTE),
        ("percent", "10", "quantity_type", QuantityType.PERCENT),
        ("close", "189.37", "price", Decimal("189.37")),
        ("trigger_price", "1.1", "price", Decimal("1.1")),
        ("fill_price", 2, "price", Decimal(2)),
        ("tp", "200", "take_profit", Decimal(200)),
        ("TakeProfit", "200", "take_profit", Decimal(200)),
        ("sl", "90", "stop_loss", Decimal(90)),
        ("stop-loss", "90", "stop_loss", Decimal(90)),
        ("tif", "IOC", "time_in_force", TimeInForce.IOC),
        ("timeframe", "1D", "interval", "1D"),
        ("tf", 15, "interval", "15"),
        (
            "timenow",
            "2025-03-05T11:59:00Z",
            "signal_time",
            datetime(2025, 3, 5, 11, 59, tzinfo=UTC),
        ),
        ("timestamp", 1741175940, "signal_time", datetime(2025, 3, 5, 11, 59, tzinfo=UTC)),
        ("strategy_name", "Breakout", "strategy", "Breakout"),
        ("orderid", 42, "order_id", "42"),
        ("client_order_id", "abc", "order_id", "abc"),
        ("message", "hello 🚀", "comment", "hello 🚀"),
        ("msg", "hi", "comment", "hi"),
        ("max_lag", "60", "max_lag", 60),
    ],
)
def test_field_alias_is_mapped(key: str, value: Any, attribute: str, expected: Any) -> None:
    body = {name: v for name, v in {"ticker": "AAPL", "action": "buy"}.items() if name != attribute}
    signal = accepted(tv(json.dumps({**body, key: value})))
    assert getattr(signal, attribute) == expected
    assert key not in signal.extras


def test_limit_and_stop_prices_set_the_order_type() -> None:
    def order(**prices: str) -> Signal:
        return accepted(tv(json.dumps({"ticker": "AAPL", "action": "buy", **prices})))

    assert order().order_type is OrderType.MARKET
    assert order(limit="10").order_type is OrderType.LIMIT
    assert order(stop="11").order_type is OrderType.STOP
    assert order(limit_price="10", stop_price="11").order_type is OrderType.STOP_LIMIT
    assert order(order_type="stop_limit", limit="10", stop="11").limit_price == Decimal(10)


def test_explicit_order_type_that_does_not_fit_the_prices_is_rejected() -> None:
    error = the_error(tv('{"ticker":"AAPL","action":"buy","order_type":"market","limit":"5"}'))
    assert (error.code, error.field) == ("invalid_value", "order_type")
    assert "limit_price" in error.message


def test_first_present_alias_wins_and_the_others_stay_in_extras() -> None:
    body = {"ticker": "AAPL", "action": "buy", "close": "10.5", "price": "10.25", "symbol": "X"}
    signal = accepted(tv(json.dumps(body)))
    assert (signal.ticker, signal.price) == ("AAPL", Decimal("10.25"))
    assert signal.extras == {"close": "10.5", "symbol": "X"}


def test_blank_alias_gives_way_to_the_next_one() -> None:
    body = {"ticker": "AAPL", "action": "buy", "price": "", "close": "3"}
    assert accepted(tv(json.dumps(body))).price == Decimal(3)


def test_volume_is_a_plot_not_a_quantity() -> None:
    signal = accepted(tv('{"ticker":"AAPL","action":"buy","volume":51234981}'))
    assert signal.quantity is None and signal.extras == {"volume": 51234981}


def test_ticker_with_exchange_prefix_is_split_and_upper_cased() -> None:
    signal = accepted(tv('{"ticker":" nasdaq:aapl ","action":"buy"}'))
    assert (signal.exchange, signal.ticker) == ("NASDAQ", "AAPL")
    given = accepted(tv('{"ticker":"NASDAQ:AAPL","exchange":"BATS","action":"buy"}'))
    assert (given.exchange, given.ticker) == ("BATS", "AAPL")


def test_missing_ticker_and_action_are_both_reported() -> None:
    parsed = tv('{"price": 5}')
    assert error_pairs(parsed) == {("missing_field", "ticker"), ("missing_field", "action")}


def test_every_problem_is_reported_not_just_the_first() -> None:
    body = '{"ticker":"AAPL","action":"buy","qty":"-1","price":0,"time":"yesterday","tp":"x"}'
    assert error_pairs(tv(body)) == {
        ("invalid_value", "qty"),
        ("invalid_value", "price"),
        ("invalid_value", "time"),
        ("invalid_value", "tp"),
    }


def test_nested_field_errors_name_the_nested_path() -> None:
    body = '{"ticker":"AAPL","action":"buy","order":{"amount":"lots","currency_type":"base"}}'
    error = the_error(tv(body))
    assert (error.code, error.field) == ("invalid_value", "order.amount")
    assert '"lots"' in error.message


# -- placeholders, ids and secrets ---------------------------------------------------------


def test_placeholders_nested_in_extras_and_lists_are_named_by_path() -> None:
    body = {
        "ticker": "AAPL",
        "action": "buy",
        "info": {"plots": [1, "{{plot_0}}"]},
        "rsi": '{{plot("RSI")}}',
    }
    parsed = tv(json.dumps(body))
    assert error_pairs(parsed) == {
        ("unreplaced_placeholder", "info.plots[1]"),
        ("unreplaced_placeholder", "rsi"),
    }
    assert '{{plot("RSI")}}' in next(e.message for e in parsed.errors if e.field == "rsi")


def test_body_id_is_the_idempotency_key_and_not_an_extra() -> None:
    parsed = tv('{"id": 1234, "ticker":"AAPL","action":"buy"}')
    assert parsed.idempotency_key == "1234"
    assert "id" not in accepted(parsed).extras and parsed.fields["id"] == 1234


def test_unsubstituted_id_is_never_an_idempotency_key() -> None:
    parsed = tv('{"id":"{{strategy.order.id}}","ticker":"AAPL","action":"buy"}')
    assert parsed.idempotency_key is None
    assert error_pairs(parsed) == {("unreplaced_placeholder", "id")}


@pytest.mark.parametrize(
    "body",
    [
        '{"ticker":"AAPL","action":"buy","passphrase":"hunter2"}',
        '{"ticker":"AAPL","action":"buy","Secret":"hunter2"}',
        "ticker=AAPL\naction=buy\npassphrase=hunter2",
    ],
)
def test_secret_is_returned_but_never_kept(body: str) -> None:
    parsed = tv(body)
    assert parsed.secret == "hunter2"
    assert "hunter2" not in json.dumps(parsed.fields)
    assert "hunter2" not in json.dumps(accepted(parsed).to_data())


def test_secret_is_stripped_even_from_a_rejected_body() -> None:
    parsed = tv('{"passphrase":"hunter2","price":"{{close}}"}')
    assert parsed.secret == "hunter2" and parsed.signal is None
    assert "passphrase" not in parsed.fields
    assert all("hunter2" not in error.message for error in parsed.errors)


TOKEN = "sbx_" + "k" * 40


@pytest.mark.parametrize("body", [
    '{"ticker":"AAPL","action":"buy","passphrase":"sbx\\u005f' + "k" * 40 + '"}',
    "ticker=AAPL&action=buy&passphrase=sbx%5F" + "k" * 40,
    "ticker=AAPL&action=buy&comment=mine+sbx_" + "k" * 40 + "&passphrase=sbx%5F" + "k" * 40,
    '{"ticker":"AAPL","action":"buy","passphrase":"' + TOKEN + '","secret":"other-secret-9"}',
    '{"ticker":"AAPL","action":"buy","comment":"my token: ' + TOKEN + '","extras":{"'
    + TOKEN + '":"' + TOKEN + '"},"passphrase":"' + TOKEN + '"}',
])
def test_every_secret_is_cut_out_of_the_kept_body_and_values(body: str) -> None:
    parsed = tv(body)
    assert parsed.secret == TOKEN
    kept = redact_body(body, parsed.secrets)
    for secret in (TOKEN, "other-secret-9", "k" * 40):
        assert secret not in kept
        assert secret not in json.dumps(parsed.fields)
        assert secret not in json.dumps(accepted(parsed).to_data())
    assert tv(kept).signal == parsed.signal  # the kept body says all the rest as sent


def test_the_request_token_is_cut_out_of_values_too() -> None:
    body = '{"ticker":"AAPL","action":"buy","comment":"' + TOKEN + '"}'
    parsed = parse_tradingview(body, now=NOW, credentials=(TOKEN,))
    assert accepted(parsed).comment == "[redacted]"
    assert redact_body(body, (TOKEN,)) == body.replace(TOKEN, "[redacted]")
    from_api = parse_api_signal(json.loads(body), now=NOW, credentials=(TOKEN,))
    assert accepted(from_api).comment == "[redacted]"


def test_a_short_secret_leaves_values_that_merely_equal_it() -> None:
    """A token set by hand to "25" must not turn a quantity of 25 into "[redacted]"; the
    recorded body loses it all the same, also written escaped."""
    parsed = tv('{"ticker":"AAPL","action":"buy","quantity":"25","passphrase":"25"}')
    assert parsed.secret == "25" and accepted(parsed).quantity == Decimal("25")
    assert "passphrase" not in parsed.fields
    escaped = '{"ticker":"AAPL","action":"buy","passphrase":"2\\u0035"}'
    assert tv(escaped).secret == "25"
    assert redact_body(escaped, ("25",)) == escaped.replace('"2\\u0035"', '"[redacted]"')
    encoded = "ticker=AAPL&action=buy&passphrase=2%35"
    assert redact_body(encoded, ("25",)) == "ticker=AAPL&action=buy&passphrase=[redacted]"


# -- key=value, CSV and free text ----------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "ticker=AAPL\naction=buy\nqty=2",
        "ticker=AAPL\r\naction=buy\r\nqty=2\r\n",
        "ticker=AAPL&action=buy&qty=2",
        "ticker=AAPL;action=buy;qty=2",
        "ticker=AAPL,action=buy,qty=2",
        "ticker = AAPL, action = buy, qty = 2",
        "ticker=\"AAPL\"\naction='buy'\nqty=2",
    ],
)
def test_key_value_variants_give_the_same_signal(body: str) -> None:
    parsed = tv(body)
    assert parsed.format is BodyFormat.KEY_VALUE
    signal = accepted(parsed)
    assert (signal.ticker, signal.action, signal.quantity) == ("AAPL", Action.BUY, Decimal(2))


def test_url_encoded_form_body_is_decoded() -> None:
    parsed = tv("ticker=BINANCE%3ABTCUSDT&action=buy&comment=Hello+world%21+%F0%9F%9A%80")
    signal = accepted(parsed)
    assert (signal.exchange, signal.ticker) == ("BINANCE", "BTCUSDT")
    assert signal.comment == "Hello world! 🚀"


def test_multi_line_key_value_keeps_commas_and_emoji_in_values() -> None:
    signal = accepted(tv("ticker = AAPL\r\naction = Long\r\ncomment = Buy, then hold 🚀"))
    assert (signal.action, signal.comment) == (Action.BUY, "Buy, then hold 🚀")


def test_csv_bare_words_take_their_roles_and_leftovers_are_kept_as_args() -> None:
    parsed = tv("12345,short,BINANCE:BTCUSDT,extra1,42,qty=0.5")
    signal = accepted(parsed)
    assert parsed.format is BodyFormat.CSV
    assert (signal.action, signal.exchange, signal.ticker) == (Action.SELL, "BINANCE", "BTCUSDT")
    assert signal.extras == {"license_id": "12345", "args": ["extra1", "42"]}


def test_csv_without_a_ticker_is_missing_it() -> None:
    parsed = tv("buy,risk=1")
    assert parsed.format is BodyFormat.CSV
    assert error_pairs(parsed) == {("missing_field", "ticker")}


@pytest.mark.parametrize(
    "body", ["Price crossed above the 200 EMA on AAPL!", "AAPL", "Buy signal, AAPL", "🚀🚀🚀"]
)
def test_free_text_is_unparseable_and_says_to_send_json(body: str) -> None:
    parsed = tv(body)
    error = the_error(parsed)
    assert (parsed.format, error.code, parsed.fields) == (BodyFormat.TEXT, "unparseable", {})
    assert '{"ticker":"{{ticker}}"' in error.message


@pytest.mark.parametrize("body", ["", "   ", "\r\n\t\n", "\ufeff"])
def test_empty_body_is_unparseable(body: str) -> None:
    parsed = tv(body)
    assert (parsed.format, the_error(parsed).code) == (BodyFormat.EMPTY, "unparseable")


def test_invalid_json_reports_where() -> None:
    parsed = tv('{"ticker": "AAPL", "action": buy}')
    error = the_error(parsed)
    assert (error.code, error.field, parsed.fields) == ("invalid_json", None, {})
    assert "line 1 column 30" in error.message


def test_json_that_is_not_an_object_is_an_invalid_value() -> None:
    error = the_error(tv('[{"ticker": "AAPL", "action": "buy"}]'))
    assert (error.code, error.field) == ("invalid_value", None)


# -- times and expiry ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2025-01-15T14:45:01Z", datetime(2025, 1, 15, 14, 45, 1, tzinfo=UTC)),
        ("2025-01-15T16:45:01+02:00", datetime(2025, 1, 15, 14, 45, 1, tzinfo=UTC)),
        ("2025-01-15T14:45:01.250Z", datetime(2025, 1, 15, 14, 45, 1, 250000, tzinfo=UTC)),
        ("2025-01-15 14:45:01", datetime(2025, 1, 15, 14, 45, 1, tzinfo=UTC)),
        ("1736952301", datetime(2025, 1, 15, 14, 45, 1, tzinfo=UTC)),
        (1736952301, datetime(2025, 1, 15, 14, 45, 1, tzinfo=UTC)),
        ("1736952301000", datetime(2025, 1, 15, 14, 45, 1, tzinfo=UTC)),
        (1736952301250, datetime(2025, 1, 15, 14, 45, 1, 250000, tzinfo=UTC)),
        (1736952301.5, datetime(2025, 1, 15, 14, 45, 1, 500000, tzinfo=UTC)),
    ],
)
def test_times_are_read_as_utc(value: Any, expected: datetime) -> None:
    signal = accepted(tv(json.dumps({"ticker": "AAPL", "action": "buy", "bar_time": value})))
    assert signal.bar_time is not None and signal.bar_time.tzinfo is UTC
    assert signal.bar_time == expected


@pytest.mark.parametrize("value", ["yesterday", "2025-13-01T00:00:00Z", -5, True, [1], "1e5"])
def test_unreadable_time_is_an_invalid_value(value: Any) -> None:
    error = the_error(tv(json.dumps({"ticker": "AAPL", "action": "buy", "time": value})))
    assert (error.code, error.field) == ("invalid_value", "time")
    assert "RFC 3339" in error.message


def test_signal_older_than_max_lag_is_expired_and_says_how_old() -> None:
    sent = (NOW - timedelta(seconds=90)).isoformat()
    error = the_error(
        tv(json.dumps({"ticker": "AAPL", "action": "buy", "time": sent, "max_lag": 60}))
    )
    assert (error.code, error.field) == ("expired", "time")
    assert "90 s old" in error.message
    assert accepted(
        tv(json.dumps({"ticker": "AAPL", "action": "buy", "time": sent, "max_lag": 120}))
    )


def test_default_max_lag_applies_only_when_the_body_has_none() -> None:
    sent = (NOW - timedelta(seconds=90)).isoformat()
    plain = json.dumps({"ticker": "AAPL", "action": "buy", "time": sent})
    assert the_error(tv(plain, default_max_lag=60)).code == "expired"
    assert accepted(tv(plain, default_max_lag=120)).max_lag is None
    assert accepted(tv(plain))
    own = json.dumps({"ticker": "AAPL", "action": "buy", "time": sent, "max_lag": "300"})
    assert accepted(tv(own, default_max_lag=60)).max_lag == 300


@pytest.mark.parametrize("value", [0, -1, "1.5", "soon", 10**12])
def test_max_lag_must_be_positive_whole_seconds(value: Any) -> None:
    error = the_error(tv(json.dumps({"ticker": "AAPL", "action": "buy", "max_lag": value})))
    assert (error.code, error.field) == ("invalid_value", "max_lag")


def test_expiry_is_decided_by_the_now_given_not_the_clock() -> None:
    body = {"ticker": "AAPL", "action": "buy", "signal_time": "2000-01-01T00:00:00Z", "max_lag": 5}
    for seconds, expired in ((3, False), (5, False), (6, True)):
        now = datetime(2000, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
        assert (parse_tradingview(json.dumps(body), now=now).signal is None) is expired
        assert (parse_api_signal(body, now=now).signal is None) is expired


# -- exact numbers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected", "text"),
    [
        ('"0.1"', Decimal("0.1"), "0.1"),
        ("0.1", Decimal("0.1"), "0.1"),
        ('"67432.50"', Decimal("67432.5"), "67432.5"),
        ("1e-7", Decimal("0.0000001"), "0.0000001"),
        ('"2E+3"', Decimal("2000"), "2000"),
        ("0.30000000000000004", Decimal("0.30000000000000004"), "0.30000000000000004"),
        (
            "123456789012345678901234567.89",
            Decimal("123456789012345678901234567.89"),
            "123456789012345678901234567.89",
        ),
    ],
)
def test_prices_are_exact_decimals(raw: str, expected: Decimal, text: str) -> None:
    signal = accepted(tv(f'{{"ticker":"AAPL","action":"buy","price":{raw}}}'))
    assert signal.price is not None
    assert signal.price.as_tuple() == expected.as_tuple()  # the same digits, not just equal
    assert signal.to_data()["price"] == text


@pytest.mark.parametrize(
    "raw",
    [
        "0",
        '"0.000"',
        "-1",
        '"NaN"',
        "NaN",
        "Infinity",
        "1e999999",
        '"1e31"',
        "1e-31",
        "9" * 400,
        '"12,5"',
        '"$5"',
        "true",
        '"1_000"',
        "[1]",
    ],
)
def test_absurd_or_non_positive_price_is_an_invalid_value(raw: str) -> None:
    error = the_error(tv(f'{{"ticker":"AAPL","action":"buy","price":{raw}}}'))
    assert (error.code, error.field) == ("invalid_value", "price")


def test_extras_keep_numbers_exact_and_plain_json() -> None:
    body = (
        '{"ticker":"AAPL","action":"buy","atr":12.7,"n":3,"big":0.12345678901234567890123,"x":NaN}'
    )
    signal = accepted(tv(body))
    assert signal.extras == {
        "atr": Decimal("12.7"),
        "n": 3,
        "big": "0.12345678901234567890123",
        "x": "NaN",
    }
    assert json.loads(json.dumps(signal.to_data()))["extras"]["atr"] == 12.7


# -- to_data -------------------------------------------------------------------------------


def test_to_data_is_json_ready_and_omits_none() -> None:
    signal = Signal(
        ticker="aapl",
        action=Action.BUY,
        quantity=Decimal("1.50"),
        price=Decimal("1E+2"),
        signal_time=datetime(2025, 1, 15, 14, 45, 1),
        extras={"atr": 1.25, "ok": True},
    )
    assert signal.to_data() == {
        "ticker": "AAPL",
        "action": "buy",
        "quantity": "1.5",
        "order_type": "market",
        "price": "100",
        "signal_time": "2025-01-15T14:45:01.000000Z",
        "extras": {"atr": 1.25, "ok": True},
    }
    assert_round_trips(signal)


def test_signal_is_frozen_and_forbids_unknown_fields() -> None:
    signal = Signal(ticker="AAPL", action=Action.SELL)
    with pytest.raises(ValueError):
        Signal.model_validate({"ticker": "AAPL", "action": "sell", "colour": "red"})
    with pytest.raises(ValueError):
        signal.ticker = "MSFT"  # type: ignore[misc]


def test_signal_error_to_data() -> None:
    error = SignalError("missing_field", "action", "add it")
    assert error.to_data() == {"code": "missing_field", "field": "action", "message": "add it"}


# -- the canonical API ---------------------------------------------------------------------


def test_api_accepts_canonical_fields_numbers_as_numbers_or_strings() -> None:
    parsed = api(
        {
            "id": "order-7",
            "ticker": "BINANCE:BTCUSDT",
            "action": "buy",
            "quantity": Decimal("0.01"),
            "quantity_type": "quote",
            "limit_price": "60000.5",
            "stop_price": 59000,
            "time_in_force": "gtc",
            "signal_time": 1736951101000,
            "bar_time": "2025-01-15T14:00:00Z",
            "strategy": "grid",
            "extras": {"note": "hi", "ratio": 0.5},
        }
    )
    signal = accepted(parsed)
    assert parsed.idempotency_key == "order-7" and parsed.format is BodyFormat.JSON
    assert (signal.exchange, signal.ticker, signal.order_type) == (
        "BINANCE",
        "BTCUSDT",
        OrderType.STOP_LIMIT,
    )
    assert (signal.quantity, signal.limit_price, signal.stop_price) == (
        Decimal("0.01"),
        Decimal("60000.5"),
        Decimal(59000),
    )
    assert signal.signal_time == datetime(2025, 1, 15, 14, 25, 1, tzinfo=UTC)
    assert signal.extras == {"note": "hi", "ratio": Decimal("0.5")}


def test_api_names_each_unknown_field() -> None:
    parsed = api({"ticker": "AAPL", "action": "buy", "symbol": "AAPL", "qty": 1})
    assert error_pairs(parsed) == {("unknown_field", "symbol"), ("unknown_field", "qty")}
    assert '"extras"' in parsed.errors[0].message


@pytest.mark.parametrize("value", [[], ["ticker"], "buy AAPL", 42, 1.5, None, True])
def test_api_body_that_is_not_an_object_is_an_invalid_value(value: object) -> None:
    error = the_error(api(value))
    assert (error.code, error.field) == ("invalid_value", None)


def test_api_extras_must_be_an_object() -> None:
    error = the_error(api({"ticker": "AAPL", "action": "buy", "extras": [1, 2]}))
    assert (error.code, error.field) == ("invalid_value", "extras")


def test_api_expiry_follows_the_same_rule() -> None:
    old = {"ticker": "AAPL", "action": "buy", "signal_time": "2025-03-05T11:00:00Z"}
    assert the_error(api(old, default_max_lag=60)).code == "expired"
    assert the_error(api(old | {"max_lag": 600})).code == "expired"
    assert accepted(api(old | {"max_lag": 7200}))


# -- never raise ---------------------------------------------------------------------------

WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004"
PADDINGS = ["".join(chars) for chars in itertools.product(WHITESPACE, repeat=3)]
NASTY_BODIES = [
    "[" * 100_000,
    '{"a":' * 10_000 + "1" + "}" * 10_000,
    '{"a":' * 500 + "1" + "}" * 500,
    '{"ticker":"AAPL","action":"buy","price":1e999999}',
    '{"ticker":"AAPL","action":"buy","price":1e99999999999999999999}',
    '{"ticker":"AAPL","action":"buy","x":' + "7" * 5000 + "}",
    '{"ticker":"AAPL","action":"buy","price":-Infinity,"q":NaN}',
    '{"ticker":"AA\\u0000PL","action":"buy\\u0000"}',
    "ticker=AA\x00PL\x00action=buy",
    '{"ticker":"AAPL","action":"buy","comment":"' + "x" * 1_000_000 + '"}',
    '{"ticker":"' + "A" * 1_000_000 + '","action":"buy"}',
    "x" * 1_000_000,
    "{{" * 300_000,
    '{"' + '"' * 300_000,
    "=" * 100_000,
    ",".join(["buy"] * 50_000),
    '{"ticker":"\\ud800","action":"buy"}',
    '{"ticker":["AAPL"],"action":{"a":1},"price":{"b":[]},"time":null,"max_lag":{}}',
    '{"ticker":"AAPL","action":"buy","time":"9999-12-31T23:59:59-23:59"}',
    '{"ticker":"AAPL","action":"buy","time":99999999999999}',
    '{"ticker":"AAPL","action":"buy","extras":' + '{"a":' * 40 + "1" + "}" * 40 + "}",
    "\x00\x01\x02\ufffd\ud7ff\udc80",
    "ticker=A%ZZ\udc80&action=%F0%9F%9A&x=%",
    # Thousands of keys that all normalize to an alias: parsing must stay linear.
    json.dumps(
        {f"{pad}price": "" for pad in PADDINGS}
        | {f"order{pad}": {"amount": ""} for pad in PADDINGS}
        | {f"{pad}Passphrase": "x" for pad in PADDINGS}
    ),
]


@pytest.mark.parametrize("body", NASTY_BODIES, ids=range(len(NASTY_BODIES)))
def test_parse_tradingview_never_raises(body: str) -> None:
    tv(body)


NASTY_OBJECTS: list[object] = [
    {"ticker": "AAPL", "action": "buy", "quantity": 10**400},
    {"ticker": "AAPL", "action": "buy", "price": float("nan"), "quantity": float("inf")},
    {"ticker": "AAPL", "action": "buy", "extras": {"x": float("nan"), "y": 10**5000}},
    {"ticker": "AAPL", "action": "buy", "signal_time": 10**30},
    {"ticker": "AAPL", "action": "buy", "price": Decimal("1e999999")},
    {1: "a"},
    {"ticker": object()},
    {"ticker": "AAPL", "action": "buy", "extras": {"a": {1, 2}}},
    {"ticker": "\x00", "action": "\x00"},
    {"ticker": "AAPL" * 250_000, "action": "buy"},
    b"ticker=AAPL",
]


@pytest.mark.parametrize("obj", NASTY_OBJECTS, ids=range(len(NASTY_OBJECTS)))
def test_parse_api_signal_never_raises(obj: object) -> None:
    api(obj)


def test_parse_api_signal_survives_deep_and_cyclic_values() -> None:
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    api({"ticker": "AAPL", "action": "buy", "extras": {"deep": deep}})
    cyclic: dict[str, Any] = {"ticker": "AAPL", "action": "buy"}
    cyclic["extras"] = cyclic
    api(cyclic)


# -- properties ----------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.decimals(allow_nan=False, allow_infinity=False)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)
key_names = st.sampled_from(
    [
        "ticker",
        "symbol",
        "action",
        "side",
        "qty",
        "quantity",
        "price",
        "close",
        "tp",
        "sl",
        "time",
        "timenow",
        "max_lag",
        "id",
        "extras",
        "passphrase",
        "order",
        "strategy",
        "comment",
        "risk",
        "limit",
        "stop",
        "interval",
    ]
) | st.text(max_size=8)
signal_like = st.dictionaries(key_names, json_values, max_size=8)


@given(st.text())
def test_any_text_gives_an_answer(body: str) -> None:
    tv(body)


@given(signal_like)
def test_any_json_object_gives_an_answer(obj: dict[str, Any]) -> None:
    tv(json.dumps(obj, default=str))
    api(obj)


@given(json_values)
def test_any_json_value_gives_an_answer(value: Any) -> None:
    tv(json.dumps(value, default=str))
    api(value)


@given(signal_like)
def test_any_key_value_text_gives_an_answer(obj: dict[str, Any]) -> None:
    tv("\n".join(f"{key}={value}" for key, value in obj.items()))
    tv(",".join(f"{key}={value}" for key, value in obj.items()))


plain_text = st.text(
    st.characters(categories=("L", "M", "N", "P", "S", "Zs"), exclude_characters="{}"), max_size=12
)
prices = st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal(10**12), places=8)
moments = st.datetimes(
    min_value=datetime(2001, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5, minutes=-30))]),
)
tickers = st.from_regex(r"(?:[A-Za-z_]{1,8}:)?[A-Za-z][A-Za-z0-9!._]{0,9}", fullmatch=True)
extras_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | plain_text
    | st.floats(allow_nan=False, allow_infinity=False)
    | prices,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(plain_text, children, max_size=3)
    ),
    max_leaves=10,
)


canonical_signals = st.fixed_dictionaries(
    {"ticker": tickers, "action": st.sampled_from(list(Action))},
    optional={
        "quantity": prices | prices.map(str),
        "quantity_type": st.sampled_from(list(QuantityType)),
        "limit_price": prices.map(str),
        "price": prices | prices.map(float),
        "take_profit": prices,
        "stop_loss": prices.map(str),
        "time_in_force": st.sampled_from(list(TimeInForce)),
        "interval": plain_text,
        "bar_time": moments.map(datetime.isoformat),
        "signal_time": moments.map(datetime.isoformat) | st.integers(10**9, 4 * 10**9),
        "strategy": plain_text,
        "order_id": plain_text | st.integers(0, 10**12),
        "comment": plain_text,
        "max_lag": st.integers(1, 10**9),
        "extras": st.dictionaries(plain_text, extras_values, max_size=4),
        # An id is printable (a no-break space is not), as an Idempotency-Key header is.
        "id": plain_text.filter(str.isprintable) | st.integers(0, 10**9),
    },
)
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)  # before every generated signal time: none expired


@settings(max_examples=200)
@given(canonical_signals)
def test_valid_canonical_signal_is_accepted_and_round_trips(obj: dict[str, Any]) -> None:
    signal = accepted(api(obj, now=LONG_AGO))
    assert signal.action is obj["action"]
    if "quantity" in obj:
        assert signal.quantity == Decimal(obj["quantity"])
    # The same fields as a TradingView body: the lenient door reads canonical names alike.
    from_tradingview = accepted(tv(json.dumps(obj, default=str), now=LONG_AGO))
    assert from_tradingview.model_copy(update={"extras": {}}) == signal.model_copy(
        update={"extras": {}}
    )


action_words = st.sampled_from([word for word, _ in ACTION_TABLE]).map(
    lambda word: word.upper() if len(word) % 2 else word
)
own_keys = plain_text.map(lambda key: f"x_{key}")


@given(tickers, action_words, st.dictionaries(own_keys, extras_values, max_size=5))
def test_tradingview_body_keeps_every_unknown_field_as_sent(
    ticker: str, word: str, own: dict[str, Any]
) -> None:
    body = {"ticker": ticker, "action": word, **own}
    signal = accepted(tv(json.dumps(body, default=str)))
    assert signal.action is dict(ACTION_TABLE)[word.lower()]
    assert list(signal.extras) == list(own)

    def exact(value: Any) -> Any:  # numbers as the decimals written, not as floats
        return json.loads(json.dumps(value, default=str), parse_float=Decimal, parse_int=Decimal)

    assert exact(signal.to_data()["extras"]) == exact(own)


def _picked_by_priority_scan(fields: dict[str, Any], fmt: BodyFormat) -> dict[str, Any]:
    """What alias picking means, spelled out as a scan of every field's aliases in priority
    order (the reference the key-by-key picking must agree with)."""
    found: dict[str, list[tuple[tf.Path, Any]]] = {}
    for path, value in tf.leaves(fields, 3):
        found.setdefault(".".join(map(tf.norm_word, path)), []).append((path, value))
    picked: dict[str, tuple[str, Any, str]] = {}
    taken: set[tf.Path] = set()
    for name, aliases in ALIASES.items():
        for alias in aliases:
            if fmt is BodyFormat.CSV and alias in DISTANCE_ALIASES_IN_COMMANDS:
                continue
            for path, value in found.get(alias, ()):
                if _absent(value):
                    taken.add(path)
                elif name not in picked:
                    picked[name] = (".".join(path), value, alias)
                    taken.add(path)
    return {"picked": picked, "extras": tf.without_paths(fields, taken)}


_SOME_ALIASES = ["ticker", "symbol", "Symbol", "price", "close", "Fill-Price", "qty", "size",
                 "sl", "stop_loss", "tp", "limit", "side", "action", "comment", "msg", "time",
                 "timenow", "other", "volume"]
_ALIAS_VALUES = st.sampled_from(["", " ", None, "AAPL", "1.5", "buy", 7])


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(_SOME_ALIASES), _ALIAS_VALUES, max_size=8),
       st.dictionaries(st.sampled_from(["action", "price", "id", "x"]), _ALIAS_VALUES,
                       max_size=3),
       st.sampled_from([BodyFormat.JSON, BodyFormat.CSV]))
def test_alias_picking_agrees_with_a_scan_in_priority_order(
        flat: dict[str, Any], order: dict[str, Any], fmt: BodyFormat) -> None:
    fields: dict[str, Any] = {**flat, **({"strategy": {"order": order}} if order else {})}
    draft = _Draft(fmt, fields)
    _pick_lenient(draft)
    expected = _picked_by_priority_scan(fields, fmt)
    assert {name: tuple(pick) for name, pick in draft.picked.items()} == expected["picked"]
    assert list(draft.picked) == list(expected["picked"])  # the order errors are reported in
    assert draft.extras == expected["extras"]
