"""The workers of one ``signalbox serve --workers`` answering each other, for ``/metrics``.

A scrape reaches one worker, but what is counted as it happens (signals by outcome, commit
latencies, subscribers) is counted by each worker for itself. So the worker scraped asks the
others for theirs and adds them up: each worker binds a datagram socket, named by its number,
in a private directory the supervisor made; a question is ``?`` and a nonce, an answer ``!``,
the nonce and the worker's figures as JSON. A worker that does not answer in time (it is
being started again, say) is left out of that scrape, which then sees its counters fall, as
Prometheus sees a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.datagrams import close_endpoint, open_endpoint


class Worker(NamedTuple):
    place: Path  # the supervisor's directory
    number: int  # 1 to N


ANSWER_LIMIT = 1 << 20  # bytes in one answer: the figures of a worker are a few KiB


class Siblings:
    def __init__(self, place: Path, number: int, figures: Callable[[], dict[str, Any]]) -> None:
        self.place = place
        self.number = number
        self.figures = figures
        self._sock: socket.socket | None = None
        self._asked: dict[bytes, tuple[dict[str, dict[str, Any]], asyncio.Event]] = {}

    async def start(self) -> None:
        own = self.place / str(self.number)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(own)  # left by this worker's predecessor
        self._sock = open_endpoint(own, self._readable, buffer=ANSWER_LIMIT)

    async def stop(self) -> None:
        # The last worker to stop removes the directory, when the supervisor could not (it
        # was killed).
        if self._sock is not None:
            close_endpoint(self._sock, self.place / str(self.number))
            self._sock = None

    async def ask(self, within: float = 1.0) -> list[dict[str, Any]]:
        """The figures of every other worker that answers ``within`` seconds."""
        if self._sock is None:
            return []
        others = [str(self.place / n) for n in os.listdir(self.place) if n != str(self.number)]
        nonce = secrets.token_hex(8).encode()
        answers: dict[str, dict[str, Any]] = {}
        answered = asyncio.Event()
        self._asked[nonce] = answers, answered
        try:
            for other in others:
                with contextlib.suppress(OSError):  # gone, or not yet there
                    self._sock.sendto(b"?" + nonce, other)
            deadline = asyncio.get_running_loop().time() + within
            while len(answers) < len(others):
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                answered.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(answered.wait(), left)
        finally:
            del self._asked[nonce]
        return list(answers.values())

    def _readable(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                payload, sender = sock.recvfrom(ANSWER_LIMIT)
            except OSError:  # nothing more to read (BlockingIOError), or closed
                return
            if payload[:1] == b"?" and isinstance(sender, str) and sender:
                answer = b"!" + payload[1:17] + json.dumps(self.figures()).encode()
                with contextlib.suppress(OSError):  # the asker has gone
                    sock.sendto(answer, sender)
            elif payload[:1] == b"!":
                asked = self._asked.get(payload[1:17])
                if asked is not None and isinstance(sender, str):
                    with contextlib.suppress(ValueError):
                        asked[0][sender] = json.loads(payload[17:])
                        asked[1].set()
