import { describe, expect, it } from "vitest";
import { Backoff } from "../src/client";

describe("Backoff", () => {
  it("doubles its ceiling from base up to cap", () => {
    const backoff = new Backoff({ base: 0.5, cap: 30 });
    expect([0, 1, 2, 3, 6, 7, 100].map((n) => backoff.ceiling(n))).toEqual([0.5, 1, 2, 4, 30, 30, 30]);
  });

  it("waits anywhere from zero to the ceiling: full jitter", () => {
    const low = new Backoff({ base: 1, cap: 8 }, () => 0);
    const high = new Backoff({ base: 1, cap: 8 }, () => 0.999999);
    for (let attempt = 0; attempt < 10; attempt++) {
      expect(low.delayMs(attempt)).toBe(0);
      const ceiling = Math.min(8, 2 ** attempt) * 1000;
      expect(high.delayMs(attempt)).toBeLessThan(ceiling);
      expect(high.delayMs(attempt)).toBeGreaterThanOrEqual(ceiling - 1);
    }
  });

  it("draws every wait inside the bounds with the real random source", () => {
    const backoff = new Backoff({ base: 0.25, cap: 4 });
    const seen = new Set<number>();
    for (let i = 0; i < 2000; i++) {
      const attempt = i % 8;
      const delay = backoff.delayMs(attempt);
      expect(delay).toBeGreaterThanOrEqual(0);
      expect(delay).toBeLessThan(backoff.ceiling(attempt) * 1000);
      seen.add(delay);
    }
    expect(seen.size).toBeGreaterThan(100); // jittered, not one fixed wait per attempt
  });

  it("refuses a cap below the base", () => {
    expect(() => new Backoff({ base: 2, cap: 1 })).toThrow(RangeError);
  });
});
