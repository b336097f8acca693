/** React bindings: one client, one API and one signals table per provider. */

import {
  createContext,
  useCallback,
  useContext,
  useEffect,
  useMemo,
  useState,
  useSyncExternalStore,
  type ReactNode,
} from "react";
import {
  SignalboxApi,
  SignalboxClient,
  SignalTable,
  type ClientOptions,
  type ConnectionSnapshot,
  type SignalboxEvent,
  type SignalRow,
} from "../client";

/** Rows asked for per page of `GET /api/signals`. */
export const PAGE = 100;

interface Services {
  client: SignalboxClient;
  api: SignalboxApi;
  table: SignalTable;
  /** The first page of signals could not be read: why. */
  pageError: string | null;
  setPageError: (message: string | null) => void;
}

const Context = createContext<Services | null>(null);

export interface SignalboxProviderProps {
  /** A token with scope `read`. */
  token: string;
  /** The server, "" for this page's (default). */
  baseUrl?: string;
  /** Client options (filter, storageKey, start, …); the token and URL come from above. */
  options?: Omit<ClientOptions, "token">;
  /** How many signals the table keeps in memory before it drops the oldest. */
  capacity?: number;
  children: ReactNode;
}

/** Connects while mounted; a new token makes a new connection and a new table. */
export function SignalboxProvider({ token, baseUrl = "", options, capacity = 1000, children }:
  SignalboxProviderProps) {
  const [pageError, setPageError] = useState<string | null>(null);
  const services = useMemo(() => {
    const url = options?.url ?? (baseUrl ? baseUrl.replace(/^http/, "ws") + "/ws" : undefined);
    const client = new SignalboxClient({ ...options, token, ...(url ? { url } : {}) });
    return { client, api: new SignalboxApi(token, baseUrl), table: new SignalTable(capacity) };
    // The options object is read once per token: a new token starts a new connection.
  }, [token, baseUrl, capacity]);

  useEffect(() => {
    const { client, api, table } = services;
    const stopEvents = client.on("*", (event) => table.apply(event));
    let firstPage: "wanted" | "asked" | "done" = "wanted";
    let retry: ReturnType<typeof setTimeout> | null = null;
    const readFirstPage = () => {
      firstPage = "asked";
      table.askingFirstPage();
      api.signals({ limit: PAGE }).then(
        (page) => {
          setPageError(null);
          // False: events came faster than the page, more than the table keeps: read it again.
          if (table.merge(page.signals, page.next_before, true)) firstPage = "done";
          else readFirstPage();
        },
        (error: unknown) => {
          setPageError(error instanceof Error ? error.message : String(error));
          retry = setTimeout(readFirstPage, 3000);
        },
      );
    };
    // After the first welcome: the page then holds every signal up to the stream's cursor.
    const stopState = client.subscribe((snapshot) => {
      if (snapshot.connections === 0) {
        if (firstPage === "done") {
          table.clear(); // reset() after an epoch change: the old rows belong to another log
          firstPage = "wanted";
        }
      } else if (firstPage === "wanted") {
        readFirstPage();
      }
    });
    client.connect();
    return () => {
      stopEvents();
      stopState();
      if (retry !== null) clearTimeout(retry);
      client.close();
    };
  }, [services]);

  const value = useMemo(() => ({ ...services, pageError, setPageError }), [services, pageError]);
  return <Context.Provider value={value}>{children}</Context.Provider>;
}

function useServices(): Services {
  const services = useContext(Context);
  if (services === null) throw new Error("Signalbox hooks need a <SignalboxProvider> above them");
  return services;
}

export interface SignalboxState extends ConnectionSnapshot {
  client: SignalboxClient;
  api: SignalboxApi;
  /** Forget the checkpoint and the rows and start again (after an epoch change). */
  restart: () => void;
}

/** The connection: state, cursor, lag, last heartbeat, error; re-renders on every change. */
export function useSignalbox(): SignalboxState {
  const { client, api, table } = useServices();
  const snapshot = useSyncExternalStore(client.subscribe, client.getSnapshot);
  const restart = useCallback(() => {
    table.clear();
    client.reset();
  }, [client, table]);
  return { ...snapshot, client, api, restart };
}

export interface EventMatch {
  /** Event types, `*` and `?` as wildcards. */
  types?: string[];
  tickers?: string[];
  strategies?: string[];
  streams?: string[];
}

/** The last `limit` events that match `filter` since mounting, oldest first. */
export function useEvents(filter: EventMatch = {}, limit = 100): SignalboxEvent[] {
  const { client } = useServices();
  const [events, setEvents] = useState<SignalboxEvent[]>([]);
  const key = JSON.stringify(filter);
  useEffect(() => {
    setEvents([]);
    const matches = matcher(JSON.parse(key) as EventMatch);
    return client.on("*", (event) => {
      if (!matches(event)) return;
      setEvents((previous) => [...previous.slice(Math.max(0, previous.length - limit + 1)), event]);
    });
  }, [client, key, limit]);
  return events;
}

export interface SignalsState {
  /** Newest first, each with its current status. */
  rows: SignalRow[];
  /** Whether older signals can be fetched. */
  more: boolean;
  loading: boolean;
  error: string | null;
  /** Fetches the page of signals before the oldest row held. */
  loadOlder: () => Promise<void>;
}

/** Signals with their current status, updated in place as events arrive. */
export function useSignals(): SignalsState {
  const { api, table, pageError } = useServices();
  const version = useSyncExternalStore(table.subscribe, () => table.version);
  // Sorted once per render that needs it, not once per event of a long replay.
  const rows = useMemo(() => table.list(), [table, version]);
  const [loading, setLoading] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const loadOlder = useCallback(async () => {
    if (!table.more || table.floor === null) return;
    setLoading(true);
    try {
      const page = await api.signals({ limit: PAGE, before: table.floor || null });
      table.merge(page.signals, page.next_before, false);
      setError(null);
    } catch (failure) {
      setError(failure instanceof Error ? failure.message : String(failure));
    } finally {
      setLoading(false);
    }
  }, [api, table]);
  return { rows, more: table.more && table.floor !== null, loading, error: error ?? pageError, loadOlder };
}

function glob(pattern: string): RegExp {
  const body = pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".");
  return new RegExp(`^${body}$`);
}

export function matcher(filter: EventMatch): (event: SignalboxEvent) => boolean {
  const types = (filter.types ?? []).map(glob);
  return (event) =>
    (types.length === 0 || types.some((t) => t.test(event.type)))
    && (!filter.tickers?.length || filter.tickers.includes(String(event.meta.ticker)))
    && (!filter.strategies?.length || filter.strategies.includes(String(event.meta.strategy)))
    && (!filter.streams?.length || filter.streams.includes(event.stream));
}
