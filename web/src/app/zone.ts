/** Where the dashboard shows times, kept in localStorage: a choice for this browser. */

import type { Zone } from "./format";

const KEY = "signalbox:zone";

/** The browser's own zone, by name ("Europe/Berlin"). */
export const LOCAL_ZONE = Intl.DateTimeFormat().resolvedOptions().timeZone;

export function loadZone(): Zone {
  try {
    return localStorage.getItem(KEY) === "UTC" ? "UTC" : "local";
  } catch {
    return "local";
  }
}

export function saveZone(zone: Zone): void {
  try {
    localStorage.setItem(KEY, zone);
  } catch {
    // the choice then lasts as long as the page
  }
}
