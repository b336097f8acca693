/** The framework-free Signalbox web client. */

export { Backoff, type BackoffOptions } from "./backoff";
export {
  SignalboxClient,
  type ClientError,
  type ClientErrorKind,
  type ClientOptions,
  type ConnectionSnapshot,
  type ConnectionState,
  type EventListener,
  type NetworkMonitor,
  type StartFrom,
  type WebSocketFactory,
  type WebSocketLike,
} from "./connection";
export { ApiError, SignalboxApi, type EventQuery, type SignalQuery } from "./http";
export { SignalTable, fold, signalIdOf, type SignalRow } from "./signals";
export {
  MemoryCheckpointStore,
  WebCheckpointStore,
  type Checkpoint,
  type CheckpointStore,
  type KeyValueStorage,
} from "./storage";
export * from "./types";
