"""``GET /metrics``: Prometheus text, read from the log and the projection at scrape time.

Gauges are computed when scraped rather than counted as things happen, so every instance
reports the same truth about the shared log and a restart loses nothing. What can only be
counted as it happens (signals by outcome, latencies, closes, auth failures) is kept by
:mod:`pipeline.instruments` and exposed here beside them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from sqlalchemy import func, select
from starlette.requests import Request
from starlette.responses import Response

from pipeline.hub import Hub
from pipeline.instruments import Instruments, snapshot
from pipeline.log import format_time, utc_now
from pipeline.log.schema import signals
from pipeline.processing.consumers import list_positions
from pipeline.processing.projection import Status
from pipeline.siblings import Siblings
from pipeline.ws import Connections

SUBSCRIBER_STATES = ("opening", "replaying", "paging", "live")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.head = Gauge("signalbox_log_head", "position of the last committed event",
                          registry=self.registry)
        self.signals = Gauge("signalbox_signals", "signals by current status", ["status"],
                             registry=self.registry)
        self.stuck = Gauge("signalbox_signals_stuck",
                           "signals claimed longer ago than the claim lease, without an outcome",
                           registry=self.registry)
        self.lag = Gauge("signalbox_consumer_lag", "events between the head and a consumer's ack",
                         ["consumer"], registry=self.registry)
        self.subscribers = Gauge("signalbox_subscribers", "open WebSocket connections of this "
                                 "instance", registry=self.registry)
        self.window = Gauge("signalbox_hub_window_events", "events held in memory for "
                            "subscribers by this instance", registry=self.registry)
        self.window_bytes = Gauge("signalbox_hub_window_bytes", "bytes of JSON of the events "
                                  "held in memory for subscribers by this instance",
                                  registry=self.registry)
        self.states = Gauge(
            "signalbox_subscribers_by_state", "open WebSocket connections of this instance by "
            "state: opening (before welcome), replaying (catching up from memory), paging "
            "(behind the in-memory window: read from the log), live", ["state"],
            registry=self.registry)
        self.instruments = Instruments()
        self.registry.register(self.instruments)


def subscriber_states(connections: Connections, hub: Hub) -> dict[str, int]:
    states = dict.fromkeys(SUBSCRIBER_STATES, 0)
    sessions = list(connections.sessions)
    states["opening"] = max(0, connections.open - len(sessions))
    for session in sessions:
        if hub.behind_window(session.cursor):
            states["paging"] += 1
        else:
            states["live" if session.live else "replaying"] += 1
    return states


async def metrics_endpoint(request: Request) -> Response:
    svc = request.app.state.services
    metrics: Metrics = request.app.state.metrics
    head = await svc.log.head()
    metrics.head.set(head)
    cutoff = format_time(utc_now() - timedelta(seconds=svc.claim_lease))
    async with svc.log.engines.reader.connect() as conn:
        by_status = dict((await conn.execute(
            select(signals.c.status, func.count()).group_by(signals.c.status))).all())
        stuck = (await conn.execute(select(func.count()).where(
            signals.c.status == Status.PROCESSING, signals.c.processing_at < cutoff))).scalar()
    for status in Status:
        metrics.signals.labels(status.value).set(by_status.get(status.value, 0))
    metrics.stuck.set(stuck or 0)
    metrics.lag.clear()
    for consumer in await list_positions(svc.log.engines.reader):
        metrics.lag.labels(consumer.name).set(max(0, head - consumer.position))
    own = own_figures(request.app.state.connections, svc.hub)
    siblings: Siblings | None = request.app.state.siblings
    others = await siblings.ask() if siblings is not None else []
    metrics.subscribers.set(sum(f["subscribers"] for f in (own, *others)))
    metrics.window.set(sum(f["window"] for f in (own, *others)))
    metrics.window_bytes.set(sum(f["window_bytes"] for f in (own, *others)))
    for state in SUBSCRIBER_STATES:
        metrics.states.labels(state).set(sum(f["states"].get(state, 0) for f in (own, *others)))
    metrics.instruments.others = [f["instruments"] for f in others]
    try:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
    finally:
        metrics.instruments.others = []


def own_figures(connections: Connections, hub: Hub) -> dict[str, Any]:
    """What this process alone knows, as JSON: for its own scrape, and for another worker's
    (:mod:`pipeline.siblings`) to add to its own."""
    return {"subscribers": connections.open, "window": hub.memory_events,
            "window_bytes": hub.memory_bytes,
            "states": subscriber_states(connections, hub), "instruments": snapshot()}
