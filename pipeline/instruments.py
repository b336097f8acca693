"""Counters and histograms of what happens in this process, cheap enough for the hot path.

``/metrics`` (:mod:`pipeline.metrics`) computes most of its figures from the log when it is
scraped; these are the ones that can only be counted as they happen: signals by outcome,
append and commit latencies, group-commit batch sizes, WebSocket closes, auth failures.

They are kept in plain Python numbers rather than ``prometheus_client``'s metric objects: an
increment is a dict update and an observation a ``bisect`` and two additions, with no lock,
because every one happens on the event loop's thread. The :class:`Instruments` collector turns
them into Prometheus families when scraped. They count since the process started, like any
Prometheus counter: a restart starts them from zero, which ``rate()`` and ``increase()`` expect.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# Seconds: from a fraction of a millisecond (a quiet SQLite commit) to the commit timeout.
LATENCY_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                  5.0, 10.0)
# Units of work (requests) per group commit: 1 when idle, up to the writer's batch limit.
BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)


class Count:
    """A counter with labels: ``inc(*label_values)``."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *label_values: str, amount: float = 1) -> None:
        values = self.values
        values[label_values] = values.get(label_values, 0) + amount

    def get(self, *label_values: str) -> float:
        return self.values.get(label_values, 0)

    def snapshot(self) -> list[tuple[list[str], float]]:
        return [(list(labels), value) for labels, value in self.values.items()]

    def family(self, others: Sequence[list[tuple[list[str], float]]] = ()) -> Metric:
        """This process's values, plus those of other workers' snapshots."""
        values = dict(self.values)
        for snapshot in others:
            for labels, value in snapshot:
                key = tuple(labels)
                values[key] = values.get(key, 0) + value
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for label_values, value in sorted(values.items()):
            family.add_metric(list(label_values), value)
        return family


class Spread:
    """A histogram without labels: ``observe(value)``."""

    def __init__(self, name: str, documentation: str, bounds: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> tuple[list[int], float]:
        return list(self.counts), self.sum

    def family(self, others: Sequence[tuple[list[int], float]] = ()) -> Metric:
        """This process's observations, plus those of other workers' snapshots."""
        counts, total = list(self.counts), self.sum
        for other_counts, other_sum in others:
            counts = [a + b for a, b in zip(counts, other_counts, strict=True)]
            total += other_sum
        family = HistogramMetricFamily(self.name, self.documentation)
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        family.add_metric([], buckets, total)
        return family


SIGNALS = Count(
    "signalbox_signals_received",
    "signals that reached ingestion, by source (webhook, api) and outcome (accepted, rejected, "
    "duplicate, unavailable: the log could not commit and nothing was acknowledged)",
    ["source", "outcome"])
APPEND_SECONDS = Spread(
    "signalbox_append_seconds",
    "from queueing a unit of work (one request's appends) to the commit that holds it",
    LATENCY_BOUNDS)
COMMIT_SECONDS = Spread(
    "signalbox_commit_seconds",
    "one group commit: lock the head, run the units, write, commit", LATENCY_BOUNDS)
BATCH_UNITS = Spread(
    "signalbox_commit_batch_units", "units of work (requests) committed together by one "
    "group commit", BATCH_BOUNDS)
PAGED_EVENTS = Count(
    "signalbox_events_paged_from_log",
    "events sent to WebSocket subscribers that were read from the log because the subscriber "
    "was behind the in-memory window", [])
WEBSOCKET_CLOSES = Count(
    "signalbox_websocket_closes",
    "WebSocket connections ended, by close code (the server's, or the client's when it closed "
    "first; 1005 or 1006 when it dropped without one)", ["code"])
AUTH_FAILURES = Count(
    "signalbox_auth_failures",
    "requests and connections refused, by reason (missing_token, bad_token: unknown, revoked "
    "or expired, missing_scope, source_not_allowed)", ["reason"])

ALL: tuple[Count | Spread, ...] = (SIGNALS, APPEND_SECONDS, COMMIT_SECONDS, BATCH_UNITS,
                                   PAGED_EVENTS, WEBSOCKET_CLOSES, AUTH_FAILURES)


def snapshot() -> dict[str, Any]:
    """Every instrument's values, as JSON, for another worker to add to its own."""
    return {i.name: i.snapshot() for i in ALL}


class Instruments(Collector):
    """Exposes the module's counters and histograms to a ``CollectorRegistry``: this
    process's, plus the :func:`snapshot` of each other worker in :attr:`others` (set just
    before a scrape is generated)."""

    def __init__(self) -> None:
        self.others: list[dict[str, Any]] = []

    def collect(self) -> Iterator[Metric]:
        for instrument in ALL:
            yield instrument.family([o[instrument.name] for o in self.others
                                     if instrument.name in o])
