/** Where times are shown: the browser's zone ("local"), UTC, or any IANA zone. */
export type Zone = "local" | "UTC" | (string & {});

/** `2026-01-15T14:45:01.123456Z` → `20:15:01 UTC+05:30` today in `zone`, `2026-01-15 20:15:01
 * UTC+05:30` another day: with the offset of that moment (summer time changes it), so that a
 * time read beside another zone's is never taken for it. */
export function shortTime(iso: string, zone: Zone = "local", now = new Date()): string {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  const at = partsIn(zone, date);
  const today = partsIn(zone, now);
  const day = `${at.year}-${at.month}-${at.day}`;
  const offset = zone === "UTC" ? "UTC" : at.timeZoneName!.replace("GMT", "UTC");
  const time = `${at.hour}:${at.minute}:${at.second} ${offset}`;
  return day === `${today.year}-${today.month}-${today.day}` ? time : `${day} ${time}`;
}

const FORMATS = new Map<Zone, Intl.DateTimeFormat>();

function partsIn(zone: Zone, date: Date): Partial<Record<Intl.DateTimeFormatPartTypes, string>> {
  let format = FORMATS.get(zone);
  if (format === undefined) {
    format = new Intl.DateTimeFormat("en-US", {
      timeZone: zone === "local" ? undefined : zone, hourCycle: "h23", timeZoneName: "longOffset",
      year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit", second: "2-digit",
    });
    FORMATS.set(zone, format);
  }
  return Object.fromEntries(format.formatToParts(date).map((part) => [part.type, part.value]));
}

/** Bidi embeddings, overrides and isolates: one in a sender's text would turn around what
 * follows it on screen (a field, the rest of a line of JSON, the rest of a message). */
const BIDI_CONTROLS = /[\u202a-\u202e\u2066-\u2069]/g;

/** `text` with each bidi control written as its escape (`\u202e`), as JSON writes it too. */
export function showControls(text: string): string {
  return text.replace(BIDI_CONTROLS, (c) => `\\u${c.charCodeAt(0).toString(16)}`);
}
