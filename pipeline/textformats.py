"""How senders write things: the shape of a webhook body, and numbers and times as text.

TradingView posts the alert message exactly as the user typed it and labels the Content-Type
unreliably, so the shape is read from the text alone, in this order:

1. empty or only whitespace                       -> ``EMPTY``
2. starts with ``{`` or ``[``                      -> ``JSON`` (an object), or a decode failure
3. ``key=value`` pairs, a comma-separated command   -> ``KEY_VALUE`` / ``CSV``
4. anything else                                   -> ``TEXT`` (free text, nothing extracted)

JSON numbers are parsed exactly (``Decimal``) and then stored as plain JSON values (see
:func:`json_native`), so ``fields`` can be written to the log as they are. The value parsers
(:func:`parse_decimal`, :func:`parse_time`) accept numbers and times as JSON values or text and
raise :class:`BadValue` with a message that says what to send. Meaning (field aliases, actions,
validation) is given by :mod:`pipeline.signals`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any
from urllib.parse import unquote_plus

MAX_DEPTH = 32
"""Deepest nesting accepted in a body; real alerts use two levels, deeper is an attack."""

PLACEHOLDER = re.compile(r"\{\{[^{}]{0,200}\}\}")
"""A TradingView ``{{...}}`` placeholder that was not substituted."""

# A key in broken JSON followed by a bare or quoted placeholder: `"price": {{close}}`.
_PLACEHOLDER_KEY = re.compile(r'"([^"\\\r\n]{1,200})"\s*:\s*"?(\{\{[^{}]{0,200}\}\})')
_PAIR = re.compile(r"\s*([A-Za-z_][\w. \-]{0,63}?)\s*=(.*)", re.DOTALL)
_SYMBOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9:!./_\-]{0,63}")
_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_SEPARATORS = re.compile(r"[,;&]")
_WHITESPACE = re.compile(r"\s")
# Longer integers are kept as text: Python's json refuses to write ints of over 4300 digits.
_INT_DIGITS = 1000
_INT_LIMIT = 10**_INT_DIGITS


class BodyFormat(StrEnum):
    """The shape a webhook body was recognised as."""

    #: a JSON object (possibly with values that are still placeholders)
    JSON = "json"
    #: ``key=value`` pairs separated by newlines, ``&``, ``;`` or ``,``
    KEY_VALUE = "key_value"
    #: a comma-separated command with bare words (PineConnector style)
    CSV = "csv"
    #: free text, or JSON so broken that only placeholders could be found in it
    TEXT = "text"
    #: nothing but whitespace
    EMPTY = "empty"


class DecodeFailure(StrEnum):
    """Why no fields could be taken from a body."""

    #: nothing but whitespace
    EMPTY = "empty"
    #: prose, no pairs and no action word
    FREE_TEXT = "free_text"
    #: starts like JSON but does not decode
    INVALID_JSON = "invalid_json"
    #: starts like JSON, does not decode, and holds ``{{...}}``: an alert() string
    PLACEHOLDER_JSON = "placeholder_json"
    #: valid JSON, but not an object (or one nested too deep)
    NOT_AN_OBJECT = "not_an_object"


@dataclass(frozen=True)
class DecodedBody:
    """The shape of a body and what was taken from it, or why nothing could be."""

    format: BodyFormat
    fields: dict[str, Any]
    failure: DecodeFailure | None = None
    #: what went wrong, for the message (JSON error and its position, nesting depth)
    detail: str = ""
    #: (key, placeholder) found in broken JSON, in body order
    placeholders: tuple[tuple[str, str], ...] = ()


Path = tuple[str, ...]
"""The keys leading to a value in nested objects: ("order", "amount")."""


class NotJsonValue(ValueError):
    """A value that cannot be stored as JSON: too deep, a non-text key, or a foreign type."""


def json_native(value: object, depth: int = 0) -> Any:
    """Copy a decoded JSON value into plain JSON types, exactly.

    Numbers: integers (up to 1000 digits) stay ``int``; other numbers become ``float`` only
    when the float prints back to the same decimal (``0.1``, ``67432.5``), and are otherwise
    kept as their exact decimal text (``"0.12345678901234567890123"``), never rounded.
    Non-finite numbers (``NaN``, which TradingView prints for an empty plot) become the
    strings ``"NaN"``/``"Infinity"``.
    """
    if depth > MAX_DEPTH:
        raise NotJsonValue(f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str):
        return unicode_text(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float | Decimal):
        return native_number(value)
    if isinstance(value, list | tuple):
        return [json_native(item, depth + 1) for item in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise NotJsonValue(f"object key {key!r} is not text")
            # Text, the common leaf, without a call of its own: ASCII (a flag) is Unicode.
            if type(item) is str and item.isascii() and key.isascii():
                out[key] = item
            else:
                out[unicode_text(key)] = json_native(item, depth + 1)
        return out
    raise NotJsonValue(f"a {type(value).__name__} is not a JSON value")


LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # a pair is one character once decoded
NOT_UNICODE = (
    "a string holds an escaped lone surrogate (\\ud800 to \\udfff), which is not a "
    "Unicode character: send text as UTF-8, or escape a character beyond U+FFFF as a pair"
)


def unicode_text(text: str) -> str:
    """``text``, if it is Unicode: a JSON ``\\ud800`` escape with no partner decodes to a
    lone surrogate, which cannot be written as UTF-8 (nor answered, nor stored as text)."""
    if not text.isascii() and LONE_SURROGATE.search(text):
        raise NotJsonValue(NOT_UNICODE)
    return text


def has_lone_surrogate(value: object) -> bool:
    """Whether a decoded JSON value holds a string (or key) that is not Unicode."""
    if isinstance(value, str):
        return not value.isascii() and LONE_SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_lone_surrogate(item) for item in value)
    return False


def native_number(number: int | float | Decimal) -> int | float | str:
    """One number as ``int``, an exactly printing ``float``, or its exact decimal text."""
    if isinstance(number, int) and -_INT_LIMIT < number < _INT_LIMIT:
        return number
    if isinstance(number, float):
        exact = Decimal(repr(number)) if math.isfinite(number) else Decimal(str(number))
    else:
        exact = Decimal(number)
    # "NaN" and "Infinity" are already the JSON spellings; the digit bounds keep int() and
    # float() cheap on megabyte numerals.
    digits = len(exact.as_tuple().digits)
    if not exact.is_finite() or digits > _INT_DIGITS:
        return str(exact)
    if exact == exact.to_integral_value() and exact.adjusted() < _INT_DIGITS:
        return int(exact)
    as_float = float(exact) if digits <= 40 else math.inf
    if math.isfinite(as_float) and Decimal(repr(as_float)) == exact:
        return as_float
    return str(exact)


def leaves(obj: dict[str, Any], depth: int, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every value with its key path, looking into objects up to ``depth`` keys deep."""
    for key, value in obj.items():
        path = (*prefix, key)
        if isinstance(value, dict) and len(path) < depth:
            yield from leaves(value, depth, path)
        else:
            yield path, value


def without_paths(obj: dict[str, Any], taken: set[Path]) -> dict[str, Any]:
    """A copy without the values at ``taken``; objects emptied by that are dropped too."""
    # Computed once: a body may hold thousands of keys, so no scan of ``taken`` per key.
    inside = {path[:end] for path in taken for end in range(1, len(path))}
    return _prune(obj, taken, inside, ())


def _prune(
    obj: dict[str, Any], taken: set[Path], inside: set[Path], prefix: Path
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        path = (*prefix, key)
        if path in taken:
            continue
        if isinstance(value, dict) and path in inside:
            rest = _prune(value, taken, inside, path)
            if rest:
                out[key] = rest
        else:
            out[key] = value
    return out


def find_placeholders(text: str) -> list[str]:
    """The distinct ``{{...}}`` placeholders in a string, in order."""
    if "{{" not in text:  # nearly every value: no pattern match to set up
        return []
    return list(dict.fromkeys(PLACEHOLDER.findall(text)))


def decode_body(body: str, is_action_word: Callable[[str], bool]) -> DecodedBody:
    """Recognise the body's shape; ``is_action_word`` tells bare action words from symbols."""
    text = body.lstrip("\ufeff").strip()
    if not text:
        return DecodedBody(BodyFormat.EMPTY, {}, DecodeFailure.EMPTY)
    if text[0] in "{[":
        return _decode_json(text)
    return _decode_pairs(text, is_action_word)


# Built once: json.loads with parse_* arguments builds a decoder per call.
_EXACT_JSON = json.JSONDecoder(parse_float=Decimal, parse_int=Decimal, parse_constant=str)


def _decode_json(text: str) -> DecodedBody:
    try:
        value = _EXACT_JSON.decode(text)
    except json.JSONDecodeError as exc:
        return _broken_json(text, f"{exc.msg} at line {exc.lineno} column {exc.colno}")
    except RecursionError:
        return _broken_json(text, "nested too deeply to decode")
    except (ValueError, ArithmeticError):  # a number literal too large even for Decimal
        return _broken_json(text, "a number is too large")
    if not isinstance(value, dict):
        found = "an array" if isinstance(value, list) else "not an object"
        return DecodedBody(BodyFormat.JSON, {}, DecodeFailure.NOT_AN_OBJECT, found)
    try:
        return DecodedBody(BodyFormat.JSON, json_native(value))
    except NotJsonValue as exc:
        return DecodedBody(BodyFormat.JSON, {}, DecodeFailure.NOT_AN_OBJECT, str(exc))


def _broken_json(text: str, detail: str) -> DecodedBody:
    # `{"price": {{close}}}` is how a Pine alert() string looks when TradingView did not
    # substitute it: name each key that holds a placeholder rather than a JSON position.
    if text[0] == "{" and PLACEHOLDER.search(text):
        found = {key: holder for key, holder in _PLACEHOLDER_KEY.findall(text)}
        pairs = tuple(found.items()) or (("", PLACEHOLDER.findall(text)[0]),)
        return DecodedBody(BodyFormat.TEXT, {}, DecodeFailure.PLACEHOLDER_JSON, detail, pairs)
    return DecodedBody(BodyFormat.TEXT, {}, DecodeFailure.INVALID_JSON, detail)


def _split_tokens(text: str) -> list[str]:
    """Tokens split on newlines and ``, ; &``.

    In a body of several lines, a line that is exactly one ``key=value`` pair stays whole, so
    that ``comment=Buy, then hold`` keeps its comma; on a single line a comma always separates
    (``60123456789,buy,EURUSD,risk=1``).
    """
    lines = text.splitlines()
    tokens: list[str] = []
    for line in lines:
        if len(lines) > 1 and line.count("=") == 1 and _PAIR.fullmatch(line):
            tokens.append(line)
        else:
            tokens.extend(_SEPARATORS.split(line))
    return [token.strip() for token in tokens if token.strip()]


def _unquote(value: str, url_encoded: bool) -> str:
    value = value.strip()
    if url_encoded:
        value = unquote_plus(value)
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return value


def _decode_pairs(text: str, is_action_word: Callable[[str], bool]) -> DecodedBody:
    # A form post never holds raw whitespace; anything else keeps "+" and "%" literally.
    url_encoded = _WHITESPACE.search(text) is None and (
        "&" in text or _PERCENT_ESCAPE.search(text) is not None
    )
    pairs: dict[str, Any] = {}
    bare: list[str] = []
    for token in _split_tokens(text):
        match = _PAIR.fullmatch(token)
        if match is None:
            bare.append(_unquote(token, url_encoded))
        else:
            pairs[_unquote(match[1], url_encoded)] = _unquote(match[2], url_encoded)
    if not bare:
        return DecodedBody(BodyFormat.KEY_VALUE, pairs)
    if not pairs and not any(is_action_word(word) for word in bare):
        return DecodedBody(BodyFormat.TEXT, {}, DecodeFailure.FREE_TEXT)
    return DecodedBody(BodyFormat.CSV, _assign_bare_words(pairs, bare, is_action_word))


def _assign_bare_words(
    pairs: dict[str, Any], bare: list[str], is_action_word: Callable[[str], bool]
) -> dict[str, Any]:
    """Give bare words the roles PineConnector and TradingView's own examples use.

    ``60123456789,buy,EURUSD,risk=1``: a numeric first word is a PineConnector licence id, the
    first action word the action, the first symbol-like word the ticker; a pair of the same
    name wins over a bare word, and every word left over is kept, in order, as ``args``.
    """
    fields = dict(pairs)
    args: list[str] = []
    for index, word in enumerate(bare):
        if index == 0 and word.isascii() and word.isdigit():
            role = "license_id"
        elif is_action_word(word):
            role = "action"
        elif _SYMBOL.fullmatch(word) and any(ch.isalpha() for ch in word):
            role = "ticker"
        else:
            role = "args"
        if role == "args" or role in fields:
            args.append(word)
        else:
            fields[role] = word
    if args:
        fields.setdefault("args", args)
    return fields


# -- values written as text ----------------------------------------------------------------

MAX_DIGITS = 30
MAX_EXPONENT = 30
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_EPOCH = re.compile(r"\d{1,15}(?:\.\d{1,9})?")
# 10**11 seconds is the year 5138: a larger epoch number can only be milliseconds.
_EPOCH_MS_FROM = 10**11
_EPOCH_START = datetime(1970, 1, 1, tzinfo=UTC)
_TIME_HELP = 'send RFC 3339 like "2025-01-15T14:45:01Z" or epoch seconds or milliseconds'


class BadValue(ValueError):
    """A value that cannot be used; the text completes 'field "x" ...'."""


def clip(text: str, limit: int = 80) -> str:
    """The text cut to ``limit`` characters: senders' values can be a megabyte long."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def show(value: object) -> str:
    """A value as JSON, short enough for an error message."""
    if isinstance(value, str):
        return json.dumps(clip(value, 60), ensure_ascii=False)
    return clip(json.dumps(value, ensure_ascii=False), 60)


@functools.lru_cache(maxsize=4096)  # an alert template's keys and words come back each time
def norm_word(text: str) -> str:
    """Case, spaces and dashes do not matter in keys and words: "Sell-to-close" = sell_to_close."""
    return text.strip().lower().replace(" ", "_").replace("-", "_")


def decimal_text(number: Decimal) -> str:
    """Fixed-point text without exponent or trailing zeros: "67432.5", "0.015", "100"."""
    text = format(number, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def checked_decimal(number: Decimal) -> Decimal:
    """The number in canonical form, unless no price or size could be it (NaN, 1e999999)."""
    if not number.is_finite():
        raise BadValue("must be a finite number")
    # The magnitude first: it bounds the fixed-point text that the digits are counted in.
    if -MAX_EXPONENT <= number.adjusted() <= MAX_EXPONENT:
        text = decimal_text(number)
        if len(text.replace("-", "").replace(".", "").strip("0")) <= MAX_DIGITS:
            return Decimal(text)
    raise BadValue(
        f"must have at most {MAX_DIGITS} significant digits and a magnitude "
        f"between 1e-{MAX_EXPONENT} and 1e{MAX_EXPONENT}"
    )


def parse_decimal(value: Any) -> Decimal:
    """A JSON number or numeric text as an exact, bounded Decimal; floats via their repr."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadValue(f"must be a number, got {show(value)}")
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 80 or not _NUMBER.fullmatch(text):
            raise BadValue(f"must be a number, got {show(value)}")
        number = Decimal(text)
    else:
        number = Decimal(value) if isinstance(value, int) else Decimal(repr(value))
    try:
        return checked_decimal(number)
    except BadValue as exc:
        raise BadValue(f"{exc}, got {show(value)}") from exc


def parse_text(value: Any) -> str:
    """Text, stripped; a number is taken as its decimal text (an order id sent as 42)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value) if isinstance(value, int) else decimal_text(Decimal(repr(value)))
    raise BadValue(f"must be text, got {show(value)}")


def as_utc(moment: datetime) -> datetime:
    """Naive times are taken as UTC: TradingView's {{time}} and {{timenow}} are UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError as exc:
        raise BadValue("is out of range once converted to UTC") from exc


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds and "Z"; isoformat pads the year, strftime may not."""
    return as_utc(moment).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_time(value: Any) -> datetime:
    """RFC 3339 / ISO 8601 text (naive means UTC), or epoch seconds or milliseconds."""
    text = value.strip() if isinstance(value, str) else None
    if text is not None and not _EPOCH.fullmatch(text):
        try:
            if len(text) > 64:
                raise ValueError(text)
            return as_utc(datetime.fromisoformat(text))
        except ValueError as exc:
            raise BadValue(f"is not a time: {_TIME_HELP}, got {show(value)}") from exc
    try:
        number = parse_decimal(value)
    except BadValue as exc:
        raise BadValue(f"is not a time: {_TIME_HELP}, got {show(value)}") from exc
    if not 0 <= number < _EPOCH_MS_FROM * 1000:
        raise BadValue(f"is not a time: {_TIME_HELP}, got {show(value)}")
    if number >= _EPOCH_MS_FROM:
        number = number.scaleb(-3)
    seconds = int(number)
    micros = int((number - seconds) * 1_000_000)
    return _EPOCH_START + timedelta(seconds=seconds, microseconds=micros)


def exact_numbers(value: Any) -> Any:
    """Floats become the Decimal they print as, so 12.7 compares equal to Decimal("12.7")."""
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, list):
        return [exact_numbers(item) for item in value]
    if isinstance(value, dict):
        return {key: exact_numbers(item) for key, item in value.items()}
    return value


def json_numbers(value: Any) -> Any:
    """The inverse of exact_numbers, for Decimals that a float prints exactly (json_native)."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, list):
        return [json_numbers(item) for item in value]
    if isinstance(value, dict):
        return {key: json_numbers(item) for key, item in value.items()}
    return value
