/** Signal prices as chart points: one line point per second, a marker per buy or sell. */

import type { SignalboxEvent } from "../client";

export interface PricePoint {
  position: number;
  /** Seconds since 1970 (UTC). */
  time: number;
  price: number;
  /** How many decimals the signal wrote its price with ("0.00000001": 8). */
  decimals: number;
  action: string;
}

/** The point of an accepted signal: its own time (signal_time, bar_time) or the event's. */
export function pricePoint(event: SignalboxEvent): PricePoint | null {
  if (event.type !== "signal.accepted") return null;
  const signal = (event as SignalboxEvent<"signal.accepted">).data.signal;
  const raw = signal.price ?? signal.limit_price ?? signal.stop_price;
  if (raw === undefined) return null;
  const price = Number(raw);
  const millis = Date.parse(signal.signal_time ?? signal.bar_time ?? event.time);
  if (!Number.isFinite(price) || !Number.isFinite(millis)) return null;
  return { position: event.position, time: Math.floor(millis / 1000), price,
    decimals: decimalsOf(raw), action: signal.action };
}

const DECIMAL = /^[+-]?\d*(?:\.(\d*))?(?:[eE]([+-]?\d+))?$/;

function decimalsOf(text: string): number {
  const match = DECIMAL.exec(text.trim());
  return match ? Math.max(0, (match[1]?.length ?? 0) - Number(match[2] ?? 0)) : 0;
}

/**
 * `held` with those of `fresh` whose positions it lacks, the newest `max` by log position,
 * oldest first; `held` itself when nothing is new. What is known is what is held: a tab open
 * for days remembers no more than `max` points (a point cut off comes back only to be cut).
 */
export function addPoints(held: PricePoint[], fresh: PricePoint[], max: number): PricePoint[] {
  const known = new Set(held.map((p) => p.position));
  const added: PricePoint[] = [];
  for (const p of fresh) {
    if (known.has(p.position)) continue;
    known.add(p.position);
    added.push(p);
  }
  if (!added.length) return held;
  return [...held, ...added].sort((a, b) => a.position - b.position).slice(-max);
}

export interface ChartData {
  /** Decimals on the price scale: those of the finest price, so that 0.00000001 is not 0.00;
   * no more than a double holds at the largest price (nor 10), as the chart would show noise. */
  precision: number;
  line: { time: number; value: number }[];
  markers: { time: number; position: "aboveBar" | "belowBar" | "inBar";
    shape: "arrowUp" | "arrowDown" | "circle"; color: string; text: string }[];
}

const MAX_DECIMALS = 10;
const UP = new Set(["buy", "exit_short"]);
const DOWN = new Set(["sell", "exit_long"]);

export function chartData(points: PricePoint[]): ChartData {
  const sorted = [...points].sort((a, b) => a.time - b.time || a.position - b.position);
  const line: ChartData["line"] = [];
  for (const p of sorted) {
    const last = line[line.length - 1];
    if (last && last.time === p.time) last.value = p.price; // one value per second: the latest
    else line.push({ time: p.time, value: p.price });
  }
  const markers = sorted.map((p) => {
    if (UP.has(p.action)) {
      return { time: p.time, position: "belowBar" as const, shape: "arrowUp" as const,
        color: "#1a7f37", text: p.action };
    }
    if (DOWN.has(p.action)) {
      return { time: p.time, position: "aboveBar" as const, shape: "arrowDown" as const,
        color: "#cf222e", text: p.action };
    }
    return { time: p.time, position: "inBar" as const, shape: "circle" as const,
      color: "#6e7781", text: p.action };
  });
  return { precision: precisionOf(points), line, markers };
}

function precisionOf(points: PricePoint[]): number {
  if (!points.length) return 2;
  const finest = points.reduce((most, p) => Math.max(most, p.decimals), 0);
  const largest = points.reduce((most, p) => Math.max(most, Math.abs(p.price)), 0);
  // The chart formats price × 10^precision as an integer: exact up to 2^53 only.
  const held = largest > 0 ? Math.floor(Math.log10(Number.MAX_SAFE_INTEGER / largest)) : finest;
  return Math.max(0, Math.min(finest, held, MAX_DECIMALS));
}
