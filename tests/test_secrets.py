"""No secret reaches the database or the server's log, whatever route it came through.

One server with every secret set, at log level debug with the access log on, is exercised on
every route, with good and bad credentials; then the SQLite database and its WAL (on
PostgreSQL, every row of every table), and every line the server printed, are searched for
each secret.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import asyncpg
import httpx
import websockets

from tests.support import ServerProcess, next_frame
from tests.test_scopes import create_token, signalbox


def fresh(kind: str) -> str:
    return f"sbx_{kind}_{uuid.uuid4().hex}"


async def test_no_secret_in_the_database_or_the_log(database_url: str) -> None:
    admin, webhook, forward = fresh("admin"), fresh("webhook"), fresh("forward")
    wrong = [fresh("wrong"), fresh("guess"), fresh("typo")]
    assert signalbox(database_url, "migrate").returncode == 0
    reader = create_token(database_url, "reader", "read")
    reporter = create_token(database_url, "reporter", "report", "read")
    tv = create_token(database_url, "tradingview", "ingest")
    secrets = [admin, webhook, forward, reader, reporter, tv, *wrong]
    server = ServerProcess(database_url, env={
        "SIGNALBOX_ADMIN_TOKEN": admin, "SIGNALBOX_WEBHOOK_SECRET": webhook,
        "SIGNALBOX_FORWARD_SECRET": forward,
    }, args=["--access-log", "--log-level", "debug", "--handler", "forward",
             "--forward-url", "http://127.0.0.1:9/hook", "--handler-attempts", "1",
             "--auth-failures", "0"]).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            await exercise(http, {"admin": admin, "webhook": webhook, "reader": reader,
                                  "reporter": reporter, "tv": tv}, wrong)
        await exercise_websocket(server, admin, reader, reporter, wrong)
        database = await read_database(database_url)
    finally:
        server.stop()
    database += await read_database(database_url)
    log = "".join(server.output)
    assert "POST /webhooks/tradingview/[redacted]" in log  # the access log was on
    assert "DEBUG" in log or "debug" in log.lower()
    # A secret's tail finds it in the forms the test sends it in: escaped in JSON, encoded
    # in a URL, pasted into another field.
    leaks = [f"database: {secret[:10]}…" for secret in secrets
             if secret[-24:].encode() in database]
    leaks += [f"log: {line.strip()}" for line in server.output
              if any(secret in line for secret in secrets)]
    assert leaks == []


async def read_database(database_url: str) -> bytes:
    """The SQLite files as bytes; on PostgreSQL, every row of every table as text."""
    if database_url.startswith("postgresql"):
        conn = await asyncpg.connect(database_url.replace("+asyncpg", ""))
        try:
            tables = await conn.fetch("SELECT tablename FROM pg_tables "
                                      "WHERE schemaname = 'public'")
            rows = [str(row) for table in tables for row in await conn.fetch(
                f'SELECT t::text FROM "{table["tablename"]}" t')]
        finally:
            await conn.close()
        assert rows
        return "\n".join(rows).encode()
    path = Path(database_url.removeprefix("sqlite+aiosqlite:///"))
    found = b""
    for suffix in ("", "-wal", "-shm", "-journal"):
        part = path.with_name(path.name + suffix)
        if part.exists():
            found += part.read_bytes()
    return found


async def exercise(http: httpx.AsyncClient, tokens: dict[str, str], wrong: list[str]) -> None:
    admin, webhook, reader, reporter, tv = (
        tokens[k] for k in ("admin", "webhook", "reader", "reporter", "tv"))
    signal = {"ticker": "BTCUSDT", "action": "buy", "quantity": "0.01"}
    seen: list[int] = []

    async def go(method: str, url: str, token: str | None = None,
                 extra: dict[str, str] | None = None, **kwargs: object) -> str:
        bearer = {"Authorization": f"Bearer {token}"} if token else {}
        response = await http.request(method, url, headers={**bearer, **(extra or {})},
                                      **kwargs)  # type: ignore[arg-type]
        seen.append(response.status_code)
        value: str = response.json().get("signal_id", "") if response.content[:1] == b"{" \
            else ""
        return value

    # Webhooks: the token in the URL, a passphrase or secret in JSON and in key=value text,
    # both at once, rejected bodies, wrong tokens.
    first = await go("POST", f"/webhooks/tradingview/{tv}", content=json.dumps(signal))
    await go("POST", f"/webhooks/tradingview/{webhook}",
             content=json.dumps({**signal, "passphrase": tv}))
    await go("POST", "/webhooks/tradingview", content=json.dumps({**signal, "passphrase": tv}))
    await go("POST", "/webhooks/tradingview", content=json.dumps({**signal, "secret": webhook}))
    await go("POST", "/webhooks/tradingview",
             content=f"ticker=ETHUSDT\naction=sell\nquantity=1\npassphrase={tv}")
    await go("POST", "/webhooks/tradingview",
             content=json.dumps({"ticker": "{{ticker}}", "passphrase": tv}))
    await go("POST", f"/webhooks/tradingview/{tv}", content=f"not a signal {tv}")
    await go("POST", f"/webhooks/tradingview/{wrong[0]}", content=json.dumps(signal))
    await go("POST", "/webhooks/tradingview",
             content=json.dumps({**signal, "passphrase": wrong[1]}))
    await go("POST", f"/webhooks/tradingview/{tv}", content="x" * 70_000)
    # A credential written otherwise than as is, or in more than one field, or pasted into
    # another field: cut out all the same.
    escaped = tv.replace("_", "\\u005f", 1)
    await go("POST", "/webhooks/tradingview",
             content=json.dumps(signal)[:-1] + f', "passphrase": "{escaped}"}}')
    await go("POST", "/webhooks/tradingview",
             content=f"ticker=ETHUSDT&action=sell&passphrase={tv.replace('_', '%5F', 1)}")
    await go("POST", "/webhooks/tradingview",
             content=json.dumps({**signal, "passphrase": tv, "secret": admin}))
    await go("POST", f"/webhooks/tradingview/{tv}",
             content=json.dumps({**signal, "comment": f"token {tv}", "extras": {tv: tv}}))
    await go("POST", f"/webhooks/tradingview/{tv}", content=f"ticker=AAPL action=buy x={tv}")
    await go("POST", f"/webhooks/tradingview/{tv}", content=f"buy,AAPL,{tv}")
    # The API, with good, wrong and missing tokens, of every scope.
    second = await go("POST", "/api/signals", webhook, json=signal,
                      extra={"Idempotency-Key": "k-1"})
    await go("POST", "/api/signals", admin, content="{not json")
    await go("POST", "/api/signals", webhook, json={**signal, "passphrase": tv})
    await go("POST", "/api/signals", webhook, json={**signal, "comment": webhook})
    await go("POST", "/api/signals", wrong[2], json=signal)
    await go("POST", "/api/signals", reader, json=signal)
    for token in (admin, reader, reporter, wrong[0], None):
        await go("GET", "/api/events?after=0&limit=100", token)
        await go("GET", "/api/signals?limit=10", token)
        await go("GET", f"/api/signals/{first}", token)
        await go("GET", "/api/signals/no-such-signal", token)
        await go("GET", "/api/consumers", token)
    await go("POST", f"/api/signals/{first}/status", reporter,
             json={"status": "processing", "consumer": "bot", "detail": {"note": "go"}})
    await go("POST", f"/api/signals/{first}/status", reporter,
             json={"status": "processing", "consumer": "bot"})  # 409
    await go("POST", f"/api/signals/{second}/status", reader, json={"status": "processed"})
    await go("POST", f"/api/signals/{first}/renormalize", admin)
    await go("POST", f"/api/signals/{first}/renormalize", reporter)
    for route in ("/healthz", "/readyz", "/metrics", "/nowhere"):
        await go("GET", route)
    assert {200, 202, 400, 401, 403, 404, 409, 413, 422} <= set(seen), sorted(set(seen))


async def exercise_websocket(server: ServerProcess, admin: str, reader: str,
                             reporter: str, wrong: list[str]) -> None:
    async with websockets.connect(server.ws_url) as conn:
        await conn.send(json.dumps({"op": "hello", "token": reporter, "cursor": 0,
                                    "consumer": "bot"}))
        assert (await next_frame(conn))["op"] == "welcome"
        await conn.send(json.dumps({"op": "status", "ref": 1, "signal_id": "nope",
                                    "status": "processed"}))
        await conn.send(json.dumps({"op": "ack", "position": 1}))
        await conn.send(json.dumps({"op": "ping"}))
        # Read up to the pong: the frames before it were handled, and no unread replay holds
        # up the closing handshake (a full receive queue would wait out its 10 s timeout).
        answers = []
        while (answer := (await next_frame(conn))["op"]) != "pong":
            answers.append(answer)
        assert "status_error" in answers
    async with websockets.connect(server.ws_url,
                                  additional_headers={"Authorization": f"Bearer {reader}"}
                                  ) as conn:
        await conn.send(json.dumps({"op": "hello", "cursor": None}))
        assert (await next_frame(conn))["op"] == "welcome"
    for token in (wrong[0], admin + "x"):
        async with websockets.connect(server.ws_url) as conn:
            await conn.send(json.dumps({"op": "hello", "token": token}))
            assert (await next_frame(conn))["code"] == 4401
