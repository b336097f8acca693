"""A client's allowance of WebSocket frames: a token bucket, refilled at a steady rate.

A connection may send ``rate`` frames a second on average and ``burst`` at once (one
second's worth by default). A client over it is flooding: pongs, acks and status reports of a
busy bot stay far below the default, which is a thousand times what the heartbeat needs.
"""

from __future__ import annotations


class FrameBudget:
    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = max(1.0, rate if burst is None else burst)
        self.tokens = self.burst
        self.last = now

    def take(self, now: float) -> bool:
        """Spend one frame at time ``now`` (monotonic seconds); False when none is left."""
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
