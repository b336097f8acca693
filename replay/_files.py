"""Files the client writes that must never be found half written: cursors, checkpoints, heads."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, text: str, *, make_folder: bool = False) -> None:
    """``text`` as the whole of ``path``, or ``path`` as it was: written to a file beside it,
    synced, then renamed over it, the rename synced too (a crash or a full disk leaves the old
    file whole). A missing folder is an error (a mistyped path), unless ``make_folder``."""
    folder = path.parent
    if make_folder:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # named as the file asked for, not the one beside it
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # the rename, on disk too (not every system can)
        folder_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)
