"""Wake-ups between the processes that serve one SQLite file, over Unix datagram sockets.

PostgreSQL tells other instances of a commit with ``NOTIFY`` (:mod:`pipeline.log.notify`);
SQLite has nothing of the kind, and without it a subscriber of one process would see the
commits of another only at its hub's next poll. So every process serving a SQLite log binds a
datagram socket in a meeting place of its own: a directory of the user's, under the temporary
directory (``/tmp`` if the temporary directory's path is too long for a socket's), named after
the database file's real path (``signalbox-<uid>/<hash>/<pid>-<nonce>``).
After each commit it sends the new head to every other socket there, a few microseconds each.

A datagram is only a hint, as a notification is: the receiver's hub re-reads the log from its
own cursor, and a lost one (a peer's full buffer, a peer not yet seen) costs at most one poll
interval. A process that starts says ``hello`` to the others, so that they know it at once;
each lists the directory again at most once a second, when it has commits to tell. Sockets
left by processes that died are removed by the next process to start, and the last process
to leave removes the directory. Processes that do not share the temporary directory (another
``TMPDIR``, another user, a container with its own ``/tmp``) do not meet; they still see each
other's commits by polling.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.datagrams import close_endpoint, open_endpoint

log = logging.getLogger("signalbox.localwake")

HELLO = b"hello"
RELIST_SECONDS = 1.0


# A Unix socket's path holds at most 107 bytes on Linux, 103 on macOS; a socket's own name
# (``<pid>-<nonce>``) takes at most 16 of them.
SOCKET_PATH_MAX = 103
SOCKET_NAME_MAX = len(f"{1 << 22}-{'0' * 8}")
SHORT_TEMP = Path("/tmp")


def meeting_place(database: Path, base: Path | None = None) -> Path:
    """The directory where the processes serving ``database`` meet: under ``base`` (the
    temporary directory), or under ``/tmp`` when a socket's path there would be too long (a
    long ``TMPDIR``); every process of the file makes the same choice."""
    real = os.path.realpath(database)
    digest = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    for root in (base or Path(tempfile.gettempdir()), SHORT_TEMP):
        place = root / f"signalbox-{os.getuid()}" / digest
        if len(os.fsencode(place)) + 1 + SOCKET_NAME_MAX <= SOCKET_PATH_MAX:
            break
    return place  # still too long (no usable /tmp): start() warns and polling stands in


def _private_directory(path: Path) -> bool:
    """Make ``path`` (mode 0700) unless it exists; whether it is ours and closed to others."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _alive(name: str) -> bool:
    pid = name.split("-", 1)[0]
    if not pid.isdigit():
        return True  # not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalWakeups:
    """Calls ``wake(head)`` when another process announces a commit, ``wake(None)`` once
    started; :meth:`announce` tells the others of this process's commits."""

    def __init__(self, database: Path, wake: Callable[[int | None], None], *,
                 base: Path | None = None) -> None:
        self.place = meeting_place(database, base)
        self.wake = wake
        self.name = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._sock: socket.socket | None = None
        self._peers: list[str] = []
        self._listed_at = 0.0

    @property
    def peers(self) -> list[str]:
        return list(self._peers)

    async def start(self) -> None:
        try:
            self._bind()
        except OSError as exc:
            log.warning("cannot meet other processes of this log at %s (%r); they will see "
                        "each other's commits at their poll interval", self.place, exc)
            return
        self._send_all(HELLO)
        self.wake(None)

    def _bind(self) -> None:
        for attempt in range(3):
            if not (_private_directory(self.place.parent) and _private_directory(self.place)):
                raise PermissionError(f"{self.place} is not a private directory of this user")
            for entry in os.scandir(self.place):
                if not _alive(entry.name):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
            try:
                self._sock = open_endpoint(self.place / self.name, self._readable)
                break
            except FileNotFoundError:  # the last process to leave removed the directory
                if attempt == 2:
                    raise
        self._relist()

    async def stop(self) -> None:
        if self._sock is not None:
            close_endpoint(self._sock, self.place / self.name)
            self._sock = None

    # -- sending -----------------------------------------------------------------------------

    def announce(self, head: int) -> None:
        """After a commit that moved the head to ``head``: tell every other process."""
        if self._sock is None:
            return
        now = time.monotonic()
        if now - self._listed_at >= RELIST_SECONDS:
            self._relist(now)
        self._send_all(str(head).encode())

    def _send_all(self, payload: bytes) -> None:
        assert self._sock is not None
        gone: list[str] = []
        for peer in self._peers:
            try:
                self._sock.sendto(payload, peer)
            except BlockingIOError:
                pass  # its queue is full of wake-ups it has yet to read: it will look anyway
            except OSError:  # gone (FileNotFoundError) or died (ConnectionRefusedError)
                gone.append(peer)
        if gone:
            self._peers = [p for p in self._peers if p not in gone]

    def _relist(self, now: float | None = None) -> None:
        try:
            names = os.listdir(self.place)
        except OSError:
            return
        self._listed_at = time.monotonic() if now is None else now
        self._peers = [str(self.place / n) for n in sorted(names) if n != self.name]

    # -- receiving ---------------------------------------------------------------------------

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        latest: int | None = -1
        while True:
            try:
                payload, sender = sock.recvfrom(64)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if isinstance(sender, str) and sender and sender not in self._peers \
                    and os.path.dirname(sender) == str(self.place):
                self._peers.append(sender)  # a newcomer: known before the next listing
            if payload.isdigit():
                if latest is not None:
                    latest = max(latest, int(payload))
            elif payload != HELLO:
                latest = None  # not ours to read: look at the log anyway
        if latest is None or latest >= 0:
            self.wake(latest)
