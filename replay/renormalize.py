"""``signalbox replay --renormalize``: which recorded signals today's parsers read differently.

Every ``signal.received`` body of the selection is parsed again, as of the moment it was
received, and set beside the verdict recorded then (:mod:`pipeline.processing.reparse`). Each
signal whose outcome changed (accepted and now rejected, or the reverse) or whose normalized
values changed is printed, one line per signal, and written to ``--report FILE`` as a JSON
line. Nothing is written to the log unless ``--apply`` is given: then the server (scope admin)
appends one ``signal.renormalized`` event per changed signal, beside the old events, which stay
as they are.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any, TextIO

from pipeline.log.model import Event
from pipeline.processing.reparse import Change, Pairs, compare
from replay._http import Call, Client, SignalboxClientError, Unavailable, answer_json
from replay._sinks import LineFile, ReplayError
from replay.sources import READ_BACKOFF, READ_RETRIES

TYPES = Pairs.TYPES
RECORDED = frozenset({200, 201})  # 201: appended now; 200: recorded before


class Applier:
    """Asks a server to record each change (``POST /api/signals/{id}/renormalize``), by the
    client library's rules: a 503, a proxy's 502 or 504 or a lost connection is sent again
    (recording a change is idempotent), as patiently as the reading commands wait (some
    15 s, honouring ``Retry-After``); any other refusal stops the run."""

    def __init__(self, url: str, token: str) -> None:
        self.client = Client(url, token, retries=READ_RETRIES, backoff=READ_BACKOFF,
                             timeout=30)

    async def apply(self, change: Change) -> dict[str, Any]:
        """The server's answer: ``appended`` (now recorded) or not (recorded before)."""
        call = Call("POST", f"/api/signals/{change.signal_id}/renormalize", ok=RECORDED)
        try:
            response, _ = await self.client.send(call)
            return answer_json(response, call.ok)
        except Unavailable as exc:
            raise ReplayError(f"the server could not record the change of signal "
                              f"{change.signal_id} ({exc.message}): run again with the same "
                              "--checkpoint to go on") from None
        except SignalboxClientError as exc:
            status = f"HTTP {exc.status}" if exc.status is not None else exc.code
            raise ReplayError(f"the server refused to record the change of signal "
                              f"{change.signal_id} ({status}): {exc.message}") from None

    async def close(self) -> None:
        await self.client.aclose()


class Renormalize:
    """The replay sink of ``--renormalize``: a change per line on ``out``, JSON in the report."""

    def __init__(self, report: LineFile | None, resume: dict[str, Any], *,
                 default_max_lag: int | None, applier: Applier | None,
                 out: TextIO = sys.stdout) -> None:
        self.report = report
        self.default_max_lag = default_max_lag
        self.applier = applier
        self.out = out
        self.pairs = Pairs()
        # A received event whose verdict is in the next page (or whose change the server
        # refused) is kept in the checkpoint: the run goes on after it, not before it.
        for row in resume.get("waiting") or []:
            received = Event(*row)
            self.pairs.waiting[received.stream] = received
        self.read = int(resume.get("read", 0))
        self.kinds: Counter[str] = Counter(resume.get("kinds") or {})
        self.appended = int(resume.get("appended", 0))
        self.already = int(resume.get("already", 0))

    async def prepare(self, page: list[Event]) -> None:
        return None

    async def put(self, event: Event) -> None:
        pair = self.pairs.feed(event)
        if pair is None:
            return
        change = compare(*pair, default_max_lag=self.default_max_lag)
        if change is None:
            self.read += 1
            return
        line = change.to_data()
        if self.applier is not None:
            try:
                answer = await self.applier.apply(change)
            except BaseException:
                # Not done: the checkpoint keeps the received event, so that the run told to
                # go on with the same --checkpoint applies this change first.
                self.pairs.waiting[pair[0].stream] = pair[0]
                raise
            if answer.get("appended"):
                self.appended += 1
            elif answer.get("changed"):
                self.already += 1
            line["renormalized_position"] = answer.get("position")
        self.read += 1
        self.kinds[change.kind] += 1
        if self.report is not None:
            self.report.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")))
        self.out.write(describe(change) + "\n")

    def state(self) -> dict[str, Any]:
        saved = self.report.state() if self.report is not None else {}
        self.out.flush()
        waiting = [[e.position, e.id, e.stream, e.type, e.data_json, e.meta_json, e.time,
                    e.hash] for e in sorted(self.pairs.waiting.values(),
                                            key=lambda e: e.position)]
        return {**saved, "read": self.read, "kinds": dict(sorted(self.kinds.items())),
                "appended": self.appended, "already": self.already, "waiting": waiting}

    def summary(self) -> str | None:
        changed = sum(self.kinds.values())
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in sorted(self.kinds.items()))
        lines = [f"re-read {self.read:,} signals: {changed:,} read differently today"
                 + (f" ({kinds})" if kinds else "")]
        if self.applier is not None:
            lines.append(f"appended {self.appended:,} signal.renormalized events "
                         f"({self.already:,} recorded before)")
        if self.report is not None:
            lines.append(f"report: {self.report.path}")
        return "\n".join(lines)

    async def close(self) -> None:
        if self.report is not None:
            self.report.close()
        if self.applier is not None:
            await self.applier.close()


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
