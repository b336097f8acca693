import { describe, expect, it } from "vitest";
import { shortTime, showControls } from "../src/app/format";

const MORNING = new Date("2026-01-15T04:00:00Z"); // 09:30 in Kolkata, 23:00 the day before in New York

describe("shortTime", () => {
  it("gives the time of day in the zone asked for, and says which", () => {
    const iso = "2026-01-15T14:45:01.123456Z";
    expect(shortTime(iso, "Asia/Kolkata", MORNING)).toBe("20:15:01 UTC+05:30");
    expect(shortTime(iso, "UTC", MORNING)).toBe("14:45:01 UTC");
    expect(shortTime("2026-07-01T14:45:01Z", "America/New_York", new Date("2026-07-01T18:00:00Z")))
      .toBe("10:45:01 UTC-04:00"); // summer time: the offset of that day
  });

  it("gives the date too when it is not today in that zone", () => {
    expect(shortTime("2026-01-15T20:00:00Z", "Asia/Kolkata", MORNING))
      .toBe("2026-01-16 01:30:00 UTC+05:30");
    expect(shortTime("2026-01-15T03:00:00Z", "America/New_York", MORNING))
      .toBe("22:00:00 UTC-05:00");
    expect(shortTime("2026-01-15T03:00:00Z", "UTC", MORNING)).toBe("03:00:00 UTC");
  });

  it("gives what is not a time as it is", () => {
    expect(shortTime("yesterday", "UTC", MORNING)).toBe("yesterday");
  });
});

describe("showControls", () => {
  it("writes a bidi control as its escape", () => {
    expect(showControls("a\u202eb\u2066c")).toBe("a\\u202eb\\u2066c");
  });
});
