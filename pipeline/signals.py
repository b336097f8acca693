"""Parsers of what senders really post, into the canonical trading signal.

The signal model is defined in :mod:`pipeline.signal_model`, and the vocabularies, readers
and aliases of its fields in :mod:`pipeline.signal_fields`; this module exports the names a
caller needs, so that ``pipeline.signals`` is the one place to import from. Two doors lead in:

* :func:`parse_tradingview` is lenient, for whatever TradingView (or a relay people copy from:
  3Commas, PineConnector, a Pine ``alert()`` string) sends: JSON, ``key=value`` text or a
  comma-separated command; field names have aliases, numbers may be strings, actions have
  synonyms, and every field it does not know is kept in ``extras``.
* :func:`parse_api_signal` is strict on names: the canonical :class:`Signal` fields only.

Both collect every problem (not only the first) as :class:`SignalError` with a stable code and
a message that says what to do, and never raise: bad input must be answered with a 4xx, and the
rejected body is still recorded for the audit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple
from urllib.parse import unquote_plus

from pydantic import ValidationError

from pipeline import textformats as tf
from pipeline.signal_fields import (
    ACTION_WORDS,
    ALIAS_OF,
    ALIASES,
    DISTANCE_ALIASES_IN_COMMANDS,
    IMPLIED_QUANTITY_TYPE,
    LENIENT_READERS,
    MAX_ID_LENGTH,
    MISSING_HINTS,
    NESTING_SEARCHED,
    POSITION_KEYS,
    SECRET_KEYS,
    SIGNAL_FIELDS,
    STRICT_MISSING_HINTS,
    STRICT_READERS,
    SignalErrorCode,
    UnknownWord,
)
from pipeline.signal_model import Action, OrderType, QuantityType, Signal, TimeInForce
from pipeline.textformats import PLACEHOLDER, BadValue, BodyFormat, DecodeFailure, clip, norm_word

__all__ = [
    "Action",
    "BodyFormat",
    "OrderType",
    "ParsedBody",
    "QuantityType",
    "Signal",
    "SignalError",
    "SignalErrorCode",
    "TimeInForce",
    "parse_api_signal",
    "parse_tradingview",
]


@dataclass(frozen=True)
class SignalError:
    """One problem with a body; ``field`` is the field as the sender named it."""

    code: str
    field: str | None
    message: str

    def to_data(self) -> dict[str, Any]:
        return {"code": str(self.code), "field": self.field, "message": self.message}


@dataclass(frozen=True)
class ParsedBody:
    """What a body was recognised as, and its signal or every reason there is none.

    ``fields`` holds plain JSON values (exact, see ``textformats.json_native``), secret removed.
    """

    format: BodyFormat
    fields: dict[str, Any]
    signal: Signal | None
    errors: tuple[SignalError, ...]
    idempotency_key: str | None
    secret: str | None  # the first passphrase or secret field: what authenticates the body
    secrets: tuple[str, ...] = ()  # every such field's value, to be cut out of what is kept


_JSON_KINDS: dict[type, str] = {
    **dict.fromkeys((list, tuple), "an array"),
    **dict.fromkeys((int, float, Decimal), "a number"),
    **{str: "a string", bool: "true or false", type(None): "null"},
}
_EXAMPLE = (
    '{"ticker":"{{ticker}}","action":"{{strategy.order.action}}",'
    '"quantity":"{{strategy.order.contracts}}","price":"{{close}}"}'
)


class _Pick(NamedTuple):
    """A value chosen for a Signal field, with the name the sender gave it ("order.amount")."""

    sender: str
    value: Any
    alias: str


@dataclass
class _Draft:
    """A body on its way to a Signal: what was picked from it and every problem so far."""

    format: BodyFormat
    fields: dict[str, Any]
    secret: str | None = None
    secrets: tuple[str, ...] = ()
    idempotency_key: str | None = None
    picked: dict[str, _Pick] = field(default_factory=dict)
    # Lenient bodies: each value under its normalized key path ("strategy.order.action").
    named: dict[str, list[tuple[tf.Path, Any]]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    errors: list[SignalError] = field(default_factory=list)

    def add(self, code: str, name: str | None, message: str) -> None:
        # A sender's field name can be a megabyte long; the error only needs to point at it.
        self.errors.append(SignalError(code, None if name is None else clip(name, 200), message))


def _absent(value: Any) -> bool:
    """Null and blank count as not sent: {{strategy.order.comment}} is blank when unset."""
    return value is None or (isinstance(value, str) and not value.strip())


def _placeholder_message(name: str | None, found: list[str]) -> str:
    where = f'field "{clip(name, 200)}" still holds' if name else "the body still holds"
    what, it = ("placeholder", "it") if len(found) == 1 else ("placeholders", "them")
    return (
        f"{where} the TradingView {what} {', '.join(clip(f) for f in found[:3])}: TradingView "
        f"did not substitute {it}; check the alert message uses a placeholder valid for this "
        "alert type"
    )


def _placeholders(value: Any, path: str = "") -> Iterator[tuple[str, list[str]]]:
    if isinstance(value, str):
        found = tf.find_placeholders(value)
        if found:
            yield path, found
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _placeholders(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _placeholders(item, f"{path}[{index}]")


def _start(fmt: BodyFormat, fields: dict[str, Any], *, lenient: bool,
           credentials: Sequence[str], text: str | None) -> _Draft:
    """Take the secrets out, report placeholders anywhere, read the idempotency key.

    ``text``, the body as sent, spares looking for secrets in values when it shows that none
    can hold one."""
    name_of: Callable[[str], str] = norm_word if lenient else str
    secret_keys = {key for key in fields if name_of(key) in SECRET_KEYS}
    draft = _Draft(fmt, {key: value for key, value in fields.items() if key not in secret_keys})
    draft.secrets = tuple(str(v) for k, v in fields.items() if k in secret_keys
                          and isinstance(v, str | int) and not isinstance(v, bool)
                          and not _absent(v))
    draft.secret = draft.secrets[0] if draft.secrets else None
    suspects: Sequence[str] = (*credentials, *draft.secrets)
    if text is not None and suspects and _as_written(text, suspects):
        # A value holds a secret only if the text does, beside the secret's own field.
        suspects = [s for s in suspects if text.count(s) > (s in draft.secrets)]
    if suspects:  # a credential is kept in no value either
        draft.fields = redact_values(draft.fields, suspects)
    # Extras included: a forwarded "{{plot_0}}" is as wrong as an unsubstituted price.
    for path, found in _placeholders(draft.fields):
        draft.add(SignalErrorCode.UNREPLACED_PLACEHOLDER, path, _placeholder_message(path, found))
    id_key = next((key for key in draft.fields if name_of(key) == "id"), None)
    value = None if id_key is None else draft.fields[id_key]
    if id_key is None or _absent(value) or (isinstance(value, str) and PLACEHOLDER.search(value)):
        return draft  # an unsubstituted id would make every later alert a duplicate
    try:
        key = tf.parse_text(value)
        if len(key) > MAX_ID_LENGTH:
            raise BadValue(f"must be at most {MAX_ID_LENGTH} characters")
        if not key.isprintable():  # as an Idempotency-Key header must be
            raise BadValue("must be printable: no control characters")
        draft.idempotency_key = key
    except BadValue as exc:
        draft.add(SignalErrorCode.INVALID_VALUE, id_key, f'field "{clip(id_key)}" {exc}')
    return draft


def _pick_lenient(draft: _Draft) -> None:
    # "id" and "extras" are never aliases, and "id" is never an extra.
    body = {k: v for k, v in draft.fields.items() if norm_word(k) not in ("id", "extras")}
    found = draft.named
    for path, value in tf.leaves(body, NESTING_SEARCHED):
        found.setdefault(".".join(map(norm_word, path)), []).append((path, value))
    best, taken = _best_aliases(found, command=draft.format is BodyFormat.CSV)
    for name in ALIASES:  # picked in the fields' order, whatever the body's
        if name in best:
            _, path, value, alias = best[name]
            draft.picked[name] = _Pick(".".join(path), value, alias)
            taken.add(path)
    draft.extras = tf.without_paths(body, taken)
    for key, value in draft.fields.items():
        if norm_word(key) == "extras" and isinstance(value, dict):
            draft.extras.update(value)  # the sender's own extras object wins over stray keys
        elif norm_word(key) == "extras" and not _absent(value):
            draft.extras[key] = value
    quantity = draft.picked.get("quantity")
    implied = IMPLIED_QUANTITY_TYPE.get(quantity.alias) if quantity else None
    if quantity and implied and "quantity_type" not in draft.picked:
        draft.picked["quantity_type"] = _Pick(quantity.sender, implied, quantity.alias)


def _best_aliases(
    found: dict[str, list[tuple[tf.Path, Any]]], *, command: bool
) -> tuple[dict[str, tuple[int, tf.Path, Any, str]], set[tf.Path]]:
    """Per field, the alias sent that comes first in its list (and the first of its paths);
    and the paths of blank aliases, which are dropped rather than kept in extras."""
    best: dict[str, tuple[int, tf.Path, Any, str]] = {}
    blank: set[tf.Path] = set()
    for alias, paths in found.items():
        if alias not in ALIAS_OF or (command and alias in DISTANCE_ALIASES_IN_COMMANDS):
            continue
        name, rank = ALIAS_OF[alias]
        for path, value in paths:
            if _absent(value):
                blank.add(path)
            elif name not in best or rank < best[name][0]:
                best[name] = (rank, path, value, alias)
    return best, blank


def _pick_strict(draft: _Draft) -> None:
    for key, value in draft.fields.items():
        if key in SIGNAL_FIELDS and not _absent(value):
            draft.picked[key] = _Pick(key, value, key)
        elif key == "extras" and isinstance(value, dict):
            draft.extras = dict(value)
        elif key == "extras" and value is not None:
            draft.add(SignalErrorCode.INVALID_VALUE, key, 'field "extras" must be a JSON object')
        elif key not in (*SIGNAL_FIELDS, "extras", "id"):
            draft.add(
                SignalErrorCode.UNKNOWN_FIELD,
                key,
                f'unknown field "{clip(key)}": the API takes only the Signal fields '
                f'({", ".join(SIGNAL_FIELDS)}) and "id"; put your own data under "extras"',
            )


def _read_all(draft: _Draft, readers: Mapping[str, Callable[[Any], Any]]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, pick in draft.picked.items():
        if isinstance(pick.value, str) and PLACEHOLDER.search(pick.value):
            continue  # already reported as an unreplaced placeholder
        try:
            values[name] = readers[name](pick.value)
        except BadValue as exc:
            code = exc.code if isinstance(exc, UnknownWord) else SignalErrorCode.INVALID_VALUE
            draft.add(code, pick.sender, f'field "{clip(pick.sender)}" {exc}')
    return values


def _exit_when_flat(draft: _Draft, values: dict[str, Any]) -> None:
    """A buy or sell that leaves the position flat closes it: sell+flat is exit_long."""
    action = values.get("action")
    flat = any(
        isinstance(value, str) and norm_word(value) == "flat"
        for key in POSITION_KEYS for _, value in draft.named.get(key, ())
    )
    if flat and action in (Action.BUY, Action.SELL):
        values["action"] = Action.EXIT_LONG if action is Action.SELL else Action.EXIT_SHORT
        draft.extras.setdefault("side", str(action))


def _check_expiry(draft: _Draft, values: dict[str, Any], now: datetime, default: Any) -> None:
    signal_time, max_lag = values.get("signal_time"), values.get("max_lag", default)
    if signal_time is None or not isinstance(max_lag, int) or max_lag <= 0:
        return
    age = (tf.as_utc(now) - signal_time).total_seconds()
    if age > max_lag:
        draft.add(
            SignalErrorCode.EXPIRED,
            draft.picked["signal_time"].sender,
            f"the signal is {age:.0f} s old (signal time {tf.format_time(signal_time)}, received "
            f"{tf.format_time(now)}), more than max_lag {max_lag} s, so it must not be acted on; "
            "check the sender's clock and queue, or allow a larger max_lag",
        )


def _finish(
    draft: _Draft,
    values: dict[str, Any],
    now: datetime,
    default_max_lag: int | None,
    hints: Mapping[str, str],
) -> ParsedBody:
    for name, hint in hints.items():
        if name not in draft.picked:
            draft.add(SignalErrorCode.MISSING_FIELD, name, f'field "{name}" is missing: {hint}')
    _check_expiry(draft, values, now, default_max_lag)
    signal = None
    if not draft.errors:
        try:
            signal = Signal.model_validate({**values, "extras": draft.extras})
        except ValidationError as exc:
            for item in exc.errors(include_url=False):
                # The only rule across fields is that the prices fit the order type.
                name = str(item["loc"][0]) if item["loc"] else "order_type"
                sender = draft.picked[name].sender if name in draft.picked else name
                text = str(item["msg"]).removeprefix("Value error, ")
                draft.add(SignalErrorCode.INVALID_VALUE, sender, f'field "{clip(sender)}" {text}')
    return ParsedBody(
        draft.format,
        draft.fields,
        signal,
        tuple(draft.errors),
        draft.idempotency_key,
        draft.secret,
        draft.secrets,
    )


def _rejected(fmt: BodyFormat, code: SignalErrorCode, message: str) -> ParsedBody:
    return ParsedBody(fmt, {}, None, (SignalError(code, None, message),), None, None)


def _undecodable(decoded: tf.DecodedBody) -> ParsedBody:
    failure = decoded.failure
    if failure is DecodeFailure.PLACEHOLDER_JSON:
        draft = _Draft(decoded.format, {})
        for key, holder in decoded.placeholders:
            message = _placeholder_message(key, [holder])
            draft.add(SignalErrorCode.UNREPLACED_PLACEHOLDER, key or None, message)
        return ParsedBody(decoded.format, {}, None, tuple(draft.errors), None, None)
    if failure is DecodeFailure.INVALID_JSON:
        return _rejected(
            decoded.format,
            SignalErrorCode.INVALID_JSON,
            f"the body is not valid JSON ({decoded.detail}): check quotes, commas and braces, "
            'and put placeholders in quotes ("price": "{{close}}")',
        )
    if failure is DecodeFailure.NOT_AN_OBJECT:
        message = f"the body is JSON but {decoded.detail}: send one JSON object like {_EXAMPLE}"
        return _rejected(decoded.format, SignalErrorCode.INVALID_VALUE, message)
    what = "empty" if failure is DecodeFailure.EMPTY else "free text, not a signal"
    message = f"the body is {what}: send JSON like {_EXAMPLE}"
    return _rejected(decoded.format, SignalErrorCode.UNPARSEABLE, message)


def _is_action_word(word: str) -> bool:
    return norm_word(word) in ACTION_WORDS


def parse_tradingview(
    body: str, *, now: datetime, default_max_lag: int | None = None,
    credentials: Sequence[str] = (),
) -> ParsedBody:
    """Parse a TradingView alert body, whatever its Content-Type said.

    A JSON object first; else ``key=value`` pairs or a comma-separated command; else free text.
    ``now`` decides expiry: ``signal_time + max_lag < now`` (``default_max_lag`` when the body
    has no max_lag) is rejected as ``expired``. ``credentials`` (the request's token) and the
    body's own secrets are cut out of every value (see :func:`redact_values`).
    """
    decoded = tf.decode_body(body, _is_action_word)
    if decoded.failure is not None:
        return _undecodable(decoded)
    draft = _start(decoded.format, decoded.fields, lenient=True, credentials=credentials,
                   text=body)
    _pick_lenient(draft)
    values = _read_all(draft, LENIENT_READERS)
    _exit_when_flat(draft, values)
    return _finish(draft, values, now, default_max_lag, MISSING_HINTS)


API_JSON = json.JSONDecoder(parse_float=Decimal)
"""How a ``POST /api/signals`` body is decoded (numbers with a fraction or an exponent exact),
by the route and again by renormalization. Built once: ``json.loads`` with a ``parse_float``
builds a decoder per call."""


def parse_api_signal(
    obj: object, *, now: datetime, default_max_lag: int | None = None,
    credentials: Sequence[str] = (), text: str | None = None,
) -> ParsedBody:
    """Parse a ``POST /api/signals`` body decoded by :data:`API_JSON`: the canonical Signal
    fields, plus "id".

    Strict on names (an unknown field is ``unknown_field``) and on words (canonical values
    only); numbers may be JSON numbers or strings, times RFC 3339 or epoch numbers.
    """
    if not isinstance(obj, dict):
        found = _JSON_KINDS.get(type(obj), f"a {type(obj).__name__}")
        message = f"the body must be a JSON object of Signal fields, not {found}"
        return _rejected(BodyFormat.JSON, SignalErrorCode.INVALID_VALUE, message)
    try:
        fields: dict[str, Any] = tf.json_native(obj)
    except tf.NotJsonValue as exc:
        message = f"the body is not plain JSON: {exc}"
        return _rejected(BodyFormat.JSON, SignalErrorCode.INVALID_VALUE, message)
    draft = _start(BodyFormat.JSON, fields, lenient=False, credentials=credentials, text=text)
    _pick_strict(draft)
    values = _read_all(draft, STRICT_READERS)
    return _finish(draft, values, now, default_max_lag, STRICT_MISSING_HINTS)


REDACTED = "[redacted]"
MIN_SECRET_IN_TEXT = 8
"""A secret at least this long is cut out of every value that holds it; a shorter one (a
token set by hand to "1234", say) only out of its own field and the recorded body's text,
lest a quantity of 1234 become "[redacted]"."""


def _redact_text(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if len(secret) >= MIN_SECRET_IN_TEXT and secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact_values(value: Any, secrets: Sequence[str]) -> Any:
    """``value`` (decoded JSON) with every secret cut out of its texts, keys included: a
    token pasted into a comment is no more to be kept than one in a passphrase field."""
    if isinstance(value, str):
        return _redact_text(value, secrets)
    if isinstance(value, dict):
        return {_redact_text(k, secrets): redact_values(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_values(item, secrets) for item in value]
    return value


def _as_written(text: str, secrets: Sequence[str]) -> bool:
    """Whether every text ``text`` decodes to is in it as written: no JSON escape, no URL
    encoding (and no "+" that could be a secret's space)."""
    return "\\" not in text and "%" not in text and (
        "+" not in text or not any(" " in secret for secret in secrets))


def _holds_secret(value: Any, secrets: Sequence[str]) -> bool:
    return bool(redact_values(value, secrets) != value)


# A JSON string with an escape in it, and a run of URL-encoded text: the forms in which a
# secret can be sent without its characters appearing as such in the body.
_ESCAPED_STRING = re.compile(r'"(?:[^"\\\n]*\\.)+[^"\\\n]*"')
_ENCODED_RUN = re.compile(r"[^\s&=,;]*[%+][^\s&=,;]*")
WITHHELD_BODY = ("[redacted: the body held a credential in a form that could not be cut out "
                 "of it, so it is not kept]")


def redact_body(body: str, secrets: Sequence[str]) -> str:
    """The body as it will be recorded: every secret (the request's token, the body's
    passphrase or secret fields) replaced by ``[redacted]``, wherever and however it was
    written. A secret escaped in a JSON string (``\\u005f``) or URL-encoded (``%5F``) is
    found in the decoded text; a body that would still yield one when parsed (there should
    be none) is not kept at all."""
    secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
    if not secrets:
        return body
    for secret in secrets:
        body = body.replace(secret, REDACTED)
    if _as_written(body, secrets):
        return body  # every text of the body is in it as written: none holds a secret now

    def escaped(match: re.Match[str]) -> str:
        try:
            text = json.loads(match[0])
        except ValueError:
            return match[0]
        redacted = REDACTED if text in secrets else _redact_text(text, secrets)
        return match[0] if redacted == text else json.dumps(redacted, ensure_ascii=False)

    def encoded(match: re.Match[str]) -> str:
        text = unquote_plus(match[0])
        return REDACTED if text in secrets or _redact_text(text, secrets) != text else match[0]

    body = _ENCODED_RUN.sub(encoded, _ESCAPED_STRING.sub(escaped, body))
    decoded = tf.decode_body(body, _is_action_word)
    if decoded.failure is None and _holds_secret(decoded.fields, secrets):
        return WITHHELD_BODY
    return body
