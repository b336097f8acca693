/** What a client tells about its connection. */

export type ConnectionState =
  | "idle"
  | "connecting"
  | "open"
  | "replaying"
  | "live"
  | "reconnecting"
  | "offline"
  | "error"
  | "closed";

export type ClientErrorKind =
  | "unauthorized"
  | "forbidden"
  | "epoch_changed"
  | "cursor_ahead"
  | "malformed"
  | "protocol";

/** Why the client stopped for good (state `error`). */
export interface ClientError {
  kind: ClientErrorKind;
  /** The close code (4401, 4403, 4409, 4400), or 0 for an answer the client could not use. */
  code: number;
  message: string;
  /** With `epoch_changed`: the server's epoch. */
  epoch?: string;
}

export interface ConnectionSnapshot {
  state: ConnectionState;
  /** The last position delivered (or covered by a `live` frame): where a reconnect resumes. */
  cursor: number | null;
  epoch: string | null;
  /** The newest position the server has mentioned (welcome, ping, events). */
  head: number | null;
  /** head − cursor: how many positions the client is behind (filtered ones included). */
  lag: number | null;
  /** When the last server ping arrived (ms since 1970). */
  lastHeartbeat: number | null;
  /** The server's heartbeat interval in seconds. */
  heartbeat: number | null;
  /** Failed attempts since the last welcome. */
  attempt: number;
  /** With `reconnecting`: when the next attempt starts (ms since 1970). */
  retryAt: number | null;
  error: ClientError | null;
  /** Welcomes received so far: 1 + the number of reconnects. */
  connections: number;
}
