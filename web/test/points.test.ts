import { describe, expect, it } from "vitest";
import { addPoints, chartData, pricePoint, type PricePoint } from "../src/app/points";
import type { SignalboxEvent } from "../src/client";
import { matcher } from "../src/react/context";

function accepted(position: number, signal: Record<string, unknown>, time = "2026-01-15T14:45:00.000000Z"): SignalboxEvent {
  return {
    position, id: `e${position}`, stream: "signal-x", type: "signal.accepted", time, hash: "",
    data: { signal_id: "x", signal: { ticker: "AAPL", action: "buy", ...signal } },
    meta: { signal_id: "x", ticker: "AAPL", strategy: "trend" },
  } as SignalboxEvent;
}

describe("price points", () => {
  it("take the price, else the limit, else the stop price, at the signal's own time", () => {
    expect(pricePoint(accepted(1, { price: "101.5", signal_time: "2026-01-15T14:00:00Z" })))
      .toEqual({ position: 1, time: Date.UTC(2026, 0, 15, 14) / 1000, price: 101.5, decimals: 1,
        action: "buy" });
    expect(pricePoint(accepted(2, { limit_price: "99" }))?.price).toBe(99);
    expect(pricePoint(accepted(3, { stop_price: "98", action: "sell" }))?.action).toBe("sell");
    expect(pricePoint(accepted(4, { quantity: "1" }))).toBeNull();
  });

  it("make one line point per second and a marker per signal, up for buys, down for sells", () => {
    const points = [
      { position: 3, time: 20, price: 12, decimals: 0, action: "sell" },
      { position: 1, time: 10, price: 10, decimals: 0, action: "buy" },
      { position: 2, time: 10, price: 11, decimals: 0, action: "exit_long" },
      { position: 4, time: 30, price: 13, decimals: 0, action: "close" },
    ];
    const { line, markers } = chartData(points);
    expect(line).toEqual([{ time: 10, value: 11 }, { time: 20, value: 12 }, { time: 30, value: 13 }]);
    expect(markers.map((m) => [m.time, m.shape])).toEqual([
      [10, "arrowUp"], [10, "arrowDown"], [20, "arrowDown"], [30, "circle"],
    ]);
  });
});

describe("the price scale", () => {
  const scale = (...prices: string[]) =>
    chartData(prices.map((price, i) => pricePoint(accepted(i + 1, { price }))!)).precision;

  it("shows as many decimals as the finest price written, not two", () => {
    expect(scale("0.00000001", "0.00000003")).toBe(8);
    expect(scale("101.123456789", "101.1")).toBe(9);
    expect(scale("67432.5", "101.25")).toBe(2);
    expect(scale("410", "5000")).toBe(0);
  });

  it("stops at what a double holds, and shows two decimals while empty", () => {
    expect(scale("12345678.123456789")).toBe(8); // 17 digits: the 9th decimal is noise
    expect(scale("0.000000000000000000001")).toBe(10);
    expect(scale("1e-8")).toBe(8);
    expect(chartData([]).precision).toBe(2);
  });
});

describe("event matcher", () => {
  it("matches type globs and the meta's ticker and strategy, all lists together", () => {
    const event = accepted(1, { price: "1" });
    expect(matcher({})(event)).toBe(true);
    expect(matcher({ types: ["signal.*"] })(event)).toBe(true);
    expect(matcher({ types: ["signal.rejected", "signal.acc?pted"] })(event)).toBe(true);
    expect(matcher({ types: ["signal.processed"] })(event)).toBe(false);
    expect(matcher({ tickers: ["AAPL"], strategies: ["trend"] })(event)).toBe(true);
    expect(matcher({ tickers: ["AAPL"], strategies: ["other"] })(event)).toBe(false);
    expect(matcher({ streams: ["signal-y"] })(event)).toBe(false);
  });
});

describe("the newest points", () => {
  const point = (position: number): PricePoint =>
    ({ position, time: position, price: 1, decimals: 0, action: "buy" });

  it("keep the newest by log position, whatever order the pages came in", () => {
    const newestPage = [9, 8, 7].map(point);
    const olderPage = [6, 5, 4].map(point);
    const held = addPoints(addPoints([], [point(10)], 4), newestPage, 4);
    expect(addPoints(held, olderPage, 4).map((p) => p.position)).toEqual([7, 8, 9, 10]);
  });

  it("take each position once, remembering nothing beyond what they hold", () => {
    const held = addPoints([], [1, 2, 3].map(point), 2);
    expect(held.map((p) => p.position)).toEqual([2, 3]);
    expect(addPoints(held, [point(3), point(2)], 2)).toBe(held); // a replay: nothing new
    expect(addPoints(held, [point(1)], 2)).toEqual(held); // older than all held: cut again
    expect(addPoints(held, [point(4), point(4)], 2).map((p) => p.position)).toEqual([3, 4]);
  });
});
