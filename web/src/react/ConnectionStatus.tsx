import { useEffect, useState } from "react";
import type { ClientErrorKind, ConnectionState } from "../client";
import { useSignalbox } from "./context";

const LABELS: Record<ConnectionState, string> = {
  idle: "Not connected",
  connecting: "Connecting",
  open: "Connected",
  replaying: "Catching up",
  live: "Live",
  reconnecting: "Reconnecting",
  offline: "Offline",
  error: "Stopped",
  closed: "Closed",
};

/** The log is not the one the stored cursor belongs to: another epoch, or one behind the
 * cursor (the same database restored from an older copy). Only forgetting the cursor helps. */
const ANOTHER_LOG = new Set<ClientErrorKind>(["epoch_changed", "cursor_ahead"]);

/** Re-renders every second, so that "3 s ago" stays true. */
function useNow(): number {
  const [now, setNow] = useState(() => Date.now());
  useEffect(() => {
    const timer = setInterval(() => setNow(Date.now()), 1000);
    return () => clearInterval(timer);
  }, []);
  return now;
}

function ago(then: number, now: number): string {
  const seconds = Math.max(0, Math.round((now - then) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  return `${Math.floor(seconds / 3600)} h ago`;
}

/** The stream's state (a live region: screen readers tell each change), how far behind it is,
 * the last heartbeat, and any error. */
export function ConnectionStatus() {
  const s = useSignalbox();
  const now = useNow();
  return (
    <div className="connection" data-testid="connection" data-state={s.state}>
      <span className={`badge state-${s.state}`} role="status">{LABELS[s.state]}</span>
      {s.lag !== null && (s.state === "live" || s.state === "replaying") && (
        <span className="detail" data-testid="lag">
          {s.lag === 0 ? "up to date" : `${s.lag} behind`}
        </span>
      )}
      <span className="detail" data-testid="heartbeat">
        {s.lastHeartbeat !== null ? `heartbeat ${ago(s.lastHeartbeat, now)}` : "no heartbeat yet"}
      </span>
      {s.cursor !== null && <span className="detail">cursor {s.cursor}</span>}
      {s.state === "reconnecting" && s.retryAt !== null && (
        <span className="detail">
          attempt {s.attempt}, next in {Math.max(0, Math.ceil((s.retryAt - now) / 1000))} s
        </span>
      )}
      {s.error && (
        <span className="error" role="alert" data-testid="connection-error">
          {s.error.message} ({s.error.code || s.error.kind})
          {ANOTHER_LOG.has(s.error.kind) && (
            <button type="button" onClick={s.restart}>Start again</button>
          )}
        </span>
      )}
    </div>
  );
}
