/** What the client takes from the browser: its WebSocket, location, storage and network. */

import { type CheckpointStore, MemoryCheckpointStore, WebCheckpointStore } from "./storage";

/** The part of the browser's WebSocket that the client uses (tests pass a fake). */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export type WebSocketFactory = (url: string) => WebSocketLike;

/** Tells whether the browser has a network, and when that changes. */
export interface NetworkMonitor {
  online(): boolean;
  watch(onChange: (online: boolean) => void): () => void;
}

export function defaultUrl(): string {
  const location = globalThis.location;
  if (!location) throw new TypeError("no page location: pass `url` (ws://host:port/ws)");
  return `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
}

export function defaultStore(key: string): CheckpointStore {
  try {
    if (globalThis.sessionStorage) return new WebCheckpointStore(globalThis.sessionStorage, key);
  } catch {
    // storage blocked: fall back to memory
  }
  return new MemoryCheckpointStore();
}

export function browserNetwork(): NetworkMonitor | null {
  const target = globalThis.window;
  if (!target || typeof navigator === "undefined" || !("onLine" in navigator)) return null;
  return {
    online: () => navigator.onLine,
    watch(onChange) {
      const up = () => onChange(true);
      const down = () => onChange(false);
      // A tab shown again (a laptop opened) dials at once instead of waiting out a backoff
      // that the browser may have stretched while the tab was hidden.
      const shown = () => {
        if (document.visibilityState === "visible" && navigator.onLine) onChange(true);
      };
      target.addEventListener("online", up);
      target.addEventListener("offline", down);
      document.addEventListener("visibilitychange", shown);
      return () => {
        target.removeEventListener("online", up);
        target.removeEventListener("offline", down);
        document.removeEventListener("visibilitychange", shown);
      };
    },
  };
}
