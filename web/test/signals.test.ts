import { describe, expect, it } from "vitest";
import { SignalTable, type SignalboxEvent, type SignalSummary } from "../src/client";
import { event } from "./fakes";
import shared from "./fold-cases.json";

function ev(position: number, type: string, signalId: string): SignalboxEvent {
  const frame = event(position, type, signalId) as unknown as SignalboxEvent & { op?: string };
  if (type === "signal.accepted") {
    (frame as { data: unknown }).data = {
      signal_id: signalId, signal: { ticker: "MSFT", action: "buy", strategy: "trend" },
    };
  }
  if (type === "signal.failed") {
    (frame as { data: unknown }).data = {
      signal_id: signalId, status: "failed", detail: { error: "broker down" }, consumer: "bot",
    };
  }
  delete frame.op;
  return frame;
}

function summary(signalId: string, position: number, lastPosition: number,
                 status: SignalSummary["status"] = "accepted"): SignalSummary {
  return {
    signal_id: signalId, status, source: "api", ticker: "MSFT", strategy: null, action: "buy",
    received_at: "2026-01-01T00:00:00.000000Z", updated_at: "2026-01-01T00:00:00.000000Z",
    position, last_position: lastPosition, claimed_by: null, attempts: 0, last_error: null,
    steps: {},
  };
}

describe("SignalTable", () => {
  it("folds a signal's events into one row, as the server's projection does", () => {
    const table = new SignalTable();
    table.merge([], null, true);
    table.apply(ev(1, "signal.received", "a"));
    table.apply(ev(2, "signal.accepted", "a"));
    table.apply(ev(3, "signal.processing", "a"));
    table.apply(ev(4, "signal.failed", "a"));
    const row = table.get("a")!;
    expect(table.size).toBe(1);
    expect(row).toMatchObject({
      status: "failed", ticker: "MSFT", action: "buy", strategy: "trend", attempts: 1,
      claimed_by: "bot", last_error: "broker down", position: 1, last_position: 4,
    });
    expect(Object.keys(row.steps)).toEqual(["processing", "failed"]);
  });

  it("ignores an event already reflected in a row", () => {
    const table = new SignalTable();
    table.merge([summary("a", 1, 5, "processed")], null, true);
    table.apply(ev(3, "signal.processing", "a"));
    expect(table.get("a")!.status).toBe("processed");
  });

  it("folds in the events that came before the first page", () => {
    const table = new SignalTable();
    table.apply(ev(9, "signal.processing", "a")); // its row is on the first page, still coming
    table.merge([summary("a", 1, 2)], null, true);
    expect(table.get("a")).toMatchObject({ status: "processing", last_position: 9 });
    table.apply(ev(11, "signal.processed", "z")); // older than the table holds: ignored
    expect(table.get("z")).toBeUndefined();
  });

  it("keeps no more events waiting for the first page than it keeps rows", () => {
    const table = new SignalTable(3); // the first page keeps failing: its events come anyway
    for (let p = 1; p <= 50; p++) table.apply(ev(p, "signal.dispatched", `old${p % 5}`));
    expect(table.waiting).toBeLessThanOrEqual(3);
  });

  it("lets go of the waiting events once the first page is asked for again", () => {
    const table = new SignalTable();
    table.apply(ev(9, "signal.processing", "a")); // a page asked for now holds it
    table.askingFirstPage();
    expect(table.waiting).toBe(0);
    table.apply(ev(10, "signal.processed", "a")); // this one it may not
    expect(table.waiting).toBe(1);
    expect(table.merge([summary("a", 1, 9, "processing")], null, true)).toBe(true);
    expect(table.get("a")).toMatchObject({ status: "processed", last_position: 10 });
  });

  it("reads the first page again when it let events go while the page was on its way", () => {
    const table = new SignalTable(2);
    table.askingFirstPage();
    table.apply(ev(11, "signal.dispatched", "a"));
    table.apply(ev(12, "signal.dispatched", "b"));
    table.apply(ev(13, "signal.processing", "a")); // one too many: all three are let go
    expect(table.waiting).toBe(0);
    const stale = [summary("b", 2, 2), summary("a", 1, 1)];
    expect(table.merge(stale, null, true)).toBe(false); // it may not hold them: ask again
    expect(table.size).toBe(0);
    table.askingFirstPage();
    table.apply(ev(14, "signal.processed", "a"));
    const fresh = [summary("b", 2, 12, "dispatched"), summary("a", 1, 13, "processing")];
    expect(table.merge(fresh, null, true)).toBe(true);
    expect(table.list().map((r) => [r.signal_id, r.status])).toEqual(
      [["b", "dispatched"], ["a", "processed"]]);
    table.apply(ev(15, "signal.processed", "z")); // loaded: older than the table holds
    expect(table.waiting).toBe(0);
  });

  it("lists newest first and stays within its capacity", () => {
    const table = new SignalTable(3);
    table.merge([], null, true);
    for (let p = 1; p <= 5; p++) table.apply(ev(p, "signal.received", `s${p}`));
    expect(table.list().map((r) => r.signal_id)).toEqual(["s5", "s4", "s3"]);
    expect(table.floor).toBe(3);
    expect(table.more).toBe(true);
  });

  it("keeps the older rows it was asked for", () => {
    const table = new SignalTable(2);
    table.merge([summary("d", 4, 4), summary("c", 3, 3)], 3, true);
    expect(table.floor).toBe(3);
    table.merge([summary("b", 2, 2), summary("a", 1, 1)], null, false);
    expect(table.list().map((r) => r.signal_id)).toEqual(["d", "c", "b", "a"]);
    expect(table.more).toBe(false);
    expect(table.floor).toBe(0);
  });

  it("tells its subscribers about changes", () => {
    const table = new SignalTable();
    let calls = 0;
    table.subscribe(() => calls++);
    table.merge([], null, true);
    table.apply(ev(1, "signal.received", "a"));
    const before = table.list();
    table.apply(ev(1, "signal.received", "a"));
    expect(table.list()).toBe(before);
    expect(calls).toBe(2);
  });
});

/** A value as the browser reads it from the server, which sends the log's canonical JSON:
 * every object's keys sorted. */
function canonical(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(canonical);
  if (value === null || typeof value !== "object") return value;
  const entries = Object.entries(value as Record<string, unknown>);
  entries.sort(([a], [b]) => (a < b ? -1 : 1));
  return Object.fromEntries(entries.map(([k, v]) => [k, canonical(v)]));
}

interface FoldCase {
  name: string;
  events: { type: string; data: Record<string, unknown>; meta?: Record<string, unknown> }[];
  row: Record<string, unknown>;
}

const RECEIVED = { type: "signal.received", data: { signal_id: "s", source: "api" },
  meta: { ticker: "AAPL", strategy: "trend" } };

describe("the fold the server's projection does (web/test/fold-cases.json)", () => {
  it.each((shared.cases as FoldCase[]).map((c) => [c.name, c] as const))("%s", (_, c) => {
    const steps = c.events[0]!.type === "signal.received" ? c.events : [RECEIVED, ...c.events];
    const table = new SignalTable();
    table.merge([], null, true);
    steps.forEach((step, i) => table.apply({
      position: i + 1, id: `e${i + 1}`, stream: "signal-s", type: step.type,
      data: canonical(step.data), meta: canonical(step.meta ?? {}),
      time: `2026-01-01T00:00:0${i + 1}.000000Z`, hash: "",
    } as SignalboxEvent));
    const row = table.get("s") as unknown as Record<string, unknown>;
    expect(Object.fromEntries(Object.keys(c.row).map((k) => [k, row[k]]))).toEqual(c.row);
  });
});
