"""The dashboard in headless Chromium against real servers: a bad token stops it with its
reason; signals posted over HTTP appear; status reports change rows in place, and the detail of
a signal the table no longer holds; the detail says what each report said (a failure's reason
in full, a fill's numbers as the broker sent them); a timeline cut by the server says so;
hostile text stays text; times say their zone, local or UTC as chosen; filters apply; a
keyboard alone opens a signal, and a screen reader hears the stream's state change; status
reports that come while the first page of signals cannot be read are all in the table once it
can; a server killed and restarted while another process keeps sending (through a second
instance on the same database) leaves the table with every signal exactly once, and so does a
reload; a new log behind the same address, or one that ends before the page's cursor, stops
the page until it is told to start again. No Content Security Policy violation and no page
error on the way.

Chromium is Debian's (/usr/bin/chromium, installed by `make test` when missing), driven by
Playwright from PyPI; no browser is ever downloaded. Screenshots go to web/test-results/.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, Route, async_playwright

from pipeline.http import MAX_TIMELINE
from tests.support import (
    ADMIN_TOKEN,
    INGEST_TOKEN,
    FastClient,
    ServerProcess,
    headers,
    repo_root,
)

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = repo_root() / "web" / "test-results"
ROWS = "tr[data-signal-id]"
WAIT_MS = 30_000
PAGE = 100  # signals on the first page the dashboard reads (web/src/react/context.tsx)
HELD = 1000  # signals the table keeps before it drops the oldest (the same file)
# Whether each row's status badge is what the page shows at its center (nothing drawn over it).
STATUS_IN_SIGHT = f"""() => [...document.querySelectorAll('{ROWS}')].map(row => {{
  const badge = row.querySelector('.status'), box = badge.getBoundingClientRect();
  const hit = document.elementFromPoint(box.x + box.width / 2, box.y + box.height / 2);
  return hit !== null && badge.contains(hit);
}})"""


def chromium_missing() -> bool:
    return not CHROMIUM.exists()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if chromium_missing():
        pytest.fail("no /usr/bin/chromium: run `make test` (it installs Debian's chromium)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


def read_token(database_url: str) -> str:
    """A token with scope read only: what a dashboard user pastes."""
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "token", "create", "dashboard", "--scope", "read",
         "--database-url", database_url],
        check=True, capture_output=True, text=True, timeout=60)
    return done.stdout.strip().splitlines()[-1]


async def until(predicate: Callable[[], bool], seconds: float) -> None:
    """Polls `predicate` with a deadline, letting the event loop (and Playwright) run."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def row_ids(page: Page) -> list[str]:
    ids: list[str] = await page.eval_on_selector_all(
        ROWS, "rows => rows.map(r => r.dataset.signalId)")
    return ids


async def wait_rows(page: Page, count: int) -> None:
    await page.wait_for_function(f"n => document.querySelectorAll('{ROWS}').length >= n",
                                 arg=count, timeout=WAIT_MS)


async def wait_state(page: Page, state: str) -> None:
    await page.wait_for_selector(f'[data-testid=connection][data-state="{state}"]',
                                 timeout=WAIT_MS)


class Sender:
    """tests/signal_sender.py in a process of its own, its signal ids collected as they come."""

    def __init__(self, server: ServerProcess) -> None:
        self.ids: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.signal_sender", server.base_url, INGEST_TOKEN],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=repo_root())
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.ids.append(line.strip())

    def stop(self) -> list[str]:
        assert self.process.stdin is not None
        self.process.stdin.close()
        assert self.process.wait(30) == 0
        self.reader.join(10)
        return list(self.ids)


async def sign_in(page: Page, server: ServerProcess) -> None:
    """Open the dashboard, give it a read token, and wait until it is live."""
    await page.goto(server.base_url + "/")
    await page.fill("#token", read_token(server.database_url))
    await page.click("button[type=submit]")
    await wait_state(page, "live")


async def post(client: httpx.AsyncClient, ticker: str, action: str, price: str) -> str:
    answer = await client.post("/api/signals", headers=headers(INGEST_TOKEN), json={
        "ticker": ticker, "action": action, "quantity": "1", "price": price,
        "strategy": "e2e"})
    assert answer.status_code == 202, answer.text
    signal_id: str = answer.json()["signal_id"]
    return signal_id


async def report(client: httpx.AsyncClient, signal_id: str, status: str) -> None:
    answer = await client.post(f"/api/signals/{signal_id}/status", headers=headers(ADMIN_TOKEN),
                               json={"status": status, "detail": {}, "consumer": "e2e-bot"})
    assert answer.status_code == 200, answer.text


async def test_dashboard_live_in_place_and_exactly_once_across_a_restart(
        browser: Browser, tmp_path: Path) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'signalbox.db'}"
    fast = ["--heartbeat", "1", "--poll-interval", "0.2"]
    shown = ServerProcess(database_url, args=fast).start()  # the one the page talks to
    other = ServerProcess(database_url, args=[*fast, "--no-migrate"]).start()
    token = read_token(database_url)
    problems: list[str] = []
    page = await browser.new_page(viewport={"width": 1400, "height": 900})

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            problems.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(str(error)))
    try:
        await page.goto(shown.base_url + "/")
        await page.wait_for_selector("#token")
        await shot(page, "1-token-form")
        # A bad token stops with its reason, and no retry loop.
        await page.fill("#token", "sbx_not_a_token")
        await page.click("button[type=submit]")
        await wait_state(page, "error")
        assert "(4401)" in await page.inner_text("[data-testid=connection-error]")
        await shot(page, "1-bad-token")
        await page.click("text=Change token")
        await page.fill("#token", token)
        await page.click("button[type=submit]")
        await wait_state(page, "live")
        assert token not in page.url

        async with httpx.AsyncClient(base_url=shown.base_url, timeout=30) as client:
            first = [await post(client, "AAPL", "buy", "101.5"),
                     await post(client, "AAPL", "sell", "103.25"),
                     await post(client, "MSFT", "buy", "410")]
            await wait_rows(page, 3)
            assert await row_ids(page) == first[::-1]  # newest first

            # A status report changes the row in place.
            await report(client, first[0], "processing")
            await report(client, first[0], "processed")
            await page.wait_for_selector(
                f'tr[data-signal-id="{first[0]}"][data-status="processed"]', timeout=WAIT_MS)
            assert len(await row_ids(page)) == 3

        await page.click(f'tr[data-signal-id="{first[0]}"]')
        await page.wait_for_function(
            "() => document.querySelectorAll('[data-testid=timeline] li').length === 4",
            timeout=WAIT_MS)
        types = await page.eval_on_selector_all(
            "[data-testid=timeline] li", "items => items.map(i => i.dataset.type)")
        assert types == ["signal.received", "signal.accepted", "signal.processing",
                         "signal.processed"]
        await page.wait_for_function(
            "() => document.querySelector('[data-testid=chart-points]').textContent === '2'",
            timeout=WAIT_MS)
        await shot(page, "2-live-with-detail")

        # Filters apply to the rows held.
        await page.fill("input[aria-label=Ticker]", "msft")
        await page.wait_for_function(
            f"() => document.querySelectorAll('{ROWS}').length === 1", timeout=WAIT_MS)
        assert await row_ids(page) == [first[2]]
        await page.fill("input[aria-label=Ticker]", "")
        await page.select_option("select[aria-label=Status]", "processed")
        await page.wait_for_function(
            f"() => document.querySelectorAll('{ROWS}').length === 1", timeout=WAIT_MS)
        assert await row_ids(page) == [first[0]]
        await page.select_option("select[aria-label=Status]", "")
        await wait_rows(page, 3)

        # A ticker as long as the server keeps (a rejected signal's) is cut short in its cell:
        # the table stays inside its card, and every row's status is still in sight.
        await page.set_viewport_size({"width": 1600, "height": 900})
        async with httpx.AsyncClient(base_url=shown.base_url, timeout=30) as client:
            answer = await client.post("/api/signals", headers=headers(INGEST_TOKEN),
                                       json={"ticker": "W" * 100, "action": "buy"})
            assert answer.status_code == 422, answer.text
            wide = answer.json()["signal_id"]
        await page.wait_for_selector(f'tr[data-signal-id="{wide}"]', timeout=WAIT_MS)
        assert await page.evaluate(STATUS_IN_SIGHT) == [True] * 4
        assert await page.get_attribute(
            f'tr[data-signal-id="{wide}"] td.ticker', "title") == "W" * 100
        await shot(page, "2-long-ticker")

        # Another process keeps sending, through the other instance, while this one dies.
        sender = Sender(other)
        await until(lambda: len(sender.ids) >= 5, 30)
        await wait_rows(page, 3 + 5)
        shown.kill()
        await wait_state(page, "reconnecting")
        await shot(page, "3-reconnecting")
        during = len(sender.ids)
        await until(lambda: len(sender.ids) >= during + 10, 30)  # missed by the page
        shown.restart()
        await wait_state(page, "live")
        await until(lambda: len(sender.ids) >= PAGE + 10, 60)  # more than one page
        sent = sender.stop()
        everything = {*first, wide, *sent}
        await wait_rows(page, len(everything))
        await page.wait_for_function(
            "() => document.querySelector('[data-testid=lag]')?.textContent === 'up to date'",
            timeout=WAIT_MS)
        ids = await row_ids(page)
        assert len(ids) == len(set(ids)), "a signal shows twice"
        assert set(ids) == everything
        await shot(page, "4-live-again")

        # A reload resumes from the stored cursor and token: the newest page of signals, then
        # older pages on demand, still every signal once.
        await page.reload()
        await wait_state(page, "live")
        await wait_rows(page, PAGE)
        await shot(page, "5-reloaded")
        while await page.locator("button.older").count():
            held = len(await row_ids(page))
            await page.click("button.older")
            await page.wait_for_function(
                f"n => document.querySelectorAll('{ROWS}').length > n"
                " || !document.querySelector('button.older')", arg=held, timeout=WAIT_MS)
        ids = await row_ids(page)
        assert len(ids) == len(set(ids)) and set(ids) == everything
        stored: Any = await page.evaluate(
            "() => JSON.parse(sessionStorage.getItem('signalbox:checkpoint:dashboard'))")
        async with httpx.AsyncClient(base_url=shown.base_url, timeout=30) as client:
            head = (await client.get("/readyz")).json()["head"]
        assert stored["cursor"] == head

        # Another log behind the same address (a new database): the page stops and says so,
        # and starts again from the new log's head only when asked.
        other.stop()
        shown.stop()
        port = shown.port
        shown = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'new.db'}", args=fast)
        shown.port = port  # the same address, so the page's URL still reaches it
        shown.start()
        await wait_state(page, "error")  # the read token is unknown there: 4401
        await page.click("text=Change token")  # one that every test server knows
        await page.fill("#token", ADMIN_TOKEN)
        await page.click("button[type=submit]")
        await wait_state(page, "error")  # the stored checkpoint belongs to the old log
        assert "epoch" in await page.inner_text("[data-testid=connection-error]")
        await shot(page, "6-epoch-changed")
        await page.click("text=Start again")
        await wait_state(page, "live")
        await page.wait_for_selector("text=No signals yet", timeout=WAIT_MS)
        assert problems == []
    finally:
        await page.close()
        other.stop()
        shown.stop()


async def test_the_chart_shows_a_busy_tickers_newest_signals(
        browser: Browser, tmp_path: Path) -> None:
    """More accepted signals than the chart holds (5000, web/src/app/PriceChart.tsx): it shows
    the newest ones, read newest first, not the oldest 5000."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'signalbox.db'}"
    server = ServerProcess(database_url).start()
    held = 5000
    limit = asyncio.Semaphore(16)

    async def send(client: httpx.AsyncClient, n: int) -> int:
        async with limit:
            answer = await client.post("/api/signals", headers=headers(INGEST_TOKEN), json={
                "ticker": "BUSY", "action": "buy", "quantity": "1", "price": str(1 + n)})
        assert answer.status_code == 202, answer.text
        position: int = answer.json()["position"]  # that of its signal.accepted
        return position

    page = await browser.new_page(viewport={"width": 1600, "height": 900})
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            positions = await asyncio.gather(*(send(client, n) for n in range(held + 10)))
        await sign_in(page, server)
        await page.wait_for_function(
            f"() => document.querySelector('[data-testid=chart-points]').textContent === '{held}'",
            timeout=WAIT_MS)
        newest = await page.get_attribute("[data-testid=chart-points]", "data-newest")
        assert newest == str(max(positions))
        await shot(page, "7-busy-ticker")
    finally:
        await page.close()
        server.stop()


async def test_a_cursor_ahead_of_the_log_stops_until_told_to_start_again(
        browser: Browser, tmp_path: Path) -> None:
    """A log behind the page's cursor, with the same epoch (a database restored from an older
    copy): the page stops with the server's reason and starts again from the head when asked,
    as after an epoch change; a reload alone would resume from the same cursor and stop again."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'signalbox.db'}"
    server = ServerProcess(database_url).start()
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        await sign_in(page, server)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            signal_id = await post(client, "AAPL", "buy", "101.5")
            await page.wait_for_selector(f'tr[data-signal-id="{signal_id}"]', timeout=WAIT_MS)
            head = (await client.get("/readyz")).json()["head"]
        await page.evaluate("""() => {
          const key = 'signalbox:checkpoint:dashboard';
          const saved = JSON.parse(sessionStorage.getItem(key));
          sessionStorage.setItem(key, JSON.stringify({ ...saved, cursor: saved.cursor + 1000 }));
        }""")
        await page.reload()
        await wait_state(page, "error")
        assert "ahead" in await page.inner_text("[data-testid=connection-error]")
        await shot(page, "8-cursor-ahead")
        await page.click("text=Start again")
        await wait_state(page, "live")
        await page.wait_for_selector(f'tr[data-signal-id="{signal_id}"]', timeout=WAIT_MS)
        stored: Any = await page.evaluate(
            "() => JSON.parse(sessionStorage.getItem('signalbox:checkpoint:dashboard'))")
        assert stored["cursor"] == head
    finally:
        await page.close()
        server.stop()


async def test_the_detail_follows_its_signal_after_the_table_lets_it_go(
        browser: Browser, tmp_path: Path) -> None:
    """The detail of a signal that newer ones pushed out of the table (it keeps the newest
    1000) still shows each status reported for it, as the server's timeline has it."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'signalbox.db'}"
    server = ServerProcess(database_url).start()
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    timeline = "() => [...document.querySelectorAll('[data-testid=timeline] li')].length"
    try:
        await sign_in(page, server)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            chosen = await post(client, "AAPL", "buy", "101.5")
            await page.click(f'tr[data-signal-id="{chosen}"]')
            await page.wait_for_function(f"() => ({timeline})() === 2", timeout=WAIT_MS)
            async with FastClient(server.base_url) as fast:
                answers = await asyncio.gather(*(
                    fast.post("/api/signals", {"ticker": "MSFT", "action": "buy"}, INGEST_TOKEN)
                    for _ in range(HELD)))
            assert {status for status, _ in answers} == {202}
            await page.wait_for_selector(f'tr[data-signal-id="{chosen}"]', state="detached",
                                         timeout=WAIT_MS)
            await report(client, chosen, "processing")
            await report(client, chosen, "processed")
            await page.wait_for_function(f"() => ({timeline})() === 4", timeout=WAIT_MS)
            assert await page.inner_text("[data-testid=detail] .status") == "processed"
    finally:
        await page.close()
        server.stop()


FACTS = """item => [...item.querySelectorAll('.facts div')]
  .map(fact => [fact.querySelector('dt').textContent, fact.querySelector('dd').textContent])"""


async def test_the_detail_says_what_each_report_said(browser: Browser, tmp_path: Path) -> None:
    """A failed signal's detail gives why, in full (the table's Last error stops at 2000
    characters), as text, wrapped inside the panel; a filled one gives the broker's fill with
    its numbers as sent (an order id of 19 digits, decimals with their zeros); a repeat gives
    its source. All of an event's data is in a folded JSON block."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'signalbox.db'}"
    server = ServerProcess(database_url).start()
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    error = "<img src=x onerror=alert(1)> margin call \u202e" + "x" * 3000
    fill = {"order_id": 1234567890123456789, "filled_qty": "0.50000000", "avg_price": "101.2500"}

    async def says(client: httpx.AsyncClient, signal_id: str, status: str,
                   detail: dict[str, Any]) -> None:
        answer = await client.post(
            f"/api/signals/{signal_id}/status", headers=headers(ADMIN_TOKEN),
            json={"status": status, "detail": detail, "consumer": "broker-bot"})
        assert answer.status_code == 200, answer.text

    try:
        await sign_in(page, server)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            failed = await post(client, "AAPL", "buy", "101.5")
            await says(client, failed, "processing", {})
            await says(client, failed, "failed", {"error": error, "type": "BrokerError"})
            alert = {"ticker": "MSFT", "action": "sell", "price": "410"}
            for _ in range(2):
                answer = await client.post("/api/signals", json=alert, headers={
                    **headers(INGEST_TOKEN), "Idempotency-Key": "alert-7"})
            assert answer.json()["duplicate"] is True, answer.text
            filled = answer.json()["signal_id"]
            await says(client, filled, "processing", {})
            await says(client, filled, "processed", fill)

        await page.click(f'tr[data-signal-id="{failed}"][data-status="failed"]')
        item = "[data-testid=timeline] li[data-type='signal.failed']"
        reason = await page.inner_text(f"{item} .reason", timeout=WAIT_MS)
        assert reason == error.replace("\u202e", "\\u202e")  # all of it, the control escaped
        assert len(await page.get_attribute(
            f'tr[data-signal-id="{failed}"] td.last-error', "title") or "") == 2000
        assert await page.eval_on_selector(item, FACTS) == [
            ["consumer", "broker-bot"], ["attempt", "1"], ["token", "env-admin"],
            ["type", "BrokerError"]]
        width = await page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 1400, "the page grew wider than the window"
        assert await page.locator(f"{item} .data pre").count() == 0  # folded
        await page.click(f"{item} .data summary")
        assert '"type": "BrokerError"' in await page.inner_text(f"{item} .data pre")
        await shot(page, "10-failed-detail")
        assert dialogs == []

        await page.click(f'tr[data-signal-id="{filled}"][data-status="processed"]')
        item = "[data-testid=timeline] li[data-type='signal.processed']"
        await page.wait_for_selector(item, timeout=WAIT_MS)
        assert await page.eval_on_selector(item, FACTS) == [
            ["consumer", "broker-bot"], ["attempt", "1"], ["token", "env-admin"],
            ["avg_price", "101.2500"],
            ["filled_qty", "0.50000000"], ["order_id", "1234567890123456789"]]
        await page.click(f"{item} .data summary")
        assert '"order_id": 1234567890123456789' in await page.inner_text(f"{item} .data pre")
        assert await page.eval_on_selector(
            "[data-testid=timeline] li[data-type='signal.duplicate']", FACTS) == [
            ["source", "api"], ["token", "env-webhook"], ["idempotency_key", "alert-7"],
            ["remote_addr", "127.0.0.1"]]
        await shot(page, "10-filled-detail")
    finally:
        await page.close()
        server.stop()


async def test_times_say_their_zone(browser: Browser, tmp_path: Path) -> None:
    """In a browser in Kolkata, a signal's time reads in Kolkata's time with its offset; the
    Times menu switches the table and the timeline to UTC, and a reload keeps the choice. The
    tooltip gives the full UTC timestamp either way."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'signalbox.db'}"
    server = ServerProcess(database_url).start()
    page = await browser.new_page(viewport={"width": 1400, "height": 900},
                                  timezone_id="Asia/Kolkata")
    try:
        await sign_in(page, server)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            signal_id = await post(client, "AAPL", "buy", "101.5")
        cell = f'tr[data-signal-id="{signal_id}"] td:first-child'
        await page.wait_for_selector(cell, timeout=WAIT_MS)
        stamp = await page.get_attribute(cell, "title")
        assert stamp is not None and stamp.endswith("Z")
        received = datetime.fromisoformat(stamp)
        kolkata = received.astimezone(ZoneInfo("Asia/Kolkata")).strftime("%H:%M:%S")
        # Today's time alone, another day's with its date: the end is the time and the zone.
        assert (await page.inner_text(cell)).endswith(f"{kolkata} UTC+05:30")

        await page.select_option("select[aria-label=Times]", "UTC")
        utc = f"{received:%H:%M:%S} UTC"
        await page.wait_for_function(
            "([cell, utc]) => document.querySelector(cell).textContent.endsWith(utc)",
            arg=[cell, utc], timeout=WAIT_MS)
        await page.click(cell)
        first = "[data-testid=timeline] li time"
        await page.wait_for_selector(first, timeout=WAIT_MS)
        assert (await page.inner_text(first)).endswith(utc)
        assert await page.get_attribute(first, "title") == stamp
        await shot(page, "11-times-in-utc")

        await page.reload()
        await wait_state(page, "live")
        await page.wait_for_selector(cell, timeout=WAIT_MS)
        assert (await page.inner_text(cell)).endswith(utc)
        assert await page.get_attribute(cell, "title") == stamp
    finally:
        await page.close()
        server.stop()


async def test_a_keyboard_alone_opens_a_signal(browser: Browser, tmp_path: Path) -> None:
    """From the filters, Tab reaches the signals' rows and Enter opens one's detail."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'signalbox.db'}"
    server = ServerProcess(database_url).start()
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    focused = "() => document.activeElement?.dataset?.signalId ?? null"
    try:
        await page.goto(server.base_url + "/")
        await page.fill("#token", read_token(database_url))
        await page.keyboard.press("Enter")
        await wait_state(page, "live")
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            older = await post(client, "AAPL", "buy", "101.5")
            newer = await post(client, "MSFT", "sell", "410")
        await wait_rows(page, 2)
        await page.focus("select[aria-label=Status]")
        await page.keyboard.press("Tab")
        assert await page.evaluate(focused) == newer
        await page.keyboard.press("Tab")
        assert await page.evaluate(focused) == older
        await page.keyboard.press("Enter")
        await page.wait_for_function(
            "() => document.querySelectorAll('[data-testid=timeline] li').length === 2",
            timeout=WAIT_MS)
        assert older[:8] in await page.inner_text("[data-testid=detail] h2")
        await page.keyboard.press("Shift+Tab")
        await page.keyboard.press("Space")
        await page.wait_for_function(
            f"() => document.querySelector('[data-testid=detail] h2').textContent"
            f".includes('{newer[:8]}')", timeout=WAIT_MS)
    finally:
        await page.close()
        server.stop()


async def test_a_timeline_cut_by_the_server_says_so(browser: Browser, tmp_path: Path) -> None:
    """A signal with more events than GET /api/signals/{id} gives (10,000; an alert resent with
    one key adds one each time): its detail says that the list is cut, and where the rest is."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'signalbox.db'}"
    server = ServerProcess(database_url).start()
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    alert = {"ticker": "AAPL", "action": "buy", "price": "101.5"}
    try:
        async with FastClient(server.base_url) as fast:
            status, first = await fast.post("/api/signals", alert, INGEST_TOKEN,
                                            {"Idempotency-Key": "resent"})
            assert status == 202
            answers = await asyncio.gather(*(
                fast.post("/api/signals", alert, INGEST_TOKEN, {"Idempotency-Key": "resent"})
                for _ in range(MAX_TIMELINE)))
        assert {status for status, _ in answers} == {200}
        signal_id = first["signal_id"]
        await sign_in(page, server)
        await page.click(f'tr[data-signal-id="{signal_id}"]')
        await page.wait_for_function(
            "n => document.querySelectorAll('[data-testid=timeline] li').length === n",
            arg=MAX_TIMELINE, timeout=WAIT_MS)
        note = await page.inner_text("[data-testid=timeline-cut]", timeout=WAIT_MS)
        assert f"stream=signal-{signal_id}" in note
    finally:
        await page.close()
        server.stop()


async def test_hostile_text_is_shown_as_text(browser: Browser, tmp_path: Path) -> None:
    """HTML is shown, not run; a 10,000-character comment scrolls inside its box; a bidi
    override in a field shows as its escape instead of turning around what follows it."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'signalbox.db'}"
    server = ServerProcess(database_url).start()
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            answer = await client.post("/api/signals", headers=headers(INGEST_TOKEN), json={
                "ticker": "AAPL", "action": "buy", "price": "101.5",
                "strategy": "<img src=x onerror=alert(1)>", "order_id": "\u202eyub",
                "comment": "x" * 10_000 + " שלום 🚀"})
            assert answer.status_code == 202, answer.text
            signal_id = answer.json()["signal_id"]
        await sign_in(page, server)
        await page.click(f'tr[data-signal-id="{signal_id}"]')
        normalized = await page.inner_text("[data-testid=detail] .json", timeout=WAIT_MS)
        assert '"<img src=x onerror=alert(1)>"' in normalized
        assert '"order_id": "\\u202eyub"' in normalized
        assert "\u202e" not in normalized
        assert "x" * 10_000 + " שלום 🚀" in normalized
        width = await page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 1400, "the page grew wider than the window"
        await shot(page, "9-hostile-text")
        assert dialogs == []
    finally:
        await page.close()
        server.stop()


async def test_a_screen_reader_hears_the_stream_change(browser: Browser, tmp_path: Path) -> None:
    """The stream's state is a live region (role status): Live, then Reconnecting when the
    server goes away, is read out without the user looking for it."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'signalbox.db'}"
    server = ServerProcess(database_url).start()
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        await sign_in(page, server)
        assert await page.get_by_role("status").inner_text(timeout=WAIT_MS) == "Live"
        server.kill()
        await wait_state(page, "reconnecting")
        assert await page.get_by_role("status").inner_text(timeout=WAIT_MS) == "Reconnecting"
    finally:
        await page.close()
        server.stop()


async def test_reports_that_come_while_the_first_page_cannot_be_read_are_all_shown(
        browser: Browser, tmp_path: Path) -> None:
    """The first page of signals fails (the network drops it), then one is answered only after
    more reports came than the table keeps waiting for it (1000): it lets them go and reads the
    page again, and the row shows every report, none lost."""
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'signalbox.db'}"
    server = ServerProcess(database_url).start()
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    phase = "fail"
    held = asyncio.Event()
    release = asyncio.Event()
    asked_after_release = 0

    async def first_page(route: Route) -> None:
        nonlocal asked_after_release
        if phase == "fail":
            await route.abort()
        elif phase == "hold":  # the server answers now; the page gets the answer later
            answer = await route.fetch()
            held.set()
            await release.wait()
            await route.fulfill(response=answer)
        else:
            asked_after_release += 1
            await route.continue_()

    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            signal_id = await post(client, "AAPL", "buy", "101.5")  # before the page's stream
            await page.route(lambda url: "/api/signals?" in url and "before=" not in url,
                             first_page)
            await sign_in(page, server)
            await page.wait_for_selector(".signals .error[role=alert]", timeout=WAIT_MS)
            phase = "hold"
            await asyncio.wait_for(held.wait(), WAIT_MS / 1000)
            async with FastClient(server.base_url) as fast:
                answers = await asyncio.gather(*(
                    fast.post(f"/api/signals/{signal_id}/status",
                              {"status": "dispatched", "detail": {}, "consumer": "e2e-bot"})
                    for _ in range(HELD + 1)))
            assert {status for status, _ in answers} == {200}
            await report(client, signal_id, "processing")
            await report(client, signal_id, "processed")
            head = (await client.get("/readyz")).json()["head"]
        await page.wait_for_selector(f"text=cursor {head}", timeout=WAIT_MS)  # all came
        phase = "pass"
        release.set()
        row = f'tr[data-signal-id="{signal_id}"][data-status="processed"]'
        await page.wait_for_selector(row, timeout=WAIT_MS)
        assert await page.inner_text(f"{row} td:nth-child(6)") == "1"  # attempts
        assert asked_after_release >= 1, "the page was not read again"
    finally:
        await page.close()
        server.stop()
