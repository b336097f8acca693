"""A second process that keeps sending signals until its standard input closes.

``python -m tests.signal_sender URL TOKEN`` posts a signal every 50 ms (alternating tickers,
buys and sells, rising prices), each with its own idempotency key and retried until it is
answered, and prints each signal id on a line of its own as soon as the server accepts it.
"""

from __future__ import annotations

import sys
import threading
import uuid

import httpx


def main(url: str, token: str) -> None:
    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    with httpx.Client(base_url=url, timeout=5,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        number = 0
        while not stop.wait(0.05):
            number += 1
            signal = {"ticker": "AAPL" if number % 2 else "MSFT",
                      "action": "buy" if number % 3 else "sell", "quantity": "1",
                      "price": f"{100 + number}.25", "strategy": "e2e"}
            key = f"sender-{uuid.uuid4().hex}"
            while True:
                try:
                    answer = client.post("/api/signals", json=signal,
                                         headers={"Idempotency-Key": key})
                except httpx.TransportError:
                    stop.wait(0.1)
                    continue  # the same key again: a retry cannot record it twice
                if answer.status_code in (200, 202):
                    break
                if answer.status_code != 503:
                    raise SystemExit(f"unexpected answer {answer.status_code}: {answer.text}")
            print(answer.json()["signal_id"], flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
