import { describe, expect, it } from "vitest";
import type { SignalboxEvent } from "../src/client";
import { eventView } from "../src/app/eventView";

function ev(type: string, data: Record<string, unknown>): SignalboxEvent {
  return { position: 7, id: "e7", stream: "signal-s", type, data: { signal_id: "s", ...data },
    meta: { signal_id: "s" }, time: "2026-01-01T00:00:07.000000Z", hash: "" } as SignalboxEvent;
}

function report(status: string, detail: unknown, more: Record<string, unknown> = {}) {
  return ev(`signal.${status}`, { status, detail, consumer: "broker-bot", attempt: 2,
    token: null, ...more });
}

describe("eventView", () => {
  it("gives a failure's reason in full, with who reported it and the attempt", () => {
    const error = "order rejected: " + "insufficient margin ".repeat(200);
    const view = eventView(report("failed", { error, type: "BrokerError", attempts: 3 }));
    expect(view.reason).toBe(error); // the table's Last error stops at 2000 characters
    expect(view.facts).toEqual([
      { label: "consumer", value: "broker-bot" }, { label: "attempt", value: "2" },
      { label: "type", value: "BrokerError" }, { label: "attempts", value: "3" },
    ]);
  });

  it("gives the failure's message, else its reason, else the whole detail", () => {
    expect(eventView(report("failed", { error: null, message: "timed out" })).reason)
      .toBe("timed out");
    expect(eventView(report("failed", { reason: { code: 503 } })).reason).toBe('{"code":503}');
    expect(eventView(report("failed", { http: 503 })).reason).toBe('{"http":503}');
    expect(eventView(report("failed", {})).reason).toBeNull();
  });

  it("gives a fill's values as the broker wrote them, never through a float", () => {
    const view = eventView(report("processed",
      { order_id: "A-1", filled_qty: "0.50000000", avg_price: "101.2500", partial: false,
        legs: [{ qty: "0.25" }] }));
    expect(view.reason).toBeNull();
    expect(view.facts.slice(2)).toEqual([
      { label: "order_id", value: "A-1" }, { label: "filled_qty", value: "0.50000000" },
      { label: "avg_price", value: "101.2500" }, { label: "partial", value: "false" },
    ]); // the nested legs are in the JSON block only
  });

  it("cuts a long value short inline: the whole is in the JSON block", () => {
    const view = eventView(report("processed", { note: "n".repeat(500) }));
    const note = view.facts.find((f) => f.label === "note")!;
    expect(note.value.length).toBeLessThan(200);
    expect(note.value.endsWith("…")).toBe(true);
  });

  it("gives a duplicate's source and a renormalization's change", () => {
    expect(eventView(ev("signal.duplicate", { source: "webhook", token: "tv",
      idempotency_key: null, remote_addr: "52.89.214.238" })).facts).toEqual([
      { label: "source", value: "webhook" }, { label: "token", value: "tv" },
      { label: "remote_addr", value: "52.89.214.238" },
    ]);
    expect(eventView(ev("signal.renormalized", { kind: "values", fields: [
      { field: "price", recorded: "101.5", now: "101.50" },
      { field: "stop_loss", recorded: null, now: "99" },
    ] })).facts).toEqual([
      { label: "kind", value: "values" }, { label: "price", value: "101.5 → 101.50" },
      { label: "stop_loss", value: "— → 99" },
    ]);
  });
});
