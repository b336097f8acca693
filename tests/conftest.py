from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess, create_pg_database, drop_pg_database

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of each backend. PostgreSQL must be there: its absence fails."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'signalbox.db'}"
        return
    url, name = await create_pg_database()
    try:
        yield url
    finally:
        await drop_pg_database(name)


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
