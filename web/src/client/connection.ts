/**
 * The Signalbox WebSocket client: hello with token, cursor and epoch; replay, then live;
 * a heartbeat watchdog; reconnects with full-jitter backoff; the checkpoint kept in storage.
 *
 * States: idle → connecting → open → replaying → live; a lost link goes to reconnecting
 * (and back through open → replaying → live), a browser without network to offline; 4401,
 * 4403, 4400 and 4409 (another epoch, or a cursor ahead of the head) go to error and stay
 * there: no reconnect loop on a bad token. `close()` goes to closed.
 */

import { Backoff, type BackoffOptions } from "./backoff";
import { browserNetwork, defaultStore, defaultUrl, type NetworkMonitor, type WebSocketFactory,
  type WebSocketLike } from "./browser";
import type { ClientError, ClientErrorKind, ConnectionSnapshot } from "./state";
import type { CheckpointStore } from "./storage";
import type { EventFilter, EventType, SignalboxEvent } from "./types";

export type StartFrom = "live" | "beginning" | number;

export interface ClientOptions {
  /** A token with scope `read`. It goes in the hello frame, never in the URL. */
  token: string;
  /** `ws(s)://host/ws`; default: this page's host. */
  url?: string;
  filter?: EventFilter;
  /** Where to start when no checkpoint is stored: live only (default), 0, or after N. */
  start?: StartFrom;
  /** Where the checkpoint lives; default sessionStorage (one per tab) under `storageKey`. */
  store?: CheckpointStore;
  /** Names this reader's checkpoint in the default store (default "default"). */
  storageKey?: string;
  backoff?: BackoffOptions;
  /** Milliseconds to open the socket and be welcomed. */
  connectTimeoutMs?: number;
  WebSocket?: WebSocketFactory;
  network?: NetworkMonitor | null;
  random?: () => number;
  now?: () => number;
}

export type EventListener<T extends EventType = EventType> = (event: SignalboxEvent<T>) => void;

const DEAD_LINK = 4000; // a client-side close code: the watchdog gave up on a silent link

const FATAL: Record<number, ClientErrorKind> = {
  4400: "malformed",
  4401: "unauthorized",
  4403: "forbidden",
};

export class SignalboxClient {
  readonly url: string;
  private readonly token: string;
  private readonly filter: EventFilter;
  private readonly start: StartFrom;
  private readonly store: CheckpointStore;
  private readonly backoff: Backoff;
  private readonly connectTimeoutMs: number;
  private readonly makeSocket: WebSocketFactory;
  private readonly network: NetworkMonitor | null;
  private readonly now: () => number;
  private socket: WebSocketLike | null = null;
  private sentCursor: number | null = null;
  private errorFrame: { code?: unknown; message?: unknown; epoch?: unknown } = {};
  private timer: ReturnType<typeof setTimeout> | null = null;
  private unwatchNetwork: (() => void) | null = null;
  private snapshot: ConnectionSnapshot;
  private readonly stateListeners = new Set<(s: ConnectionSnapshot) => void>();
  private readonly listeners = new Map<string, Set<(e: SignalboxEvent) => void>>();

  constructor(options: ClientOptions) {
    if (!options.token) throw new TypeError("a token is needed");
    this.token = options.token;
    this.url = options.url ?? defaultUrl();
    this.filter = options.filter ?? {};
    this.start = options.start ?? "live";
    this.store = options.store ?? defaultStore(options.storageKey ?? "default");
    this.backoff = new Backoff(options.backoff, options.random ?? Math.random);
    this.connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    this.makeSocket = options.WebSocket ?? ((url) => new WebSocket(url) as WebSocketLike);
    this.network = options.network === undefined ? browserNetwork() : options.network;
    this.now = options.now ?? Date.now;
    this.snapshot = {
      state: "idle", cursor: null, epoch: null, head: null, lag: null, lastHeartbeat: null,
      heartbeat: null, attempt: 0, retryAt: null, error: null, connections: 0,
    };
  }

  // -- the public surface --------------------------------------------------------------

  /** The current state; a new object after every change (suits React's useSyncExternalStore). */
  getSnapshot = (): ConnectionSnapshot => this.snapshot;

  /** Calls `listener` after every change of the snapshot; returns the unsubscribe function. */
  subscribe = (listener: (s: ConnectionSnapshot) => void): (() => void) => {
    this.stateListeners.add(listener);
    return () => this.stateListeners.delete(listener);
  };

  /** Listens to events of one type, or `"*"` for every event; returns the unsubscribe function. */
  on<T extends EventType>(type: T, listener: EventListener<T>): () => void;
  on(type: "*", listener: EventListener): () => void;
  on(type: string, listener: (event: never) => void): () => void {
    const set = this.listeners.get(type) ?? new Set();
    const wrapped = listener as (e: SignalboxEvent) => void;
    set.add(wrapped);
    this.listeners.set(type, set);
    return () => set.delete(wrapped);
  }

  /** Connects (resuming from the stored checkpoint, if any). */
  connect(): void {
    if (!["idle", "closed", "error"].includes(this.snapshot.state)) return;
    const saved = this.store.load();
    const cursor = saved?.cursor ?? startCursor(this.start);
    this.update({ state: "connecting", cursor, epoch: saved?.epoch ?? null, error: null, attempt: 0,
      head: null });
    if (this.network && !this.unwatchNetwork) {
      this.unwatchNetwork = this.network.watch((online) => this.onNetwork(online));
    }
    this.dial("connecting");
  }

  /** Closes the link; `connect()` resumes later from the checkpoint. */
  close(): void {
    this.unwatchNetwork?.();
    this.unwatchNetwork = null;
    this.drop(1000, "closed by the client");
    this.update({ state: "closed", retryAt: null });
  }

  /**
   * Forgets the checkpoint and starts again as new (from `start`): what to do after
   * `epoch_changed` or `cursor_ahead`, once whatever was built from the old log has been
   * thrown away.
   */
  reset(): void {
    this.close();
    this.store.clear();
    this.update({ cursor: null, epoch: null, lag: null, head: null, connections: 0 });
    this.connect();
  }

  // -- connecting ----------------------------------------------------------------------

  private dial(state: "connecting" | "reconnecting"): void {
    this.clearTimer();
    if (this.network && !this.network.online()) {
      this.update({ state: "offline", retryAt: null });
      return;
    }
    this.update({ state, retryAt: null });
    let socket: WebSocketLike;
    try {
      socket = this.makeSocket(this.url);
    } catch {
      this.retry();
      return;
    }
    this.socket = socket;
    this.errorFrame = {};
    socket.onopen = () => this.onOpen(socket);
    socket.onmessage = (message) => this.onMessage(socket, message.data);
    socket.onclose = (closed) => this.onClose(socket, closed.code, closed.reason);
    socket.onerror = () => undefined; // a close follows
    this.arm(this.connectTimeoutMs);
  }

  private onOpen(socket: WebSocketLike): void {
    if (socket !== this.socket) return;
    this.sentCursor = this.snapshot.cursor;
    socket.send(JSON.stringify({
      op: "hello", token: this.token, cursor: this.snapshot.cursor, epoch: this.snapshot.epoch,
      filter: this.filter, consumer: null, batch: true,
    }));
    this.update({ state: "open" });
  }

  private onMessage(socket: WebSocketLike, data: unknown): void {
    if (socket !== this.socket) return;
    if (typeof data !== "string") {
      this.fail({ kind: "protocol", code: 0, message: "the server sent a binary frame" });
      return;
    }
    if (this.snapshot.heartbeat !== null) this.arm(2 * this.snapshot.heartbeat * 1000);
    for (const line of data.split("\n")) {
      let frame: unknown;
      try {
        frame = JSON.parse(line);
      } catch {
        this.fail({ kind: "protocol", code: 0, message: "the server sent a frame that is not JSON" });
        return;
      }
      if (typeof frame !== "object" || frame === null) continue;
      this.onFrame(socket, frame as Record<string, unknown>);
      if (socket !== this.socket) return; // the frame ended this connection
    }
  }

  private onFrame(socket: WebSocketLike, frame: Record<string, unknown>): void {
    switch (frame.op) {
      case "welcome":
        this.onWelcome(frame);
        break;
      case "event":
        this.onEvent(frame as unknown as SignalboxEvent);
        break;
      case "live": {
        const position = asInt(frame.position) ?? 0;
        this.advance(position);
        this.update({ state: "live" });
        break;
      }
      case "ping":
        socket.send('{"op":"pong"}');
        this.update({ lastHeartbeat: this.now(), head: maxOf(this.snapshot.head, asInt(frame.head)) });
        break;
      case "error":
        this.errorFrame = frame;
        break;
      default:
        break; // pong, status answers, and ops of newer servers
    }
  }

  private onWelcome(frame: Record<string, unknown>): void {
    const { epoch, cursor, heartbeat, head } = frame;
    if (typeof epoch !== "string" || asInt(cursor) === null || typeof heartbeat !== "number"
        || heartbeat <= 0) {
      this.fail({ kind: "protocol", code: 0, message: "the server sent a malformed welcome" });
      return;
    }
    if (this.snapshot.epoch !== null && epoch !== this.snapshot.epoch) {
      this.fail(epochChanged(epoch));
      return;
    }
    if (this.sentCursor !== null && cursor !== this.sentCursor) {
      this.fail({ kind: "protocol", code: 0,
        message: `asked to resume after ${this.sentCursor}, offered ${String(cursor)}` });
      return;
    }
    this.arm(2 * heartbeat * 1000);
    this.update({
      state: "replaying", epoch, cursor: cursor as number, heartbeat, attempt: 0,
      head: maxOf(asInt(head), cursor as number), connections: this.snapshot.connections + 1,
    });
    this.save();
  }

  private onEvent(event: SignalboxEvent): void {
    const cursor = this.snapshot.cursor;
    if (!Number.isSafeInteger(event.position)) return;
    if (cursor !== null && event.position <= cursor) return; // already delivered: never twice
    this.advance(event.position, false);
    this.emit(event);
    this.save(); // after the listeners: a reload before they ran gets the event again
  }

  private emit(event: SignalboxEvent): void {
    for (const key of [event.type, "*"]) {
      for (const listener of this.listeners.get(key) ?? []) {
        try {
          listener(event);
        } catch (error) {
          console.error("a Signalbox event listener failed", error);
        }
      }
    }
  }

  private advance(position: number, save = true): void {
    const cursor = Math.max(this.snapshot.cursor ?? 0, position);
    this.update({ cursor, head: maxOf(this.snapshot.head, cursor) });
    if (save) this.save();
  }

  private save(): void {
    const { epoch, cursor } = this.snapshot;
    if (epoch !== null && cursor !== null) this.store.save({ epoch, cursor });
  }

  // -- losing the link -----------------------------------------------------------------

  private onClose(socket: WebSocketLike, code: number, reason: string): void {
    if (socket !== this.socket) return;
    this.socket = null;
    const frameCode = asInt(this.errorFrame.code);
    const closeCode = code === 1006 && frameCode !== null ? frameCode : code;
    const message = typeof this.errorFrame.message === "string" && this.errorFrame.message
      ? this.errorFrame.message
      : reason || `closed with ${closeCode}`;
    const kind = FATAL[closeCode];
    if (kind !== undefined) {
      this.fail({ kind, code: closeCode, message });
      return;
    }
    if (closeCode === 4409) {
      const epoch = this.errorFrame.epoch;
      if (typeof epoch === "string" && this.snapshot.epoch !== null && epoch !== this.snapshot.epoch) {
        this.fail({ ...epochChanged(epoch), message });
      } else {
        this.fail({ kind: "cursor_ahead", code: 4409, message });
      }
      return;
    }
    this.retry();
  }

  /** A dead link (the watchdog, a timeout): forget it without waiting for its close. */
  private onSilence(): void {
    this.drop(DEAD_LINK, "no frame for twice the heartbeat");
    this.retry();
  }

  private retry(): void {
    this.clearTimer();
    const attempt = this.snapshot.attempt;
    const delay = this.backoff.delayMs(attempt);
    this.update({ state: "reconnecting", attempt: attempt + 1, retryAt: this.now() + delay,
      heartbeat: null });
    this.timer = setTimeout(() => this.dial("reconnecting"), delay);
  }

  private fail(error: ClientError): void {
    this.drop(1000, error.kind);
    this.update({ state: "error", error, retryAt: null });
  }

  private onNetwork(online: boolean): void {
    const state = this.snapshot.state;
    if (state === "error" || state === "closed" || state === "idle") return;
    if (!online) {
      this.drop(1000, "offline");
      this.update({ state: "offline", retryAt: null, heartbeat: null });
    } else if (state === "offline" || state === "reconnecting") {
      this.dial("reconnecting");
    }
  }

  private drop(code: number, reason: string): void {
    this.clearTimer();
    const socket = this.socket;
    this.socket = null;
    if (socket) {
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
      try {
        socket.close(code, reason);
      } catch {
        // already closed
      }
    }
  }

  private arm(ms: number): void {
    this.clearTimer();
    this.timer = setTimeout(() => this.onSilence(), ms);
  }

  private clearTimer(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
  }

  private update(change: Partial<ConnectionSnapshot>): void {
    const next = { ...this.snapshot, ...change };
    next.lag = next.head !== null && next.cursor !== null ? Math.max(0, next.head - next.cursor) : null;
    this.snapshot = next;
    for (const listener of this.stateListeners) listener(next);
  }
}

function epochChanged(epoch: string): ClientError {
  return { kind: "epoch_changed", code: 4409, epoch,
    message: "the server's log is another one (its epoch changed): start again from its head" };
}

function asInt(value: unknown): number | null {
  return typeof value === "number" && Number.isSafeInteger(value) ? value : null;
}

function maxOf(a: number | null, b: number | null): number | null {
  if (a === null) return b;
  if (b === null) return a;
  return Math.max(a, b);
}

function startCursor(start: StartFrom): number | null {
  if (start === "live") return null;
  if (start === "beginning") return 0;
  return start;
}
