from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from pipeline import migrate
from pipeline.log import EventLog
from tests.support import PLAIN_HTTP, ServerProcess, create_pg_database, drop_pg_database

BACKENDS = ["sqlite", "postgresql"]

# The commands the tests interrupt (Ctrl-C, SIGINT) must take it as at a terminal, also when the
# suite was started with SIGINT ignored (in the background by a shell), which children inherit
# across exec; a handled signal is reset to its default there.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@asynccontextmanager
async def empty_database(backend: str, folder: Path) -> AsyncIterator[str]:
    """An empty database of ``backend``. PostgreSQL must be there: its absence fails."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{folder / 'signalbox.db'}"
        return
    url, name = await create_pg_database()
    try:
        yield url
    finally:
        await drop_pg_database(name)


@pytest.fixture(params=BACKENDS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of each backend, for one test."""
    async with empty_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def event_log(database_url: str) -> AsyncIterator[EventLog]:
    """The log of an empty, migrated database of each backend, opened in the test's process."""
    await migrate.upgrade_async(database_url)
    opened = await EventLog.open(database_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def server(request: pytest.FixtureRequest, database_url: str) -> Iterator[ServerProcess]:
    """A server on ``database_url``; ``@pytest.mark.server_args(...)`` adds flags."""
    marker = request.node.get_closest_marker("server_args")
    with ServerProcess(database_url, args=list(marker.args) if marker else []).start() as process:
        yield process


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http_client:
        yield http_client


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server on a fresh SQLite database for all the tests of a module: what they post
    stays there for the tests after them."""
    folder = tmp_path_factory.mktemp("module")
    with ServerProcess(f"sqlite+aiosqlite:///{folder / 'signalbox.db'}").start() as process:
        yield process


@pytest.fixture
async def module_client(module_server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=module_server.base_url, timeout=30) as http_client:
        yield http_client


@pytest.fixture(scope="module", params=BACKENDS)
async def shared_database_url(request: pytest.FixtureRequest,
                              tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """An empty database of each backend, one per test module: the ``shared_server``'s."""
    async with empty_database(request.param, tmp_path_factory.mktemp("shared")) as url:
        yield url


@pytest.fixture(scope="module")
def shared_server(request: pytest.FixtureRequest,
                  shared_database_url: str) -> Iterator[ServerProcess]:
    """One server per backend for the tests of a module that can share it: tests that only
    read, or that write only signals of their own and assert only about those (or about what
    follows the head they found before writing: tests run one at a time), and that change
    nothing server-wide (tokens, limits, flags, the process itself). The module's
    ``pytestmark`` ``server_args`` adds flags; a test's own marker cannot (see
    ``shared_client``)."""
    marker = request.node.get_closest_marker("server_args")
    with ServerProcess(shared_database_url,
                       args=list(marker.args) if marker else []).start() as process:
        yield process


@pytest.fixture
async def shared_client(request: pytest.FixtureRequest,
                        shared_server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    own = [mark for mark in request.node.own_markers if mark.name == "server_args"]
    assert not own, "a test with its own server_args needs its own server, not shared_server"
    async with httpx.AsyncClient(base_url=shared_server.base_url, timeout=30,
                                 verify=PLAIN_HTTP) as http_client:
        yield http_client
