"""The fields of a signal as senders write them: the words of each vocabulary, how each
field's value is read, the names TradingView alerts give the fields, and the codes of what
can be wrong with them. :mod:`pipeline.signals` parses bodies with these tables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal
from enum import StrEnum
from typing import Any, TypeVar

from pipeline import textformats as tf
from pipeline.signal_model import MAX_LAG, Action, OrderType, QuantityType, Signal, TimeInForce
from pipeline.textformats import BadValue, norm_word


class SignalErrorCode(StrEnum):
    """The stable codes of :class:`pipeline.signals.SignalError`."""

    #: a required field (ticker, action) is absent or blank
    MISSING_FIELD = "missing_field"
    #: a field is there but its value cannot be used
    INVALID_VALUE = "invalid_value"
    #: the action is not a word of the vocabulary
    UNKNOWN_ACTION = "unknown_action"
    #: TradingView left a ``{{...}}`` placeholder unsubstituted
    UNREPLACED_PLACEHOLDER = "unreplaced_placeholder"
    #: the body is empty or free text
    UNPARSEABLE = "unparseable"
    #: the body starts like JSON but does not decode
    INVALID_JSON = "invalid_json"
    #: older than its max_lag when it arrived
    EXPIRED = "expired"
    #: a field the canonical API does not know (API only)
    UNKNOWN_FIELD = "unknown_field"


# -- values: the words of each vocabulary, and how each field is read ----------------------

MAX_ID_LENGTH = 200

_E = TypeVar("_E", bound=StrEnum)


class UnknownWord(BadValue):
    """A word outside its field's vocabulary, with the code it is reported under."""

    def __init__(self, text: str, code: SignalErrorCode) -> None:
        super().__init__(text)
        self.code = code


def _words(synonyms: Mapping[_E, tuple[str, ...]]) -> dict[str, _E]:
    return {word: member for member, words in synonyms.items() for word in (str(member), *words)}


def _canonical(enum: type[_E]) -> dict[str, _E]:
    return {member.value: member for member in enum}


def _word_reader(table: Mapping[str, StrEnum], code: SignalErrorCode) -> Callable[[Any], Any]:
    accepted = ", ".join(table)

    def read(value: Any) -> StrEnum:
        word = norm_word(value) if isinstance(value, str) else None
        if word is None or word not in table:
            raise UnknownWord(f"holds {tf.show(value)}, which is not one of: {accepted}", code)
        return table[word]

    return read


def _positive(value: Any) -> Decimal:
    number = tf.parse_decimal(value)
    if number <= 0:
        raise BadValue(f"must be greater than 0, got {tf.show(value)}")
    return number


def _seconds(value: Any) -> int:
    number = tf.parse_decimal(value)
    if number != number.to_integral_value() or not 0 < number <= MAX_LAG:
        raise BadValue(f"must be whole seconds from 1 to {MAX_LAG}, got {tf.show(value)}")
    return int(number)


ACTION_WORDS = _words(
    {
        Action.BUY: ("long", "enter_long", "open_long", "go_long", "bull", "bullish"),
        Action.SELL: ("short", "enter_short", "open_short", "go_short", "bear", "bearish"),
        Action.EXIT_LONG: ("close_long", "sell_to_close", "long_exit"),
        Action.EXIT_SHORT: ("close_short", "cover", "buy_to_cover", "short_exit"),
        Action.CLOSE: ("exit", "flat", "flatten", "close_all", "exit_all", "closeall"),
    }
)
_LENIENT_WORDS: dict[str, Mapping[str, StrEnum]] = {
    "action": ACTION_WORDS,
    "quantity_type": _words(
        {
            QuantityType.CONTRACTS: ("contract", "base", "units", "unit", "shares", "coins"),
            QuantityType.QUOTE: ("cash",),
            QuantityType.PERCENT: ("pct", "%", "percent_of_equity"),
            QuantityType.RISK: ("risk_percent",),
        }
    ),
    "order_type": _words(
        {
            OrderType.MARKET: ("mkt",),
            OrderType.LIMIT: ("lmt",),
            OrderType.STOP: ("stp", "stop_market"),
            OrderType.STOP_LIMIT: ("stoplimit", "stp_lmt"),
        }
    ),
    "time_in_force": _canonical(TimeInForce),
}
_STRICT_WORDS: dict[str, Mapping[str, StrEnum]] = {
    "action": _canonical(Action),
    "quantity_type": _canonical(QuantityType),
    "order_type": _canonical(OrderType),
    "time_in_force": _canonical(TimeInForce),
}
_PRICE_FIELDS = ("quantity", "limit_price", "stop_price", "price", "take_profit", "stop_loss")
_READERS: dict[str, Callable[[Any], Any]] = {
    **dict.fromkeys(("ticker", "exchange", "interval", "strategy", "order_id"), tf.parse_text),
    **dict.fromkeys(_PRICE_FIELDS, _positive),
    **dict.fromkeys(("bar_time", "signal_time"), tf.parse_time),
    "comment": tf.parse_text,
    "max_lag": _seconds,
}


def _readers(words: Mapping[str, Mapping[str, StrEnum]]) -> dict[str, Callable[[Any], Any]]:
    readers = dict(_READERS)
    for name, table in words.items():
        action = name == "action"
        code = SignalErrorCode.UNKNOWN_ACTION if action else SignalErrorCode.INVALID_VALUE
        readers[name] = _word_reader(table, code)
    return readers


LENIENT_READERS = _readers(_LENIENT_WORDS)
STRICT_READERS = _readers(_STRICT_WORDS)

# -- the TradingView names -----------------------------------------------------------------

# Lenient names, in priority order: when a body holds several aliases of one field, the first
# present one wins and the others stay in extras under their own names. "time" comes last of
# the signal times because TradingView's {{time}} is the bar's open time, not when the alert
# fired ({{timenow}}). "time_close" is not bar_time: it is the bar's close, one interval after
# the bar time, so it stays in extras. "volume" is never quantity: it is the plotted volume.
ALIASES: dict[str, list[str]] = {
    name: names.split()
    for name, names in {
        "ticker": "ticker symbol tv_instrument instrument pair market",
        "exchange": "exchange tv_exchange",
        "action": "action order_action strategy.order.action side direction",
        "quantity": "quantity qty contracts strategy.order.contracts amount order.amount size "
        "risk percent",
        "quantity_type": "quantity_type qty_type order.currency_type",
        "order_type": "order_type ordertype",
        "price": "price fill_price strategy.order.price signal_price trigger_price close",
        "limit_price": "limit_price limit",
        "stop_price": "stop_price stop",
        "take_profit": "take_profit tp takeprofit",
        "stop_loss": "stop_loss sl stoploss",
        "time_in_force": "time_in_force tif",
        "interval": "interval timeframe tf",
        "bar_time": "bar_time",
        "signal_time": "signal_time timenow timestamp time",
        "strategy": "strategy strategy_name strategy_id",
        "order_id": "order_id orderid client_order_id strategy.order.id",
        "comment": "comment strategy.order.comment message msg",
        "max_lag": "max_lag",
    }.items()
}
# Each alias's field and its place in that field's list: a body is matched key by key.
ALIAS_OF = {alias: (name, rank) for name, aliases in ALIASES.items()
            for rank, alias in enumerate(aliases)}
# In a comma-separated command (PineConnector's format) sl= and tp= are distances in pips,
# not prices: they stay in extras rather than pose as stop_loss / take_profit prices.
DISTANCE_ALIASES_IN_COMMANDS = frozenset({"sl", "tp"})
# PineConnector's risk=1 is a quantity of 1 in the unit the key names.
IMPLIED_QUANTITY_TYPE = {"risk": "risk", "percent": "percent"}
# Where a strategy says the position after the fill: "flat" turns a buy or sell into an exit.
POSITION_KEYS = ("sentiment", "market_position", "strategy_info.market_position")
SECRET_KEYS = ("passphrase", "secret")
# How deep aliases are looked for: "strategy": {"order": {"action": ...}} is three keys.
NESTING_SEARCHED = 3
SIGNAL_FIELDS = tuple(name for name in Signal.model_fields if name != "extras")
MISSING_HINTS = {
    "ticker": 'add "ticker": "{{ticker}}" to the alert message (symbol or pair work too)',
    "action": 'add "action": "{{strategy.order.action}}" or a word like buy/sell/close',
}
STRICT_MISSING_HINTS = {
    "ticker": 'it is required: the symbol, e.g. "AAPL" or "BINANCE:BTCUSDT"',
    "action": f"it is required: one of {', '.join(Action)}",
}
