/** A fake WebSocket that the tests drive frame by frame, and a fake Web Storage. */

import type { KeyValueStorage, WebSocketLike } from "../src/client";

export class FakeSocket implements WebSocketLike {
  onopen: ((event: unknown) => void) | null = null;
  onmessage: ((event: { data: unknown }) => void) | null = null;
  onclose: ((event: { code: number; reason: string }) => void) | null = null;
  onerror: ((event: unknown) => void) | null = null;
  sent: Record<string, unknown>[] = [];
  closed: { code?: number; reason?: string } | null = null;

  constructor(readonly url: string) {}

  send(data: string): void {
    this.sent.push(JSON.parse(data) as Record<string, unknown>);
  }

  close(code?: number, reason?: string): void {
    this.closed = { code, reason };
  }

  open(): void {
    this.onopen?.({});
  }

  frame(...frames: Record<string, unknown>[]): void {
    this.onmessage?.({ data: frames.map((f) => JSON.stringify(f)).join("\n") });
  }

  serverClose(code: number, reason = ""): void {
    this.onclose?.({ code, reason });
  }

  get hello(): Record<string, unknown> {
    const first = this.sent[0];
    if (!first || first.op !== "hello") throw new Error("no hello sent");
    return first;
  }
}

export class FakeSockets {
  all: FakeSocket[] = [];
  factory = (url: string): FakeSocket => {
    const socket = new FakeSocket(url);
    this.all.push(socket);
    return socket;
  };

  get last(): FakeSocket {
    const socket = this.all[this.all.length - 1];
    if (!socket) throw new Error("no socket was opened");
    return socket;
  }
}

export class FakeStorage implements KeyValueStorage {
  values = new Map<string, string>();
  getItem(key: string): string | null {
    return this.values.get(key) ?? null;
  }
  setItem(key: string, value: string): void {
    this.values.set(key, value);
  }
  removeItem(key: string): void {
    this.values.delete(key);
  }
}

export function event(position: number, type = "signal.received", signalId = `s${position}`) {
  return {
    op: "event", position, id: `e${position}`, stream: `signal-${signalId}`, type,
    data: type === "signal.received"
      ? { signal_id: signalId, body: "{}", format: "json", source: "api" }
      : { signal_id: signalId, status: type.slice(7), detail: {}, consumer: "bot" },
    meta: { signal_id: signalId, ticker: "AAPL" }, time: `2026-01-01T00:00:0${position % 10}.000000Z`,
    hash: "0".repeat(64),
  };
}
