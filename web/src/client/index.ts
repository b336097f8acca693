/** The framework-free Signalbox web client. */

export { Backoff, type BackoffOptions } from "./backoff";
export {
  SignalboxClient,
  type ClientOptions,
  type EventListener,
  type StartFrom,
} from "./connection";
export type { ClientError, ClientErrorKind, ConnectionSnapshot, ConnectionState } from "./state";
export type { NetworkMonitor, WebSocketFactory, WebSocketLike } from "./browser";
export { ApiError, SignalboxApi, type EventQuery, type SignalQuery } from "./http";
export { SignalTable, failureOf, fold, signalIdOf, type SignalRow } from "./signals";
export {
  MemoryCheckpointStore,
  WebCheckpointStore,
  type Checkpoint,
  type CheckpointStore,
  type KeyValueStorage,
} from "./storage";
export * from "./types";
