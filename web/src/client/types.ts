/** The shapes of the Signalbox protocol (docs/protocol.md), as the server sends them. */

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export type JsonObject = { [key: string]: Json };

/** The statuses a signal goes through. */
export type SignalStatus =
  | "received"
  | "accepted"
  | "rejected"
  | "dispatched"
  | "processing"
  | "processed"
  | "failed"
  | "expired";

export const STATUSES: readonly SignalStatus[] = [
  "received", "accepted", "rejected", "dispatched", "processing", "processed", "failed",
  "expired",
];

export type SignalAction = "buy" | "sell" | "exit_long" | "exit_short" | "close";

/** The normalized signal (`signal.accepted` → `data.signal`); prices are decimal strings. */
export interface NormalizedSignal {
  ticker: string;
  action: SignalAction;
  exchange?: string;
  quantity?: string;
  quantity_type?: string;
  order_type?: string;
  price?: string;
  limit_price?: string;
  stop_price?: string;
  take_profit?: string;
  stop_loss?: string;
  time_in_force?: string;
  interval?: string;
  bar_time?: string;
  signal_time?: string;
  strategy?: string;
  order_id?: string;
  comment?: string;
  max_lag?: number;
  extras?: JsonObject;
}

export interface ValidationError {
  code: string;
  field: string | null;
  message: string;
}

export interface ReceivedData {
  signal_id: string;
  body: string;
  format: string;
  source: "webhook" | "api";
  token?: string;
  remote_addr?: string | null;
  content_type?: string | null;
  bytes?: number;
  user_agent?: string;
  idempotency_key?: string | null;
}

export interface StatusData {
  signal_id: string;
  status: SignalStatus;
  detail: JsonObject;
  consumer: string | null;
  attempt?: number;
  token?: string;
}

/** A reading of the recorded body that today's parsers give differently (not a status). */
export interface RenormalizedData {
  signal_id: string;
  received_position: number;
  kind: "accepted->rejected" | "rejected->accepted" | "values";
  recorded: JsonObject;
  now: JsonObject;
  fields: { field: string; recorded: Json; now: Json }[];
}

/** What `data` holds, by event type. */
export interface EventDataMap {
  "signal.received": ReceivedData;
  "signal.accepted": { signal_id: string; signal: NormalizedSignal };
  "signal.rejected": { signal_id: string; errors: ValidationError[] };
  "signal.duplicate": { signal_id: string } & JsonObject;
  "signal.dispatched": StatusData;
  "signal.processing": StatusData;
  "signal.processed": StatusData;
  "signal.failed": StatusData;
  "signal.expired": StatusData;
  "signal.renormalized": RenormalizedData;
}

export type EventType = keyof EventDataMap;

export interface EventMeta {
  signal_id?: string;
  ticker?: string;
  strategy?: string;
  [key: string]: Json | undefined;
}

/** One event of the log. `T` narrows `type` and `data` for listeners of one type. */
export interface SignalboxEvent<T extends EventType = EventType> {
  position: number;
  id: string;
  stream: string;
  type: T;
  data: EventDataMap[T];
  meta: EventMeta;
  time: string;
  hash: string;
}

/** Which events a connection receives: lists combine with AND, values within one with OR. */
export interface EventFilter {
  types?: string[];
  streams?: string[];
  tickers?: string[];
  strategies?: string[];
}

/** A row of `GET /api/signals`: a signal with its current status. */
export interface SignalSummary {
  signal_id: string;
  status: SignalStatus;
  source: string;
  ticker: string | null;
  strategy: string | null;
  action: string | null;
  received_at: string;
  updated_at: string;
  position: number;
  last_position: number;
  claimed_by: string | null;
  attempts: number;
  last_error: string | null;
  steps: Partial<Record<SignalStatus, string>>;
}

export interface SignalPage {
  signals: SignalSummary[];
  next_before: number | null;
}

export interface SignalTimeline {
  signal: SignalSummary & { normalized?: NormalizedSignal; errors?: ValidationError[] };
  status: SignalStatus;
  /** Its first 10,000 events; true when it has more (`GET /api/events?stream=` has them all). */
  events: SignalboxEvent[];
  truncated: boolean;
}

export interface EventPage {
  epoch: string;
  events: SignalboxEvent[];
  next: number;
  head: number;
}

export interface ApiErrorBody {
  error: string;
  message: string;
}
