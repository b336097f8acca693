/**
 * Signals with their current status, kept up to date from events: the fold the server's
 * projection does (docs/protocol.md, "Status rules"), applied in the browser.
 *
 * Rows come from two places: pages of `GET /api/signals` and the event stream. Each row
 * remembers the last position folded into it, so an event already reflected in a row (a
 * page read after it, or a replay after a reconnect) changes nothing. The table is bounded:
 * past `capacity` rows the oldest are dropped, and `floor` (the position from which every
 * signal is in the table) moves up; older rows are fetched again on demand.
 *
 * Until the first page has come, events of signals the table lacks wait for it, as their rows
 * may be on it; what came before the page was asked for is in its answer already, so only the
 * events since then wait, no more than `capacity` of them. Past that they are let go and the
 * page is read again: re-reading costs one page, keeping everything could cost without end.
 */

import type { SignalboxEvent, SignalStatus, SignalSummary } from "./types";

export interface SignalRow extends SignalSummary {}

const REPORTED = new Set<SignalStatus>(["dispatched", "processing", "processed", "failed", "expired"]);

export class SignalTable {
  private readonly rows = new Map<string, SignalRow>();
  private pending = new Map<string, SignalboxEvent[]>();
  /** How many events `pending` holds. */
  waiting = 0;
  /** Events were let go since the first page was asked for: its answer may lack them. */
  private missed = false;
  private sorted: SignalRow[] | null = [];
  private readonly listeners = new Set<() => void>();
  /** Every signal first recorded at or after this position is in the table (null: none yet). */
  floor: number | null = null;
  /** Whether older signals may exist below `floor` on the server. */
  more = true;
  private loaded = false;

  constructor(public capacity = 1000) {}

  /** The rows, newest first; the same array until something changes. */
  list(): SignalRow[] {
    if (this.sorted === null) {
      this.sorted = [...this.rows.values()].sort((a, b) => b.position - a.position);
    }
    return this.sorted;
  }

  get(signalId: string): SignalRow | undefined {
    return this.rows.get(signalId);
  }

  get size(): number {
    return this.rows.size;
  }

  subscribe = (listener: () => void): (() => void) => {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  };

  /** Folds one event of the stream into its signal's row. */
  apply(event: SignalboxEvent): void {
    if (!event.type.startsWith("signal.")) return;
    const id = signalIdOf(event);
    if (id === null) return;
    const row = this.rows.get(id);
    if (row === undefined) {
      if (event.type === "signal.received") {
        this.put(newRow(event as SignalboxEvent<"signal.received">));
        this.trim();
      } else if (!this.loaded) {
        this.wait(id, event);
        return;
      } else {
        return; // a signal older than the table holds: nothing on screen changes
      }
    } else if (event.position > row.last_position) {
      this.put(fold(row, event));
    } else {
      return;
    }
    this.changed();
  }

  /** The first page is being asked for: the events that came before are in its answer. */
  askingFirstPage(): void {
    this.pending = new Map();
    this.waiting = 0;
    this.missed = false;
  }

  /** An event of a signal that may be on the first page, still on its way: folded in when it
   * comes, unless too many wait (then the page is read again: `merge` says so). */
  private wait(id: string, event: SignalboxEvent): void {
    if (this.missed) return;
    if (this.waiting >= this.capacity) {
      this.pending = new Map();
      this.waiting = 0;
      this.missed = true;
      return;
    }
    const list = this.pending.get(id) ?? [];
    list.push(event);
    this.pending.set(id, list);
    this.waiting++;
  }

  /**
   * Merges a page of `GET /api/signals` (newest first). `first` marks the page read when the
   * stream (re)started; later pages are older ones asked for by `before`. False when the first
   * page may lack events the table let go while it was on its way: ask for it again.
   */
  merge(page: SignalSummary[], nextBefore: number | null, first: boolean): boolean {
    // Its rows, folded with the events since, would pass off what was let go as never sent.
    if (first && this.missed) return false;
    for (const summary of page) {
      const known = this.rows.get(summary.signal_id);
      let row: SignalRow = known && known.last_position >= summary.last_position ? known : { ...summary };
      for (const event of this.pending.get(summary.signal_id) ?? []) {
        if (event.position > row.last_position) row = fold(row, event);
      }
      this.put(row);
    }
    if (first) {
      this.loaded = true;
      this.askingFirstPage(); // nothing waits any longer
    } else {
      this.capacity = Math.max(this.capacity, this.rows.size); // asked for: keep them
    }
    const oldest = page.length ? page[page.length - 1]!.position : null;
    if (oldest !== null) this.floor = this.floor === null ? oldest : Math.min(this.floor, oldest);
    this.more = nextBefore !== null;
    if (!this.more) this.floor = 0; // everything down to the first signal is here
    this.trim();
    this.changed();
    return true;
  }

  /** Forgets everything (a new token, or a log with another epoch). */
  clear(): void {
    this.rows.clear();
    this.askingFirstPage();
    this.floor = null;
    this.more = true;
    this.loaded = false;
    this.changed();
  }

  private put(row: SignalRow): void {
    this.rows.set(row.signal_id, row);
    this.sorted = null;
  }

  private trim(): void {
    if (this.rows.size <= this.capacity) return;
    if (this.rows.size > this.capacity + 1) {
      const dropped = this.list().slice(this.capacity);
      for (const row of dropped) this.rows.delete(row.signal_id);
    } else {
      let oldest: SignalRow | undefined; // one over: no need to sort them all
      for (const row of this.rows.values()) if (!oldest || row.position < oldest.position) oldest = row;
      if (oldest) this.rows.delete(oldest.signal_id);
    }
    this.sorted = null;
    let floor = Infinity;
    for (const row of this.rows.values()) floor = Math.min(floor, row.position);
    this.floor = Number.isFinite(floor) ? floor : null;
    this.more = true;
  }

  /** Grows with every change: a cheap snapshot for React's useSyncExternalStore. */
  version = 0;

  private changed(): void {
    this.sorted = null;
    this.version++;
    for (const listener of this.listeners) listener();
  }
}

export function signalIdOf(event: SignalboxEvent): string | null {
  const fromData = (event.data as { signal_id?: unknown }).signal_id;
  if (typeof fromData === "string") return fromData;
  const fromMeta = event.meta.signal_id;
  return typeof fromMeta === "string" ? fromMeta : null;
}

function newRow(event: SignalboxEvent<"signal.received">): SignalRow {
  return {
    signal_id: event.data.signal_id,
    status: "received",
    source: event.data.source || "api",
    ticker: safeText(event.meta.ticker, TICKER_LIMIT),
    strategy: safeText(event.meta.strategy, STRATEGY_LIMIT),
    action: null,
    received_at: event.time,
    updated_at: event.time,
    position: event.position,
    last_position: event.position,
    claimed_by: null,
    attempts: 0,
    last_error: null,
    steps: {},
  };
}

/** The row after `event`: the same rules as the server's projection. */
export function fold(row: SignalRow, event: SignalboxEvent): SignalRow {
  const next: SignalRow = { ...row, updated_at: event.time, last_position: event.position };
  if (event.type === "signal.accepted") {
    const signal = (event as SignalboxEvent<"signal.accepted">).data.signal;
    next.status = "accepted";
    next.action = signal.action ?? null;
    next.ticker = safeText(signal.ticker, TICKER_LIMIT);
    next.strategy = safeText(signal.strategy, STRATEGY_LIMIT);
  } else if (event.type === "signal.rejected") {
    next.status = "rejected";
  } else {
    const status = event.type.slice("signal.".length) as SignalStatus;
    if (REPORTED.has(status)) {
      const data = (event as SignalboxEvent<"signal.processing">).data;
      next.status = status;
      next.steps = { ...row.steps, [status]: event.time };
      if (status === "processing") {
        next.attempts = row.attempts + 1;
        next.claimed_by = safeText(data.consumer, CONSUMER_LIMIT);
      } else if (status === "failed") {
        next.last_error = errorText(data.detail);
      }
    }
  }
  return next;
}

/** The longest text a column keeps (pipeline/log/model.py and the projection's). */
const TICKER_LIMIT = 100;
const STRATEGY_LIMIT = 200;
const CONSUMER_LIMIT = 200;
const ERROR_LIMIT = 2000;

/** A failure's `last_error`: its reason, cut as the server's projection cuts it. */
function errorText(detail: unknown): string | null {
  return safeText(failureOf(detail)?.text, ERROR_LIMIT);
}

/** Why a report failed: its detail's `error` (else `message`, else `reason`; `key` says
 * which), else the whole detail; a string as it is, anything else as JSON. The server's
 * projection writes the same text, cut at 2000 characters; null without a detail. */
export function failureOf(detail: unknown): { key: string | null; text: string } | null {
  let key: string | null = null;
  if (detail !== null && typeof detail === "object" && !Array.isArray(detail)) {
    const d = detail as Record<string, unknown>;
    key = ["error", "message", "reason"].find((k) => d[k] !== null && d[k] !== undefined) ?? null;
    if (key !== null) detail = d[key];
  }
  if (detail === null || detail === undefined) return null;
  return { key, text: typeof detail === "string" ? detail : JSON.stringify(detail) };
}

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g;

/** A column's text as the server keeps it (`safe_text`): a non-empty string without NUL, a
 * lone surrogate as "?", at most `limit` characters (code points); anything else null. */
export function safeText(value: unknown, limit: number): string | null {
  if (typeof value !== "string" || !value) return null;
  let text = value.replace(/\0/g, "").replace(LONE_SURROGATE, "?");
  if (text.length > limit) {
    let end = 0;
    for (let count = 0; count < limit && end < text.length; count++) {
      end += text.codePointAt(end)! > 0xffff ? 2 : 1;
    }
    text = text.slice(0, end);
  }
  return text || null;
}
