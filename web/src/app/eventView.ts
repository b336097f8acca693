/** What one event of a signal's timeline says, for a trader reading it: a few facts inline and
 * a failure's reason in full; the whole of its data goes in a JSON block beside them. */

import { failureOf, type SignalboxEvent } from "../client";

export interface Fact {
  label: string;
  value: string;
}

export interface EventView {
  facts: Fact[];
  /** Why it failed, in full (the table's Last error stops at 2000 characters). */
  reason: string | null;
}

/** The keys of `data` each type leads with; a status report adds its detail's values. */
const LEADS: Record<string, string[]> = {
  "signal.received": ["source", "format", "token", "remote_addr"],
  "signal.duplicate": ["source", "token", "idempotency_key", "remote_addr"],
  "signal.renormalized": ["kind"],
};
const REPORT = ["consumer", "attempt", "token"];
const REPORTED = new Set(["dispatched", "processing", "processed", "failed", "expired"]
  .map((status) => `signal.${status}`));
/** At most so many values of a report's detail inline, each cut at so many characters. */
const INLINE = 8;
const CLIP = 120;

export function eventView(event: SignalboxEvent): EventView {
  const data = event.data as Record<string, unknown>;
  const facts: Fact[] = [];
  const add = (label: string, value: unknown) => {
    if (value !== null && value !== undefined && value !== "") {
      facts.push({ label, value: clip(valueText(value)) });
    }
  };
  const report = REPORTED.has(event.type);
  for (const key of LEADS[event.type] ?? (report ? REPORT : [])) add(key, data[key]);
  let reason: string | null = null;
  if (report && isObject(data.detail)) {
    const detail = data.detail;
    const failure = event.type === "signal.failed" && Object.keys(detail).length
      ? failureOf(detail) : null;
    reason = failure?.text ?? null;
    Object.entries(detail)
      .filter(([key, value]) => key !== failure?.key && isScalar(value))
      .slice(0, INLINE)
      .forEach(([key, value]) => add(key, value));
  }
  if (event.type === "signal.renormalized") {
    for (const change of (event as SignalboxEvent<"signal.renormalized">).data.fields ?? []) {
      const side = (value: unknown) => clip(valueText(value ?? "—"));
      facts.push({ label: change.field, value: `${side(change.recorded)} → ${side(change.now)}` });
    }
  }
  return { facts, reason };
}

/** A string as it is; anything else as JSON, so that a number keeps the digits the server
 * sent (see `SignalboxApi.signal`: one a double would change comes as its text). */
export function valueText(value: unknown): string {
  return typeof value === "string" ? value : JSON.stringify(value) ?? String(value);
}

function clip(text: string): string {
  return text.length > CLIP ? `${text.slice(0, CLIP)}…` : text;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

const isRawJSON = (JSON as { isRawJSON?: (value: unknown) => boolean }).isRawJSON;

function isScalar(value: unknown): boolean {
  return value === null || typeof value !== "object" || isRawJSON?.(value) === true;
}
