/** Signal prices as chart points: one line point per second, a marker per buy or sell. */

import type { SignalboxEvent } from "../client";

export interface PricePoint {
  position: number;
  /** Seconds since 1970 (UTC). */
  time: number;
  price: number;
  action: string;
}

/** The point of an accepted signal: its own time (signal_time, bar_time) or the event's. */
export function pricePoint(event: SignalboxEvent): PricePoint | null {
  if (event.type !== "signal.accepted") return null;
  const signal = (event as SignalboxEvent<"signal.accepted">).data.signal;
  const raw = signal.price ?? signal.limit_price ?? signal.stop_price;
  const price = raw === undefined ? Number.NaN : Number(raw);
  const millis = Date.parse(signal.signal_time ?? signal.bar_time ?? event.time);
  if (!Number.isFinite(price) || !Number.isFinite(millis)) return null;
  return { position: event.position, time: Math.floor(millis / 1000), price, action: signal.action };
}

/** The newest `max` of `points` (by log position), oldest first. */
export function newestPoints(points: PricePoint[], max: number): PricePoint[] {
  return [...points].sort((a, b) => a.position - b.position).slice(-max);
}

export interface ChartData {
  line: { time: number; value: number }[];
  markers: { time: number; position: "aboveBar" | "belowBar" | "inBar";
    shape: "arrowUp" | "arrowDown" | "circle"; color: string; text: string }[];
}

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
  return { line, markers };
}
