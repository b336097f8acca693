/** `2026-01-15T14:45:01.123456Z` → `14:45:01` today, `2026-01-15 14:45:01` otherwise (local time). */
export function shortTime(iso: string): string {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  const time = date.toLocaleTimeString(undefined, { hour12: false });
  const today = new Date();
  if (date.toDateString() === today.toDateString()) return time;
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ${time}`;
}

function pad(n: number): string {
  return String(n).padStart(2, "0");
}

/** Bidi embeddings, overrides and isolates: one in a sender's text would turn around what
 * follows it on screen (a field, the rest of a line of JSON, the rest of a message). */
const BIDI_CONTROLS = /[\u202a-\u202e\u2066-\u2069]/g;

/** `text` with each bidi control written as its escape (`\u202e`), as JSON writes it too. */
export function showControls(text: string): string {
  return text.replace(BIDI_CONTROLS, (c) => `\\u${c.charCodeAt(0).toString(16)}`);
}
