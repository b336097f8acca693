"""The canonical trading signal: its vocabularies and the :class:`Signal` model.

Numbers are exact: ``Decimal`` end to end, never float arithmetic. ``extras`` keeps the JSON
values as sent; a non-integer number in it is held as a ``Decimal`` and written by
:meth:`Signal.to_data` as a JSON number (a float that prints back to exactly that decimal), and
a number no float can carry exactly (over ~17 digits) is kept as its decimal text. So
``to_data()`` is plain JSON for the event log and ``Signal.model_validate(s.to_data()) == s``.

The parsers that make signals of what senders post are in :mod:`pipeline.signals`, which
exports these names too: import them from there.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline import textformats as tf


class Action(StrEnum):
    """What the sender wants done: one vocabulary for every source."""

    #: buy order: open or add to a long, or (by side) cover a short
    BUY = "buy"
    #: sell order: open or add to a short, or (by side) reduce a long
    SELL = "sell"
    #: close an existing long
    EXIT_LONG = "exit_long"
    #: close an existing short
    EXIT_SHORT = "exit_short"
    #: flatten whatever position there is
    CLOSE = "close"


class QuantityType(StrEnum):
    """What unit ``Signal.quantity`` is counted in."""

    #: units, contracts, shares or base currency
    CONTRACTS = "contracts"
    #: a cash amount in the quote currency
    QUOTE = "quote"
    #: percent of equity
    PERCENT = "percent"
    #: percent of equity put at risk (PineConnector ``risk=1``)
    RISK = "risk"


class OrderType(StrEnum):
    """How the order is to be placed."""

    #: at the market, no price condition
    MARKET = "market"
    #: at ``limit_price`` or better
    LIMIT = "limit"
    #: a market order once ``stop_price`` trades
    STOP = "stop"
    #: a limit order at ``limit_price`` once ``stop_price`` trades
    STOP_LIMIT = "stop_limit"


class TimeInForce(StrEnum):
    """How long an unfilled order stays working."""

    #: good till cancelled
    GTC = "gtc"
    #: immediate or cancel: fill what can be filled now, cancel the rest
    IOC = "ioc"
    #: fill or kill: all at once or nothing
    FOK = "fok"
    #: until the end of the trading day
    DAY = "day"


_TICKER = re.compile(r"(?=[^A-Z0-9]*[A-Z0-9])[A-Z0-9!#&.^_/+\-]{1,64}")  # a letter or digit
_EXCHANGE = re.compile(r"[A-Z0-9_.\-]{1,32}")
MAX_LAG = 10**9
"""The largest ``max_lag``, in seconds."""
# The prices each order type takes: (limit_price given, stop_price given).
_ORDER_PRICES = {
    OrderType.MARKET: ((False, False), "neither limit_price nor stop_price"),
    OrderType.LIMIT: ((True, False), "limit_price and no stop_price"),
    OrderType.STOP: ((False, True), "stop_price and no limit_price"),
    OrderType.STOP_LIMIT: ((True, True), "both limit_price and stop_price"),
}


class Signal(BaseModel):
    """One normalized trading signal, whatever format it arrived in.

    ``order_type`` is inferred from the prices when not given: LIMIT with only a limit price,
    STOP with only a stop price, STOP_LIMIT with both, else MARKET. ``ticker`` "NASDAQ:AAPL"
    becomes exchange NASDAQ and ticker AAPL, unless an exchange is given, which then wins.
    ``max_lag`` (seconds): a signal older than that when it arrives must not be acted on.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ticker: str
    exchange: str | None = None
    action: Action
    quantity: Decimal | None = None
    quantity_type: QuantityType | None = None
    order_type: OrderType = OrderType.MARKET
    limit_price: Decimal | None = None
    stop_price: Decimal | None = None
    price: Decimal | None = None
    take_profit: Decimal | None = None
    stop_loss: Decimal | None = None
    time_in_force: TimeInForce | None = None
    interval: str | None = None
    bar_time: datetime | None = None
    signal_time: datetime | None = None
    strategy: str | None = None
    order_id: str | None = None
    comment: str | None = None
    max_lag: int | None = Field(default=None, gt=0, le=MAX_LAG)
    extras: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split_ticker_and_infer_order_type(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        ticker = data.get("ticker")
        if isinstance(ticker, str) and ":" in ticker:
            prefix, _, symbol = ticker.strip().partition(":")
            if prefix and symbol:
                data["ticker"] = symbol
                if data.get("exchange") is None:
                    data["exchange"] = prefix
        if data.get("order_type") is None:
            has = (data.get("limit_price") is not None, data.get("stop_price") is not None)
            data["order_type"] = next(t for t, (need, _) in _ORDER_PRICES.items() if need == has)
        return data

    @field_validator("ticker")
    @classmethod
    def _valid_ticker(cls, value: str) -> str:
        value = value.strip().upper()
        if not _TICKER.fullmatch(value):
            raise ValueError(
                "must be a symbol like AAPL, ES1! or BINANCE:BTCUSDT "
                "(letters, digits and ! # & . ^ _ / + -, at most 64)"
            )
        return value

    @field_validator("exchange")
    @classmethod
    def _valid_exchange(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().upper()
        if not _EXCHANGE.fullmatch(value):
            raise ValueError("must be an exchange code like NASDAQ or BINANCE")
        return value

    @field_validator("quantity", "limit_price", "stop_price", "price", "take_profit", "stop_loss")
    @classmethod
    def _exact_positive(cls, value: Decimal | None) -> Decimal | None:
        if value is None:
            return None
        value = tf.checked_decimal(value)
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value

    @field_validator("bar_time", "signal_time")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else tf.as_utc(value)

    @field_validator("extras")
    @classmethod
    def _json_extras(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            return {key: tf.exact_numbers(item) for key, item in tf.json_native(value).items()}
        except tf.NotJsonValue as exc:
            raise ValueError(str(exc)) from exc

    @model_validator(mode="after")
    def _prices_fit_order_type(self) -> Self:
        needed, described = _ORDER_PRICES[self.order_type]
        if (self.limit_price is not None, self.stop_price is not None) != needed:
            raise ValueError(
                f'order_type "{self.order_type}" needs {described}: fix the prices, '
                "or leave order_type out to have it inferred from them"
            )
        return self

    def to_data(self) -> dict[str, Any]:
        """A JSON-ready dict: exact decimal strings, RFC 3339 UTC times, None fields omitted."""
        data: dict[str, Any] = {}
        for name, value in self.__dict__.items():  # the fields, in their order
            if value is None or type(value) is str:
                if value is not None:
                    data[name] = value
            elif isinstance(value, Decimal):
                data[name] = tf.decimal_text(value)
            elif isinstance(value, datetime):
                data[name] = tf.format_time(value)
            elif isinstance(value, StrEnum):
                data[name] = value.value
            elif name == "extras":
                data[name] = tf.json_numbers(value)
            else:
                data[name] = value
        return data
