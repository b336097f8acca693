"""The `signalbox` command as an operator runs it: migrate, tokens, first start, settings.

Every test runs the real command in a subprocess against a real database of each backend, and
checks the effect through a real server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from pipeline.cli import build_parser
from pipeline.errors import LogUnavailable
from pipeline.log import EventLog
from pipeline.migrate import head_revision
from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    PG_ADMIN_DSN,
    ServerProcess,
    headers,
    next_frame,
    repo_root,
    sqlite_only,
    ws_connect,
)

BTC = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}
FIRST_TOKEN_NOTICE = "It is shown only this once"


def signalbox(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--database-url", database_url],
        capture_output=True, text=True, timeout=60, cwd=repo_root(), check=False,
    )


def create_token(database_url: str, name: str, *args: str) -> str:
    done = signalbox(database_url, "token", "create", name, *args)
    assert done.returncode == 0, done.stderr
    secret = done.stdout.splitlines()[-1]
    assert secret.startswith("sbx_") and " " not in secret, done.stdout
    return secret


def assert_clean_failure(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert all(word in done.stderr for word in words), done.stderr


async def read_epoch(database_url: str) -> str:
    event_log = await EventLog.open(database_url)
    try:
        return event_log.epoch
    finally:
        await event_log.close()


@pytest.fixture(scope="module")
def uncached(shared_database_url: str) -> Iterator[httpx.Client]:
    """A client of a server that checks every token against the database on every request: one
    per backend for the module, whose tests each make and revoke tokens of their own names."""
    server = ServerProcess(shared_database_url, env={"SIGNALBOX_TOKEN_CACHE": "0"}).start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            yield client
    finally:
        assert server.stop() == 0


def status_with(client: httpx.Client, token: str) -> int:
    return client.get("/api/events", headers=headers(token)).status_code


async def test_migrate_is_idempotent_and_keeps_the_epoch(database_url: str) -> None:
    with pytest.raises(LogUnavailable):
        await read_epoch(database_url)
    first = signalbox(database_url, "migrate")
    assert first.returncode == 0, first.stderr
    assert head_revision() in first.stdout
    epoch = await read_epoch(database_url)
    again = signalbox(database_url, "migrate")
    assert again.returncode == 0, again.stderr
    assert head_revision() in again.stdout
    assert await read_epoch(database_url) == epoch


def test_token_create_prints_the_secret_on_its_last_line(
        shared_database_url: str, uncached: httpx.Client) -> None:
    secret = create_token(shared_database_url, "viewer", "--scope", "read", "--scope", "report")
    assert status_with(uncached, secret) == 200
    posted = uncached.post("/api/signals", json=BTC, headers=headers(secret))
    assert posted.status_code == 403, posted.text
    assert posted.json()["error"] == "forbidden" and posted.json()["message"]


def test_token_list_shows_names_and_scopes_but_never_secrets(
        shared_database_url: str, uncached: httpx.Client) -> None:
    secret = create_token(shared_database_url, "dashboard", "--scope", "report",
                          "--scope", "read")
    listing = signalbox(shared_database_url, "token", "list")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in listing.stdout.splitlines()}
    assert rows["dashboard"][:2] == ["read,report", "active"]
    assert rows["env-admin"][0] == "admin" and rows["env-webhook"][0] == "ingest"
    for leaked in (secret, ADMIN_TOKEN, INGEST_TOKEN):
        assert leaked not in listing.stdout + listing.stderr


def test_revoked_token_is_refused_with_401(shared_database_url: str,
                                           uncached: httpx.Client) -> None:
    secret = create_token(shared_database_url, "revoked-bot", "--scope", "read")
    assert status_with(uncached, secret) == 200
    done = signalbox(shared_database_url, "token", "revoke", "revoked-bot")
    assert done.returncode == 0, done.stderr
    refused = uncached.get("/api/events", headers=headers(secret))
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    listing = signalbox(shared_database_url, "token", "list").stdout
    assert "revoked-bot\tread\trevoked " in listing
    assert status_with(uncached, ADMIN_TOKEN) == 200
    # Its name is not given to another token, and the refusal does not advise revoking it.
    again = signalbox(shared_database_url, "token", "create", "revoked-bot", "--scope", "read")
    assert_clean_failure(again, "was revoked")
    assert "revoke it" not in again.stderr


def test_revoking_an_unknown_name_fails_on_stderr(
        shared_database_url: str, uncached: httpx.Client) -> None:
    assert_clean_failure(signalbox(shared_database_url, "token", "revoke", "nobody"), "nobody")


def test_duplicate_token_name_is_refused_without_a_traceback(
        shared_database_url: str, uncached: httpx.Client) -> None:
    first = create_token(shared_database_url, "twin", "--scope", "read")
    done = signalbox(shared_database_url, "token", "create", "twin", "--scope", "admin")
    assert_clean_failure(done, "twin", "exists")
    assert "sbx_" not in done.stdout
    assert status_with(uncached, first) == 200


def test_token_expiring_in_the_past_is_refused(
        shared_database_url: str, uncached: httpx.Client) -> None:
    expired = create_token(shared_database_url, "old", "--scope", "read",
                           "--expires", "2000-01-01T00:00:00")
    current = create_token(shared_database_url, "new", "--scope", "read",
                           "--expires", "2999-01-01T00:00:00+02:00")
    assert status_with(uncached, expired) == 401
    assert status_with(uncached, current) == 200


@sqlite_only("argparse refuses the scope before the command opens the database")
def test_unknown_scope_is_refused_by_argparse(database_url: str) -> None:
    assert signalbox(database_url, "migrate").returncode == 0
    done = signalbox(database_url, "token", "create", "bot", "--scope", "superuser")
    assert done.returncode == 2 and "invalid choice" in done.stderr, done.stderr
    assert "bot" not in signalbox(database_url, "token", "list").stdout


def printed_admin_tokens(server: ServerProcess) -> list[str]:
    lines = [line.strip() for line in server.output]
    return [lines[i + 1] for i, line in enumerate(lines[:-1]) if FIRST_TOKEN_NOTICE in line]


def test_first_start_without_bootstrap_tokens_prints_one_admin_token(database_url: str) -> None:
    server = ServerProcess(database_url, env={"SIGNALBOX_ADMIN_TOKEN": "",
                                              "SIGNALBOX_WEBHOOK_SECRET": ""}).start()
    try:
        [secret] = printed_admin_tokens(server)
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            assert status_with(client, secret) == 200
            assert server.stop() == 0
            server.restart()
            assert status_with(client, secret) == 200
        assert printed_admin_tokens(server) == [secret]
    finally:
        assert server.stop() == 0
    names = [line.split("\t")[0] for line in signalbox(database_url, "token", "list")
             .stdout.splitlines()]
    assert names == ["admin"]


async def stored_bytes(database_url: str) -> bytes:
    """Everything the database holds: the SQLite files, or every row of every PostgreSQL table
    as text."""
    if database_url.startswith("sqlite"):
        path = Path(database_url.split(":///", 1)[1])
        files = sorted(path.parent.glob(path.name + "*"))
        assert files
        return b"".join(f.read_bytes() for f in files)
    name = database_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + name)
    try:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        assert "events" in tables and "tokens" in tables
        rows = [r[0] for t in tables for r in await conn.fetch(f'SELECT t::text FROM "{t}" t')]
    finally:
        await conn.close()
    return "\n".join(rows).encode()


def send_signals_every_way(base_url: str, marker: str, cli_secret: str) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        posts = [
            client.post(f"/webhooks/tradingview/{INGEST_TOKEN}",
                        content=json.dumps({**BTC, "comment": marker})),
            client.post("/webhooks/tradingview",
                        content=json.dumps({**BTC, "passphrase": INGEST_TOKEN})),
            client.post("/api/signals", json=BTC, headers=headers(ADMIN_TOKEN)),
            client.post("/api/signals", json=BTC, headers=headers(cli_secret)),
        ]
    assert [p.status_code for p in posts] == [202] * 4, [p.text for p in posts]


async def test_secrets_are_never_stored_or_printed(database_url: str) -> None:
    marker = f"harmless-marker-{uuid.uuid4().hex}"
    server = ServerProcess(database_url, args=["--access-log"]).start()
    try:
        cli_secret = create_token(database_url, "cli-made", "--scope", "ingest")
        send_signals_every_way(server.base_url, marker, cli_secret)
    finally:
        assert server.stop() == 0
    stored = await stored_bytes(database_url)
    printed = "".join(server.output)
    assert marker.encode() in stored  # the scan does see what was sent
    assert "/webhooks/tradingview/[redacted]" in printed  # and the access log was captured
    for secret in (ADMIN_TOKEN, INGEST_TOKEN, cli_secret):
        assert secret.encode() not in stored
        assert secret not in printed


def test_serve_without_migrate_on_an_empty_database_says_to_run_migrate(
        database_url: str) -> None:
    done = signalbox(database_url, "serve", "--no-migrate", "--host", "127.0.0.1",
                     "--port", "0")
    assert_clean_failure(done, "signalbox migrate")
    assert "Uvicorn running" not in done.stdout + done.stderr


def assert_one_line_failure(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert_clean_failure(done, *words)
    assert len(done.stderr.splitlines()) == 1, done.stderr


@pytest.mark.parametrize(("url", "says"), [
    ("foo://bar", "unsupported database URL scheme 'foo'"),
    ("notaurl", "not a database URL"),
    ("sqlite+aiosqlite:///:memory:", "SQLite needs a file"),
    ("sqlite+aiosqlite:///", "SQLite needs a file"),
    ("sqlite:///signalbox.db", "unsupported database URL scheme 'sqlite'"),
    ("postgresql://postgres@127.0.0.1/signalbox", "unsupported database URL scheme"),
])
@pytest.mark.parametrize("command", [["migrate"], ["token", "list"]])
def test_a_database_url_of_the_wrong_form_is_refused_in_one_line(
        url: str, says: str, command: list[str]) -> None:
    done = signalbox(url, *command)
    assert_one_line_failure(done, "--database-url", says, "use sqlite+aiosqlite:///PATH")
    assert done.returncode == 2


def pg_url(database: str, username: str | None = None, password: str | None = None) -> str:
    url = make_url(PG_ADMIN_DSN).set(drivername="postgresql+asyncpg", database=database)
    if username is not None:
        url = url.set(username=username, password=password)
    return url.render_as_string(hide_password=False)


@pytest.mark.parametrize("command", [
    ["migrate"], ["serve", "--port", "0"], ["serve", "--no-migrate", "--port", "0"],
    ["token", "list"], ["audit", "export"], ["rebuild"],
])
@pytest.mark.parametrize(("url", "says"), [
    (pg_url(database="sbx_no_such_database"), 'database "sbx_no_such_database" does not exist'),
    (pg_url(username="sbx_no_such_user", password="sekrit", database="x"),
     'role "sbx_no_such_user" does not exist'),
])
def test_a_database_that_refuses_the_connection_is_named_in_one_line(
        url: str, says: str, command: list[str]) -> None:
    done = signalbox(url, *command)
    assert_one_line_failure(done, "the database at postgresql+asyncpg://", says)
    assert "sekrit" not in done.stderr
    assert "Uvicorn running" not in done.stdout + done.stderr


def test_a_closed_stdout_is_not_blamed_on_the_database(database_url: str) -> None:
    """`signalbox token create … | head -0`: the reader went away before the secret came."""
    assert signalbox(database_url, "migrate").returncode == 0
    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before the command writes anything
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "token", "create", "piped", "--scope", "read",
             "--database-url", database_url],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, cwd=repo_root(),
            check=False)
    finally:
        os.close(write_end)
    assert done.returncode != 0
    assert done.stderr == ""


@pytest.mark.parametrize(("args", "env", "says"), [
    (["--log-level", "bogus"], {}, "--log-level / SIGNALBOX_LOG_LEVEL: Input should be 'debug'"),
    ([], {"SIGNALBOX_LOG_LEVEL": "bogus"}, "--log-level / SIGNALBOX_LOG_LEVEL"),
    (["--handler", "sbx_no_such_module:handle"], {},
     "--handler / SIGNALBOX_HANDLER: cannot load handler 'sbx_no_such_module:handle'"),
    (["--handler", "sbx_no_such_name"], {}, "no handler named 'sbx_no_such_name'"),
    (["--handler", "json:__doc__"], {}, "handler 'json:__doc__' is not callable"),
])
def test_serve_refuses_a_bad_log_level_or_handler_in_one_line_before_the_database(
        tmp_path: Path, args: list[str], env: dict[str, str], says: str) -> None:
    database = tmp_path / "signalbox.db"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "serve", "--port", "0", *args,
         "--database-url", f"sqlite+aiosqlite:///{database}"],
        capture_output=True, text=True, timeout=60, cwd=repo_root(), check=False,
        env={**os.environ, **env})
    assert_one_line_failure(done, says)
    assert done.returncode == 2
    assert "Uvicorn running" not in done.stdout + done.stderr
    assert not database.exists()



@sqlite_only("which of flag, environment and default wins is settled before the database")
@pytest.mark.parametrize(("env", "args", "expected"), [
    ({"SIGNALBOX_HEARTBEAT": "7"}, ["--heartbeat", "3"], 3),
    ({"SIGNALBOX_HEARTBEAT": "7"}, [], 7),
    ({}, [], 15),
])
async def test_flag_beats_environment_beats_default(
        database_url: str, env: dict[str, str], args: list[str], expected: float) -> None:
    server = ServerProcess(database_url, env=env, args=args).start()
    try:
        conn = await ws_connect(server)
        try:
            welcome = await next_frame(conn)
        finally:
            await conn.close()
        assert welcome["op"] == "welcome" and welcome["heartbeat"] == expected
    finally:
        assert server.stop() == 0


@sqlite_only("which file a command could not open is told before any backend is involved")
@pytest.mark.parametrize(("args", "named"), [
    (["replay", "--output", "{missing}/out.jsonl"], "{missing}/out.jsonl"),
    (["replay", "--checkpoint", "{missing}/cp.json"], "{missing}/cp.json"),
    (["replay", "--output", "{folder}"], "{folder}"),
    (["audit", "export", "--output", "{missing}/out.csv"], "{missing}/out.csv"),
    (["audit", "verify", "--save", "{missing}/head.json"], "{missing}/head.json"),
    (["audit", "verify", "--from", "{missing}/head.json"], "{missing}/head.json"),
    (["audit", "verify", "--from", "{folder}/other.json"], "is not a verified head"),
])
def test_a_file_a_command_cannot_use_is_named_not_the_database(
        server: ServerProcess, tmp_path: Path, args: list[str], named: str) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "other.json").write_text('{"epoch": "e", "position": 3}\n')
    places = {"missing": str(tmp_path / "missing"), "folder": str(folder)}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *(a.format(**places) for a in args),
         "--url", server.base_url],
        capture_output=True, text=True, timeout=60, cwd=repo_root(), check=False,
        env={**os.environ, "SIGNALBOX_TOKEN": ADMIN_TOKEN})
    assert_clean_failure(done, named.format(**places))
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "database" not in done.stderr


@pytest.mark.parametrize("words", [
    ["replay"], ["replay", "--renormalize"], ["audit", "verify"], ["audit", "export"],
    ["audit", "report"], ["audit", "timeline", "some-signal"], ["audit", "some-signal"],
])
def test_reading_commands_on_a_mistyped_sqlite_path_create_nothing(
        tmp_path: Path, words: list[str]) -> None:
    database = tmp_path / "signalbx.db"
    done = signalbox(f"sqlite+aiosqlite:///{database}", *words)
    assert_clean_failure(done, f"there is no database at {database}", "--database-url")
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert not database.exists()


def test_every_help_text_is_plain_text() -> None:
    """`--help` of every command and subcommand reads as plain text: no markup of the
    source's docstrings (``code``, :class:`X`) leaks into what a user reads."""
    def helps(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str]]:
        yield parser.prog, parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from helps(sub)

    texts = dict(helps(build_parser()))
    assert {"signalbox", "signalbox serve", "signalbox audit export"} <= texts.keys()
    markup = re.compile(r"``|:(class|mod|func|meth|attr):`")
    assert {prog: text for prog, text in texts.items() if markup.search(text)} == {}
