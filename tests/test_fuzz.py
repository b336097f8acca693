"""Hostile input everywhere the ingestion fuzzing (test_ingest.py) does not reach.

Status reports, query parameters, path ids, headers, and the parsers behind them get random
bytes, deep JSON, huge numbers, invalid UTF-8, NUL bytes, long strings and wrong types. Each
answer must be a 4xx with the contract's error body (or a success), never a 5xx; and the
server must still be answering, with an intact log, afterwards.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from pipeline.context import VALID_REQUEST_ID, incoming_request_id
from pipeline.errors import BadRequest
from pipeline.processing.status import StatusReport
from pipeline.wsframes import CloseCode, Closing, parse_hello
from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    ServerProcess,
    fresh_connections,
    headers,
    read_all_events,
)
from tests.support import verify_chain as verify_log

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}

HOSTILE_TEXT = st.one_of(
    st.text(max_size=60),
    st.text(min_size=2000, max_size=5000),
    st.sampled_from(["", "\x00", "a\x00b", "9" * 5000, "1e999999", "-1", "-0", "0x10", "NaN",
                     "Infinity", "1.5", " 7", "7 ", "\u202e", "\ud7ff", "\uffff", "[]", "{}",
                     "%", "%00", "%FF", "../../etc/passwd", "signal.*", "*" * 300]),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
    | st.sampled_from([10**400, -(10**400), "\x00", "x" * 5000]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=15)
STATUS_BODIES = st.one_of(
    st.binary(max_size=500),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={
        "status": st.sampled_from(["processing", "processed", "failed", "dispatched",
                                   "expired", "received", "PROCESSED", ""]) | JSON_VALUES,
        "detail": JSON_VALUES, "consumer": HOSTILE_TEXT | JSON_VALUES,
    }).map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"[" * 5000, b'{"status":' * 3000, b'{"status": NaN}',
                     b'{"status": "processed", "detail": {"x": 1e999999}}',
                     b'\xff\xfe{"status": "processed"}', b'{"status": "processed"}\x00',
                     b'{"status": "\\ud800"}', b"\x00" * 100]),
)


# The examples send bad tokens on purpose, and each must be judged on its own: the server
# does not refuse the address after failed authentications (tested in test_security.py).
pytestmark = pytest.mark.server_args("--auth-failures", "0")


# Every server-side example is a round trip: generate, but do not spend minutes shrinking a
# failure of a long string; the failing request is in the assertion message.
ENDPOINT_RUN = settings(deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                        suppress_health_check=[HealthCheck.function_scoped_fixture,
                                               HealthCheck.too_slow])


def check_answer(response: httpx.Response, allowed: set[int]) -> None:
    assert response.status_code < 500, (response.request.url, response.text[:300])
    assert response.status_code in allowed, (response.status_code, response.text[:300])
    if response.status_code >= 400 and response.status_code != 422:
        body = response.json()
        assert set(body) == {"error", "message"} and body["message"], body


async def run_property(test: Callable[[], None]) -> None:
    await asyncio.get_running_loop().run_in_executor(None, test)


async def prepare(client: httpx.AsyncClient) -> str:
    response = await client.post("/api/signals", json=BTC, headers=headers(INGEST_TOKEN))
    assert response.status_code == 202
    signal_id: str = response.json()["signal_id"]
    return signal_id


async def test_status_reports_of_any_shape_are_4xx_or_recorded(
        shared_server: ServerProcess, shared_client: httpx.AsyncClient) -> None:
    signal_id = await prepare(shared_client)
    http = fresh_connections(shared_server.base_url)

    @settings(ENDPOINT_RUN, max_examples=80)
    @given(STATUS_BODIES, st.one_of(st.just(signal_id), HOSTILE_TEXT.filter(bool)))
    def property_(body: bytes, target: str) -> None:
        response = http.post(f"/api/signals/{quote(target, safe='')}/status",
                             content=body, headers=headers())
        check_answer(response, {200, 400, 404, 409, 413, 431})

    with http:
        await run_property(property_)
    verify_log(await read_all_events(shared_client))
    assert (await shared_client.get("/readyz")).status_code == 200


QUERY_NAMES = ["after", "limit", "type", "stream", "ticker", "strategy", "status", "before",
               "stuck", "x"]
RAW_VALUES = st.one_of(
    HOSTILE_TEXT.map(lambda t: quote(t, safe="").encode()),
    st.sampled_from([b"%FF%FE", b"%C0%AF", b"%ED%A0%80", b"%", b"%zz", b"a%2Cb%2C%2C",
                     b"9" * 400, b"-" + b"9" * 30, b"4611686018427387905", b"1e3"]),
)


async def test_query_parameters_of_any_value_are_400_or_answered(
        shared_server: ServerProcess, shared_client: httpx.AsyncClient) -> None:
    await prepare(shared_client)
    http = fresh_connections(shared_server.base_url)

    @settings(ENDPOINT_RUN, max_examples=120)
    @given(st.sampled_from(["/api/events", "/api/signals", "/api/consumers"]),
           st.lists(st.tuples(st.sampled_from(QUERY_NAMES), RAW_VALUES), max_size=6))
    def property_(path: str, pairs: list[tuple[str, bytes]]) -> None:
        query = b"&".join(name.encode() + b"=" + value for name, value in pairs)
        assume(len(query) < 60_000)  # longer is refused by the client before it is sent
        response = http.get(httpx.URL(path, query=query), headers=headers())
        check_answer(response, {200, 400, 431})
        if response.status_code == 200:
            assert isinstance(response.json(), dict)

    with http:
        await run_property(property_)


async def test_path_ids_and_headers_of_any_value_are_4xx_or_answered(
        shared_server: ServerProcess, shared_client: httpx.AsyncClient) -> None:
    await prepare(shared_client)
    # What HTTP can carry in a header: visible Latin-1, sent as bytes.
    header_text = st.text(st.characters(codec="latin-1", min_codepoint=32,
                                        exclude_characters="\x7f", exclude_categories=["Cc"]),
                          max_size=300)

    http = fresh_connections(shared_server.base_url)

    @settings(ENDPOINT_RUN, max_examples=100)
    @given(HOSTILE_TEXT.filter(bool), st.sampled_from(["", "/renormalize"]),
           st.one_of(st.none(), header_text, st.just(ADMIN_TOKEN)),
           st.one_of(st.none(), header_text), st.one_of(st.none(), header_text))
    def property_(signal_id: str, suffix: str, auth: str | None, key: str | None,
                  request_id: str | None) -> None:
        # "." and ".." are dot segments, not ids: the client resolves them out of the path.
        assume(signal_id not in (".", ".."))
        extra: dict[bytes, bytes] = {}
        if auth is not None:
            extra[b"Authorization"] = f"Bearer {auth}".strip().encode("latin-1")
        if request_id is not None:
            extra[b"X-Request-Id"] = request_id.strip().encode("latin-1")
        target = f"/api/signals/{quote(signal_id, safe='')}{suffix}"
        response = (http.get(target, headers=extra) if not suffix
                    else http.post(target, headers=extra))
        check_answer(response, {400, 401, 404, 431})
        if response.status_code == 431:
            return  # refused by the HTTP layer, before the app (and its request id)
        echoed = response.headers["x-request-id"]
        if request_id is not None and VALID_REQUEST_ID.fullmatch(request_id.strip()):
            assert echoed == request_id.strip()
        if key is not None:
            posted = http.post("/api/signals", json=BTC, headers={
                b"Authorization": f"Bearer {INGEST_TOKEN}".encode(),
                b"Idempotency-Key": key.strip().encode("latin-1")})
            check_answer(posted, {200, 202, 400})
            assert echoed

    with http:
        await run_property(property_)
    verify_log(await read_all_events(shared_client))


@given(st.one_of(st.text(), JSON_VALUES.map(json.dumps),
                 st.fixed_dictionaries({"op": st.just("hello")}, optional={
                     key: JSON_VALUES | HOSTILE_TEXT for key in (
                         "token", "cursor", "epoch", "filter", "consumer", "batch", "group")
                 }).map(json.dumps)))
def test_any_first_frame_is_a_hello_or_a_4400(text: str) -> None:
    try:
        hello = parse_hello(text)
    except Closing as closing:
        assert closing.code == CloseCode.MALFORMED and closing.message
        return
    assert hello.consumer is None or hello.consumer.isprintable()
    for values in (hello.filter.types, hello.filter.streams, hello.filter.tickers):
        assert all("\x00" not in v for v in values)


@given(st.text(max_size=30), JSON_VALUES)
def test_any_status_report_parses_or_is_a_bad_request(signal_id: str, body: Any) -> None:
    try:
        report = StatusReport.parse(signal_id, body)
    except BadRequest as error:
        assert error.message and error.status == 400
        return
    assert isinstance(report.detail, dict)
    assert report.consumer is None or report.consumer.isprintable()


@given(st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=200)), max_size=5))
def test_incoming_request_ids_are_taken_only_when_sensible(
        raw: list[tuple[bytes, bytes]]) -> None:
    found = incoming_request_id(raw)
    if found is not None:
        assert VALID_REQUEST_ID.fullmatch(found) and 0 < len(found) <= 128


@pytest.mark.parametrize("shared_database_url", ["postgresql"], indirect=True)
async def test_nul_in_a_url_is_a_400_on_every_route(shared_server: ServerProcess,
                                                   shared_client: httpx.AsyncClient) -> None:
    for method, target in [("GET", "/api/events?type=a%00b"), ("GET", "/api/signals/a%00b"),
                           ("POST", "/api/signals/a%00/status"), ("GET", "/healthz?x=%00"),
                           ("POST", f"/webhooks/tradingview/{INGEST_TOKEN}%00")]:
        response = await shared_client.request(method, target, headers=headers())
        check_answer(response, {400})
        assert response.json()["error"] == "bad_request"
