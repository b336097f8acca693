/** The read side of the HTTP API: signals, one signal's timeline, pages of events. */

import type { EventPage, SignalPage, SignalStatus, SignalTimeline } from "./types";

/** An answer other than 2xx: `code` is the server's stable error code. */
export class ApiError extends Error {
  constructor(readonly status: number, readonly code: string, message: string) {
    super(message);
    this.name = "ApiError";
  }
}

export interface SignalQuery {
  status?: SignalStatus[];
  ticker?: string[];
  strategy?: string[];
  limit?: number;
  /** Only signals first recorded before this position (a page's `next_before`). */
  before?: number | null;
}

export interface EventQuery {
  after?: number;
  /** "newest": newest first, from the head (or from below `before`) down to `after`. */
  order?: "oldest" | "newest";
  /** With order "newest": only events below this position (a full page's `next`). */
  before?: number;
  limit?: number;
  type?: string[];
  stream?: string[];
  ticker?: string[];
  strategy?: string[];
}

type Fetch = (input: string, init?: RequestInit) => Promise<Response>;

export class SignalboxApi {
  private readonly fetch: Fetch;

  /** `baseUrl` "" means this page's server. The token goes in a header, never in the URL. */
  constructor(private readonly token: string, private readonly baseUrl = "", fetchImpl?: Fetch) {
    this.fetch = fetchImpl ?? ((input, init) => globalThis.fetch(input, init));
  }

  signals(query: SignalQuery = {}): Promise<SignalPage> {
    const params = new URLSearchParams();
    for (const key of ["status", "ticker", "strategy"] as const) {
      const values = query[key];
      if (values && values.length) params.set(key, values.join(","));
    }
    if (query.limit !== undefined) params.set("limit", String(query.limit));
    if (query.before) params.set("before", String(query.before));
    return this.get<SignalPage>("/api/signals", params);
  }

  /** A number in it that a double would change (an order id of 19 digits) comes as its text,
   * as `JSON.rawJSON`, where the browser has it: `JSON.stringify` writes it as it was sent. */
  signal(signalId: string): Promise<SignalTimeline> {
    return this.get<SignalTimeline>(`/api/signals/${encodeURIComponent(signalId)}`, undefined,
      exactNumbers);
  }

  events(query: EventQuery = {}): Promise<EventPage> {
    const params = new URLSearchParams();
    if (query.after !== undefined) params.set("after", String(query.after));
    if (query.limit !== undefined) params.set("limit", String(query.limit));
    if (query.order !== undefined) params.set("order", query.order);
    if (query.before) params.set("before", String(query.before));
    for (const key of ["type", "stream", "ticker", "strategy"] as const) {
      const values = query[key];
      if (values && values.length) params.set(key, values.join(","));
    }
    return this.get<EventPage>("/api/events", params);
  }

  private async get<T>(path: string, params?: URLSearchParams, reviver?: Reviver): Promise<T> {
    const query = params && [...params.keys()].length ? `?${params.toString()}` : "";
    const response = await this.fetch(`${this.baseUrl}${path}${query}`, {
      headers: { Authorization: `Bearer ${this.token}`, Accept: "application/json" },
      cache: "no-store",
    });
    if (!response.ok) {
      let code = "http_error";
      let message = `the server answered ${response.status}`;
      try {
        const body = (await response.json()) as { error?: unknown; message?: unknown };
        if (typeof body.error === "string") code = body.error;
        if (typeof body.message === "string") message = body.message;
      } catch {
        // not JSON: keep the generic message
      }
      throw new ApiError(response.status, code, message);
    }
    return JSON.parse(await response.text(), reviver) as T;
  }
}

type Reviver = (key: string, value: unknown, context?: { source?: string }) => unknown;

const rawJSON = (JSON as { rawJSON?: (text: string) => unknown }).rawJSON;

/** A number as the server wrote it, when a double would read it otherwise. */
const exactNumbers: Reviver = (_key, value, context) =>
  typeof value === "number" && rawJSON && context?.source !== undefined
    && String(value) !== context.source ? rawJSON(context.source) : value;
