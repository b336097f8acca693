"""Rows a group commit reads for its units: one query for the whole batch, each unit answered
from its own row.

Units queued together run in one transaction (the writer takes every unit waiting). Those that
read (an idempotency key's original, a signal's row for a status report) name what they will
read, and the first to need a row reads every row the batch named at once. These tests queue
whole batches through the real log on both backends and check each answer against its own
signal, and the number of reads against the one the batch should need.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx

from pipeline.errors import IllegalTransition, NotFound
from pipeline.ingest import Ingestor, Outcome, Submission
from pipeline.log import EventLog, utc_now
from pipeline.processing.projection import Status
from pipeline.processing.status import StatusOutcome, StatusReport, report_status
from pipeline.signals import parse_api_signal
from tests.support import INGEST_TOKEN, headers

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}


class CountedReads:
    """Counts the queries the log's writer runs inside its transactions."""

    def __init__(self, log: EventLog) -> None:
        self.count = 0
        session = log._session
        fetch_one, fetch_all = session.fetch_one, session.fetch_all

        async def counted_one(statement: Any) -> Any:
            self.count += 1
            return await fetch_one(statement)

        async def counted_all(statement: Any) -> Any:
            self.count += 1
            return await fetch_all(statement)

        session.fetch_one = counted_one  # type: ignore[method-assign]
        session.fetch_all = counted_all  # type: ignore[method-assign]


def submission(key: str | None, quantity: str = "0.01") -> Submission:
    body = {**BTC, "quantity": quantity}
    parsed = parse_api_signal(body, now=utc_now())
    return Submission("api", json.dumps(body), parsed, "bot", None, "application/json",
                      idempotency_key=key)


async def key_of(log: EventLog, signal_id: str) -> str | None:
    events = await log.read(0, 100_000)
    received = [e for e in events
                if e.type == "signal.received" and e.data["signal_id"] == signal_id]
    assert len(received) == 1, received
    key: str | None = received[0].data["idempotency_key"]
    return key


async def test_a_batch_of_keys_is_looked_up_once_and_each_answered_by_its_own_original(
        event_log: EventLog) -> None:
    ingestor = Ingestor(event_log)
    old_keys = [f"old-{uuid.uuid4()}" for _ in range(30)]
    recorded = await asyncio.gather(*(ingestor.submit(submission(k)) for k in old_keys))
    assert not any(o.duplicate for o in recorded)

    reads = CountedReads(event_log)
    new_keys = [f"new-{uuid.uuid4()}" for _ in range(30)]
    # Repeats of recorded keys, and every new key twice, all queued before the writer runs.
    batch = [*old_keys, *new_keys, *reversed(new_keys)]
    outcomes: list[Outcome] = await asyncio.gather(*(
        ingestor.submit(submission(k, quantity="5")) for k in batch))

    assert reads.count == 1, f"{reads.count} reads for one batch of {len(batch)} keys"
    by_key: dict[str, list[Outcome]] = {}
    for key, outcome in zip(batch, outcomes, strict=True):
        by_key.setdefault(key, []).append(outcome)
    for key, first in zip(old_keys, recorded, strict=True):
        (again,) = by_key[key]
        assert again.duplicate and again.signal_id == first.signal_id
    for key in new_keys:
        answers = by_key[key]
        assert sorted(a.duplicate for a in answers) == [False, True], answers
        assert answers[0].signal_id == answers[1].signal_id
        assert await key_of(event_log, answers[0].signal_id) == key
    assert len({by_key[k][0].signal_id for k in new_keys}) == len(new_keys)


async def test_a_batch_of_repeated_bodies_is_looked_up_once_within_the_dedupe_window(
        event_log: EventLog) -> None:
    ingestor = Ingestor(event_log, dedupe_window=60)
    old = [f"0.{n + 1:03d}" for n in range(10)]  # a quantity makes a body of its own
    recorded = await asyncio.gather(*(ingestor.submit(submission(None, q)) for q in old))
    assert not any(o.duplicate for o in recorded)

    reads = CountedReads(event_log)
    new = [f"1.{n + 1:03d}" for n in range(10)]
    batch = [*old, *new, *new]
    outcomes = await asyncio.gather(*(ingestor.submit(submission(None, q)) for q in batch))

    assert reads.count == 1, f"{reads.count} reads for one batch of {len(batch)} bodies"
    for first, again in zip(recorded, outcomes[:10], strict=True):
        assert again.duplicate and again.signal_id == first.signal_id
    for first, again in zip(outcomes[10:20], outcomes[20:], strict=True):
        assert not first.duplicate and again.duplicate, (first, again)
        assert again.signal_id == first.signal_id
    assert len({o.signal_id for o in outcomes[10:20]}) == 10


async def test_a_repeated_body_is_answered_by_the_latest_signal_with_it(
        event_log: EventLog) -> None:
    """Two signals with one body exist when the window was off (or shorter) as they came; a
    repeat under the window names the later of them."""
    earlier, later = [await Ingestor(event_log).submit(submission(None, "7")) for _ in range(2)]
    assert earlier.signal_id != later.signal_id
    again = await Ingestor(event_log, dedupe_window=60).submit(submission(None, "7"))
    assert again.duplicate and again.signal_id == later.signal_id


async def test_status_reports_of_a_batch_read_their_signals_once(event_log: EventLog) -> None:
    ingestor = Ingestor(event_log)
    outcomes = await asyncio.gather(*(ingestor.submit(submission(None)) for _ in range(40)))
    ids = [o.signal_id for o in outcomes]
    claimed_twice = ids[0]
    unknown = str(uuid.uuid4())

    reads = CountedReads(event_log)
    reports = [StatusReport(i, Status.PROCESSING, {}, f"bot-{n}") for n, i in enumerate(ids)]
    reports += [StatusReport(claimed_twice, Status.PROCESSING, {}, "late-bot"),
                StatusReport(unknown, Status.PROCESSING, {}, "bot")]
    results: list[StatusOutcome | BaseException] = await asyncio.gather(
        *(report_status(event_log, r) for r in reports), return_exceptions=True)

    assert reads.count == 1, f"{reads.count} reads for one batch of {len(reports)} reports"
    for signal_id, result in zip(ids, results[:40], strict=True):
        assert isinstance(result, StatusOutcome), result
        assert (result.signal_id, result.status) == (signal_id, "processing")
    assert isinstance(results[40], IllegalTransition)  # the claim the first one made is seen
    assert isinstance(results[41], NotFound)
    claims = [e for e in await event_log.read(0, 100_000) if e.type == "signal.processing"]
    assert sorted(e.data["signal_id"] for e in claims) == sorted(ids)
    assert {e.data["signal_id"]: e.data["consumer"] for e in claims} == {
        i: f"bot-{n}" for n, i in enumerate(ids)}


async def test_many_keys_at_once_over_http_each_answer_their_own_original(
        shared_client: httpx.AsyncClient) -> None:
    keys = [f"burst-{uuid.uuid4()}" for _ in range(40)]

    async def post(key: str) -> httpx.Response:
        return await shared_client.post("/api/signals", json=BTC,
                                        headers=headers(INGEST_TOKEN, **{"Idempotency-Key": key}))

    first = await asyncio.gather(*(post(k) for k in keys[:20]))
    assert [r.status_code for r in first] == [202] * 20
    burst = [*keys, *keys[20:]]
    answers = await asyncio.gather(*(post(k) for k in burst))
    by_key: dict[str, list[httpx.Response]] = {}
    for key, answer in zip(burst, answers, strict=True):
        by_key.setdefault(key, []).append(answer)
    for key, original in zip(keys[:20], first, strict=True):
        (again,) = by_key[key]
        assert again.status_code == 200, again.text
        assert again.json()["signal_id"] == original.json()["signal_id"]
    for key in keys[20:]:
        statuses = sorted(r.status_code for r in by_key[key])
        assert statuses == [200, 202], [r.text for r in by_key[key]]
        signal_id = by_key[key][0].json()["signal_id"]
        assert by_key[key][1].json()["signal_id"] == signal_id
        timeline = (await shared_client.get(f"/api/signals/{signal_id}",
                                            headers=headers())).json()["events"]
        assert timeline[0]["data"]["idempotency_key"] == key
