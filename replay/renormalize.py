"""``signalbox replay --renormalize``: which recorded signals today's parsers read differently.

Every ``signal.received`` body of the selection is parsed again, as of the moment it was
received, and set beside the verdict recorded then (:mod:`pipeline.processing.reparse`). The
report names each signal whose outcome changed (accepted and now rejected, or the reverse) or
whose normalized values changed, field by field. Nothing is written unless ``--apply`` is
given: then the server (scope admin) appends one ``signal.renormalized`` event per changed
signal, beside the old events, which stay as they are.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

from pipeline.log import Event
from pipeline.processing.reparse import Change, Pairs, compare


@dataclass
class Summary:
    read: int = 0  # signals whose body was read again
    kinds: Counter[str] = field(default_factory=Counter)
    appended: int = 0  # signal.renormalized events appended by --apply
    already: int = 0  # changes an earlier --apply had recorded

    @property
    def changed(self) -> int:
        return sum(self.kinds.values())

    def to_json(self) -> dict[str, Any]:
        return {"read": self.read, "changed": self.changed,
                "kinds": dict(sorted(self.kinds.items())), "appended": self.appended,
                "already_recorded": self.already}


async def changes(pages: AsyncIterator[list[Event]], summary: Summary, *,
                  default_max_lag: int | None,
                  keep: Callable[[Event], bool] | None = None) -> AsyncIterator[Change]:
    """The changes among the signals received in ``pages`` (``keep`` selects by their
    ``signal.received`` event), oldest first."""
    pairs = Pairs()
    async for page in pages:
        for event in page:
            if event.type == "signal.received" and keep is not None and not keep(event):
                continue
            pair = pairs.feed(event)
            if pair is None:
                continue
            summary.read += 1
            change = compare(*pair, default_max_lag=default_max_lag)
            if change is not None:
                summary.kinds[change.kind] += 1
                yield change


class Applier:
    """Asks a server to record each change (``POST /api/signals/{id}/renormalize``)."""

    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=30,
                                      headers={"Authorization": f"Bearer {token}"})

    async def apply(self, change: Change, summary: Summary) -> dict[str, Any]:
        response = await self.http.post(f"/api/signals/{change.signal_id}/renormalize")
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise ApplyError(f"the server refused to record the change of signal "
                             f"{change.signal_id} (HTTP {response.status_code}): {message}")
        body: dict[str, Any] = response.json()
        if body.get("appended"):
            summary.appended += 1
        elif body.get("changed"):
            summary.already += 1
        return body

    async def close(self) -> None:
        await self.http.aclose()


class ApplyError(Exception):
    pass


def describe(change: Change) -> str:
    """One line for people."""
    head = f"position {change.position}  signal {change.signal_id}  "
    if change.kind != "values":
        before, after = change.recorded, change.now
        why = after if after.status == "rejected" else before
        reasons = ", ".join(sorted(f"{c}: {f}" if f else c for c, f in why.reasons()))
        return head + f"{before.status} -> {after.status}" + (f" ({reasons})" if reasons else "")
    diffs = "; ".join(f"{d['field']} {json.dumps(d['recorded'])} -> {json.dumps(d['now'])}"
                      for d in change.fields)
    return head + f"{change.recorded.status}, values changed: {diffs}"


async def report(pages: AsyncIterator[list[Event]], *, default_max_lag: int | None,
                 keep: Callable[[Event], bool] | None, applier: Applier | None,
                 as_json: bool, out: TextIO = sys.stdout) -> Summary:
    """Print every change (text or JSON lines) and, last, the summary."""
    summary = Summary()
    async for change in changes(pages, summary, default_max_lag=default_max_lag, keep=keep):
        line = change.to_data()
        if applier is not None:
            answer = await applier.apply(change, summary)
            line["recorded_at_position"] = answer.get("position")
        if as_json:
            out.write(json.dumps(line) + "\n")
        else:
            out.write(describe(change) + "\n")
    if as_json:
        out.write(json.dumps({"summary": summary.to_json()}) + "\n")
    else:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(summary.kinds.items()))
        out.write(f"re-read {summary.read:,} signals: {summary.changed:,} read differently "
                  f"today{f' ({kinds})' if kinds else ''}\n")
        if applier is not None:
            out.write(f"appended {summary.appended} signal.renormalized events "
                      f"({summary.already} already recorded)\n")
    out.flush()
    return summary
