"""A Unix datagram socket bound in a directory and read on the event loop: how the processes
serving one SQLite file (:mod:`pipeline.log.localwake`) and the workers of one supervisor
(:mod:`pipeline.siblings`) reach each other."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path


def open_endpoint(path: Path, on_readable: Callable[[], None], *,
                  buffer: int | None = None) -> socket.socket:
    """A non-blocking socket bound at ``path``, whose ``on_readable`` the running loop calls
    when datagrams wait (``buffer``: its send and receive buffers, in bytes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    asyncio.get_running_loop().add_reader(sock.fileno(), on_readable)
    return sock


def close_endpoint(sock: socket.socket, path: Path) -> None:
    """Stop reading, close, and remove ``path``, and its directory when this was the last one
    there (not a directory for ever of processes long gone)."""
    asyncio.get_running_loop().remove_reader(sock.fileno())
    sock.close()
    with contextlib.suppress(OSError):
        os.unlink(path)
        os.rmdir(path.parent)
