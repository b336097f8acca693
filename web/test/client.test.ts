import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import {
  MemoryCheckpointStore,
  SignalboxClient,
  WebCheckpointStore,
  type ClientOptions,
  type SignalboxEvent,
} from "../src/client";
import { FakeSockets, FakeStorage, event } from "./fakes";

const EPOCH = "11111111-1111-4111-8111-111111111111";
const OTHER_EPOCH = "22222222-2222-4222-8222-222222222222";

let sockets: FakeSockets;

function client(options: Partial<ClientOptions> = {}): SignalboxClient {
  return new SignalboxClient({
    token: "sbx_read", url: "ws://signalbox.test/ws", WebSocket: sockets.factory,
    store: new MemoryCheckpointStore(), network: null, random: () => 0.5, ...options,
  });
}

function welcome(cursor: number, head = cursor, heartbeat = 15, epoch = EPOCH) {
  return { op: "welcome", epoch, head, cursor, heartbeat };
}

function positions(received: SignalboxEvent[]): number[] {
  return received.map((e) => e.position);
}

beforeEach(() => {
  vi.useFakeTimers();
  sockets = new FakeSockets();
});

afterEach(() => {
  vi.useRealTimers();
});

describe("SignalboxClient", () => {
  it("says hello with its token, replays, then goes live", () => {
    const c = client({ start: "beginning", filter: { tickers: ["AAPL"] } });
    const states: string[] = [];
    c.subscribe((s) => { if (states[states.length - 1] !== s.state) states.push(s.state); });
    const received: SignalboxEvent[] = [];
    c.on("*", (e) => received.push(e));
    c.connect();
    sockets.last.open();
    expect(sockets.last.url).toBe("ws://signalbox.test/ws");
    expect(sockets.last.hello).toMatchObject({
      op: "hello", token: "sbx_read", cursor: 0, epoch: null, filter: { tickers: ["AAPL"] },
    });
    sockets.last.frame(welcome(0, 3), event(1), event(2));
    expect(c.getSnapshot()).toMatchObject({ state: "replaying", cursor: 2, head: 3, lag: 1 });
    sockets.last.frame({ op: "live", position: 3 });
    expect(positions(received)).toEqual([1, 2]);
    expect(c.getSnapshot()).toMatchObject({ state: "live", cursor: 3, lag: 0, epoch: EPOCH });
    expect(states).toEqual(["connecting", "open", "replaying", "live"]);
  });

  it("calls listeners by event type", () => {
    const c = client();
    const failed: string[] = [];
    const all: string[] = [];
    c.on("signal.failed", (e) => failed.push(e.data.status));
    c.on("*", (e) => all.push(e.type));
    c.connect();
    sockets.last.open();
    sockets.last.frame(welcome(0), event(1), event(2, "signal.failed", "s1"));
    expect(failed).toEqual(["failed"]);
    expect(all).toEqual(["signal.received", "signal.failed"]);
  });

  it("keeps cursor and epoch in storage and resumes from them after a reload", () => {
    const storage = new FakeStorage();
    const first = client({ store: new WebCheckpointStore(storage, "dashboard") });
    first.connect();
    sockets.last.open();
    sockets.last.frame(welcome(10), event(11), event(12), { op: "live", position: 14 });
    first.close();
    expect(JSON.parse(storage.getItem("signalbox:checkpoint:dashboard")!)).toEqual({ epoch: EPOCH, cursor: 14 });

    const second = client({ store: new WebCheckpointStore(storage, "dashboard") });
    second.connect();
    sockets.last.open();
    expect(sockets.last.hello).toMatchObject({ cursor: 14, epoch: EPOCH });
    // Another reader of the same tab keeps its own checkpoint.
    const other = client({ store: new WebCheckpointStore(storage, "chart") });
    other.connect();
    sockets.last.open();
    expect(sockets.last.hello).toMatchObject({ cursor: null, epoch: null });
  });

  it("saves an event's position only after its listeners ran, and survives a failing one", () => {
    const store = new MemoryCheckpointStore();
    const c = client({ store });
    const seenDuring: (number | undefined)[] = [];
    const errors = vi.spyOn(console, "error").mockImplementation(() => undefined);
    c.on("*", () => { throw new Error("a broken listener"); });
    c.on("*", (e) => seenDuring.push(store.load()?.cursor ?? e.position - 100));
    c.connect();
    sockets.last.open();
    sockets.last.frame(welcome(4), event(5), event(6));
    expect(seenDuring).toEqual([4, 5]);
    expect(store.load()).toEqual({ epoch: EPOCH, cursor: 6 });
    expect(errors).toHaveBeenCalledTimes(2);
    errors.mockRestore();
  });

  it("answers pings with pongs and records the heartbeat", () => {
    const c = client({ now: () => 1_700_000_000_000 });
    c.connect();
    sockets.last.open();
    sockets.last.frame(welcome(5), { op: "ping", head: 9 });
    expect(sockets.last.sent[1]).toEqual({ op: "pong" });
    expect(c.getSnapshot()).toMatchObject({ lastHeartbeat: 1_700_000_000_000, head: 9, lag: 4 });
  });

  it("treats twice the heartbeat of silence as a dead link and reconnects from its cursor", () => {
    const c = client();
    c.connect();
    const first = sockets.last;
    first.open();
    first.frame(welcome(0, 0, 15), event(1), { op: "live", position: 1 });
    vi.advanceTimersByTime(29_000);
    first.frame({ op: "ping", head: 1 }); // any frame re-arms the watchdog
    vi.advanceTimersByTime(29_000);
    expect(first.closed).toBeNull();
    expect(c.getSnapshot().state).toBe("live");
    vi.advanceTimersByTime(1_001);
    expect(first.closed?.code).toBe(4000);
    expect(c.getSnapshot().state).toBe("reconnecting");
    vi.advanceTimersByTime(c.getSnapshot().retryAt! - Date.now());
    expect(sockets.all.length).toBe(2);
    sockets.last.open();
    expect(sockets.last.hello).toMatchObject({ cursor: 1, epoch: EPOCH });
  });

  it("gives up on a socket that never welcomes it", () => {
    const c = client({ connectTimeoutMs: 5000 });
    c.connect();
    sockets.last.open();
    vi.advanceTimersByTime(5000);
    expect(sockets.last.closed?.code).toBe(4000);
    expect(c.getSnapshot().state).toBe("reconnecting");
  });

  it("never delivers an event twice across reconnects", () => {
    const c = client({ start: "beginning" });
    const received: SignalboxEvent[] = [];
    c.on("*", (e) => received.push(e));
    c.connect();
    sockets.last.open();
    sockets.last.frame(welcome(0, 3), event(1), event(2), event(3));
    sockets.last.serverClose(1006);
    vi.runOnlyPendingTimers();
    sockets.last.open();
    expect(sockets.last.hello).toMatchObject({ cursor: 3 });
    // A server that repeats itself must not make the client repeat itself.
    sockets.last.frame(welcome(3, 5), event(2), event(3), event(4), event(4), event(5));
    sockets.last.serverClose(1001);
    vi.runOnlyPendingTimers();
    sockets.last.open();
    sockets.last.frame(welcome(5, 6), event(6), { op: "live", position: 6 });
    expect(positions(received)).toEqual([1, 2, 3, 4, 5, 6]);
    expect(c.getSnapshot().connections).toBe(3);
  });

  it("backs off with full jitter between failed attempts and starts over after a welcome", () => {
    const c = client({ backoff: { base: 1, cap: 4 }, random: () => 0.999 });
    const waits: number[] = [];
    c.connect();
    for (let i = 0; i < 5; i++) {
      sockets.last.serverClose(1006); // refused before it opened
      const wait = c.getSnapshot().retryAt! - Date.now();
      waits.push(wait);
      vi.advanceTimersByTime(wait);
    }
    expect(waits).toEqual([999, 1998, 3996, 3996, 3996]);
    expect(c.getSnapshot().attempt).toBe(5);
    sockets.last.open();
    sockets.last.frame(welcome(0));
    expect(c.getSnapshot().attempt).toBe(0);
    sockets.last.serverClose(1011);
    expect(c.getSnapshot().retryAt! - Date.now()).toBe(999);
  });

  it("stops with a clear error, and no reconnect loop, on a bad token", () => {
    const c = client();
    c.connect();
    sockets.last.open();
    sockets.last.frame({ op: "error", code: 4401, message: "unknown token: use another" });
    sockets.last.serverClose(4401, "unauthorized");
    expect(c.getSnapshot()).toMatchObject({
      state: "error", error: { kind: "unauthorized", code: 4401, message: "unknown token: use another" },
    });
    vi.advanceTimersByTime(10 * 60_000);
    expect(sockets.all.length).toBe(1);
  });

  it("stops on a token without the read scope", () => {
    const c = client();
    c.connect();
    sockets.last.open();
    sockets.last.serverClose(4403, "forbidden");
    expect(c.getSnapshot().error).toMatchObject({ kind: "forbidden", code: 4403 });
    vi.advanceTimersByTime(10 * 60_000);
    expect(sockets.all.length).toBe(1);
  });

  it("stops when the log's epoch changed, until reset starts it afresh", () => {
    const store = new MemoryCheckpointStore({ epoch: EPOCH, cursor: 40 });
    const c = client({ store });
    c.connect();
    sockets.last.open();
    expect(sockets.last.hello).toMatchObject({ cursor: 40, epoch: EPOCH });
    sockets.last.frame({ op: "error", code: 4409, message: "another log", epoch: OTHER_EPOCH });
    sockets.last.serverClose(4409);
    expect(c.getSnapshot()).toMatchObject({
      state: "error", error: { kind: "epoch_changed", code: 4409, epoch: OTHER_EPOCH },
    });
    vi.advanceTimersByTime(10 * 60_000);
    expect(sockets.all.length).toBe(1);
    c.reset();
    expect(store.load()).toBeNull();
    sockets.last.open();
    expect(sockets.last.hello).toMatchObject({ cursor: null, epoch: null });
    sockets.last.frame(welcome(7, 7, 15, OTHER_EPOCH));
    expect(c.getSnapshot()).toMatchObject({ state: "replaying", epoch: OTHER_EPOCH, error: null });
  });

  it("refuses a welcome into another epoch", () => {
    const c = client({ store: new MemoryCheckpointStore({ epoch: EPOCH, cursor: 4 }) });
    c.connect();
    sockets.last.open();
    sockets.last.frame(welcome(4, 4, 15, OTHER_EPOCH));
    expect(c.getSnapshot().error?.kind).toBe("epoch_changed");
    expect(sockets.last.closed).not.toBeNull();
  });

  it("waits while the browser is offline and dials as soon as it is back", () => {
    let online = true;
    let notify: (online: boolean) => void = () => undefined;
    const c = client({
      network: { online: () => online, watch: (f) => { notify = f; return () => undefined; } },
    });
    c.connect();
    sockets.last.open();
    sockets.last.frame(welcome(2), { op: "live", position: 2 });
    online = false;
    notify(false);
    expect(c.getSnapshot().state).toBe("offline");
    expect(sockets.last.closed).not.toBeNull();
    vi.advanceTimersByTime(60_000);
    expect(sockets.all.length).toBe(1);
    online = true;
    notify(true);
    expect(sockets.all.length).toBe(2);
    sockets.last.open();
    expect(sockets.last.hello).toMatchObject({ cursor: 2 });
  });
});
